"""hf-align: fine-grained alignment methods (ALLO, NPO, ALT/Quark, Aligner, AMA) for TRL and PEFT."""

__version__ = "0.1.0.dev0"

from hf_align.quiet import quiet_backend_notices  # noqa: E402


quiet_backend_notices()  # before PEFT imports bitsandbytes (see hf_align.quiet)

import hf_align.peft_tuners  # noqa: E402,F401  (registers Aligner with PEFT once peft is imported)
from hf_align import trainers  # noqa: E402,F401
