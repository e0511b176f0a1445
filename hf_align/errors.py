"""The one exception class for a user's mistake (a bad field, column, file or path).

The command line turns a :class:`UserError` into one line on stderr and exit code 2; any other exception is a
bug and keeps its traceback. It subclasses ``ValueError`` so that code catching ``ValueError`` (and every
``pytest.raises(ValueError)``) keeps working.
"""

from __future__ import annotations


__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user: the message names the field, column or file and what was expected."""
