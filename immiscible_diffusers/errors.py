"""One error path for every entry point: a user error prints one line ``error: ...`` and exits with status 2.

Bad input (a missing folder, a mistyped checkpoint, a batch larger than the data, a missing optional
dependency) is reported as the message alone, with no traceback, and before anything in the output
folder changes. The traceback comes with ``--debug`` or ``IMMISCIBLE_DEBUG=1``, for bug reports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

DEBUG_ENV = "IMMISCIBLE_DEBUG"
EXIT_USER_ERROR = 2
# What a user can cause: bad values, missing or unreadable files, missing optional packages.
USER_ERRORS = (ValueError, OSError, ImportError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether ``--debug`` is among ``argv`` (default: ``sys.argv``) or ``IMMISCIBLE_DEBUG`` is set to 1."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "0").lower() in ("1", "true", "yes")


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Print ``[prog: ]error: message`` to stderr and exit with status 2."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def run_entry_point(main: Callable[..., Any], *main_args: Any, prog: str | None = None) -> Any:
    """Call ``main(*main_args)``; turn a user error into one ``error:`` line and exit status 2.

    With ``--debug`` on the command line or ``IMMISCIBLE_DEBUG=1`` the exception propagates (traceback).
    """
    if debug_requested():
        return main(*main_args)
    try:
        return main(*main_args)
    except USER_ERRORS as error:
        message = str(error) or type(error).__name__
        fail(" ".join(message.split()), prog)
