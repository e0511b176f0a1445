"""hf-align: fine-grained alignment methods (ALLO, NPO, ALT/Quark, Aligner, AMA) for TRL and PEFT."""

__version__ = "0.1.0.dev0"

import hf_align.peft_tuners  # noqa: E402,F401  (registers Aligner with PEFT once peft is imported)
from hf_align import trainers  # noqa: E402,F401
