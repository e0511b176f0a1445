"""``python -m benchmarks.fidelity``: the whole report (see :mod:`benchmarks.fidelity.report`)."""

from benchmarks.fidelity.report import main


raise SystemExit(main())
