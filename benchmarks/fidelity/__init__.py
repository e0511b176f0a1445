"""The method-fidelity study: does each method produce its paper's effect on the testbed?

``python -m benchmarks.fidelity`` runs the whole report (:mod:`benchmarks.fidelity.report`); each section
(``allo``, ``adapters``, ``unlearning``) also runs alone, e.g. ``python -m benchmarks.fidelity.allo --quick``.
"""
