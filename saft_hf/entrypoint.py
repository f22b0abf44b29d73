"""The one runner of the ``saft-hf`` command and the recipes: user errors become one line, bugs keep their traceback.

``run_main(main, argv, prog=...)`` calls ``main(argv)`` and returns the process exit status:

- a user error (``saft_hf.errors.USER_ERRORS``, which includes ``PushError``): ``prog: error: <message>`` on one
  line, status 1;
- the disk refusing a write (no space, quota, read-only file system, permission denied): one line naming the path
  and what to do, status 1;
- a Hub request that failed (``HfHubHTTPError`` reaching the top): one line with the HTTP status, the request and
  the server's message (never headers, so never a token), status 1;
- Ctrl-C (SIGINT): ``prog: interrupted``, status 130; SIGTERM is raised the same way (as ``Terminated``) so that
  cleanup runs (temporary folders are removed): ``prog: terminated``, status 143;
- anything else is a bug: its traceback, as Python prints it.

``--debug`` anywhere on the command line (removed before ``main`` sees it) or ``SAFT_HF_DEBUG=1`` re-raises every
error, so its traceback shows.

``exit_process(status)`` ends a command's process without the interpreter's teardown (see its docstring).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from huggingface_hub.errors import HfHubHTTPError

from .errors import USER_ERRORS

DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT_VARIABLE = "SAFT_HF_DEBUG"

# What to do when the operating system refuses a write, by errno.
_DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on device: free space or choose another output_dir",
    errno.EDQUOT: "disk quota exceeded: free space or choose another output_dir",
    errno.EROFS: "read-only file system: choose another output_dir",
    errno.EACCES: "permission denied: check its permissions (or choose another output_dir)",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks and context managers clean up on the way out."""


def one_line(message: str) -> str:
    """``message`` with its line breaks (and the spaces around them) collapsed to single spaces."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def user_error_message(error: BaseException) -> str | None:
    """The one-line message the runner prints for ``error``, or None if ``error`` is a bug (or an interrupt)."""
    if isinstance(error, OSError) and error.errno in _DISK_PROBLEMS:
        path = error.filename2 or error.filename
        problem = _DISK_PROBLEMS[error.errno]
        return f"{path}: {problem}" if path else problem
    if isinstance(error, HfHubHTTPError):
        response = error.response
        url = str(response.request.url).split("?")[0]  # the path names the repo; a query string is not needed
        status = f"HTTP {response.status_code} {response.reason_phrase}"
        detail = f": {error.server_message}" if error.server_message else ""
        return one_line(f"the Hub refused {response.request.method} {url}: {status}{detail}")
    if isinstance(error, USER_ERRORS):
        return one_line(str(error)) or type(error).__name__
    return None


def take_debug_flag(argv: Sequence[str], debug_flag: str | None) -> tuple[list[str], bool]:
    """``argv`` without ``debug_flag`` among its options (before a ``--`` that ends them), and whether debugging was
    asked for: by that flag, or by ``SAFT_HF_DEBUG`` set to anything but ``0`` or nothing."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    options = argv[:end]
    flagged = debug_flag is not None and debug_flag in options
    if flagged:
        argv = [arg for arg in options if arg != debug_flag] + argv[end:]
    return argv, flagged or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "0") not in ("", "0")


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_main(
    main: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    debug_flag: str | None = DEBUG_FLAG,
) -> int:
    """Run ``main(argv)`` (default argv: ``sys.argv[1:]``) and return the exit status: 0 when it returns, else as the
    module docstring says. ``debug_flag`` is taken out of ``argv`` before ``main`` sees it; pass None when ``main``
    has an option of that name itself (``SAFT_HF_DEBUG=1`` still works)."""
    argv, debug = take_debug_flag(sys.argv[1:] if argv is None else argv, debug_flag)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main(argv)
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        terminated = isinstance(interrupt, Terminated)
        _print_line(f"{prog}: {'terminated' if terminated else 'interrupted'}")
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as error:
        message = user_error_message(error)
        if debug or message is None:
            raise
        _print_line(f"{prog}: error: {message}")
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


def exit_process(status: int) -> NoReturn:
    """End the process with ``status`` as a normal exit would for the user, minus the interpreter's teardown.

    The atexit handlers run (logging's flush among them) and stdout and stderr are flushed; then ``os._exit`` skips
    freeing every module and object one by one, which takes 0.25-0.3 s once torch is imported (measured on 2 cores:
    ``python -c "import torch"`` spends that long after its last statement), a sixth of a whole task arithmetic
    merge. While a non-daemon thread still runs, the process exits the usual way (``sys.exit``), which waits for it.
    """
    current = threading.current_thread()
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate() if thread is not current):
        sys.exit(status)
    atexit._run_exitfuncs()  # what sys.exit would run; the module's only way to run them now
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (`| head`) loses nothing the reader wanted
            stream.flush()
    os._exit(status)


def _print_line(line: str) -> None:
    sys.stdout.flush()  # what the run printed comes before the error
    print(line, file=sys.stderr, flush=True)


__all__ = [
    "DEBUG_ENVIRONMENT_VARIABLE",
    "DEBUG_FLAG",
    "Terminated",
    "exit_process",
    "one_line",
    "run_main",
    "take_debug_flag",
    "user_error_message",
]
