"""How a user's mistake ends a command: one line on stderr and exit code 2; a bug keeps its traceback.

Its own module so that every command module, and the process ``accelerate launch`` starts, can use it without
importing the dispatcher (``hf_align.cli``) that imports them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from hf_align.errors import UserError
from hf_align.progress import close_progress_bars


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
"""What a bad recipe, argument, column or path raises; also a ``SystemExit`` with a message. Anything else (a
``TypeError`` or plain ``ValueError`` from a bug) keeps its traceback."""
DEBUG_ENV = "HF_ALIGN_DEBUG"


def run_guarded(name: str, func: Callable[[], int | None]) -> int:
    """``func()``'s exit code; a user error becomes ``hf-align <name>: <message>`` on stderr and code 2."""
    try:
        return int(func() or 0)
    except (*USER_ERRORS, SystemExit) as err:
        if isinstance(err, SystemExit) and not isinstance(err.code, str):
            return int(err.code or 0)  # argparse's own exit: --help, or usage + code 2 already printed
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        close_progress_bars()  # the error on a line of its own, not after a half-drawn bar
        message = " ".join(str(err).split()) or type(err).__name__
        prefix = f"hf-align {name}: "
        print(message if message.startswith(prefix) else prefix + message, file=sys.stderr, flush=True)
        return 2
