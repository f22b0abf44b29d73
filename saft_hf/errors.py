"""Errors a user can act on, and the one rule for showing them.

A user error is one line naming the file, field or tensor and what to do. Library code raises the classes below
(or the built-in ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``PermissionError``, which count as
user errors too); the command line and the recipes print them as one line, and a traceback only with ``--debug``
or ``SAFT_HF_DEBUG=1``. This module is a leaf: it imports nothing from saft_hf.
"""

from __future__ import annotations


class SaftHfError(Exception):
    """Base class of saft_hf's own user errors: the message is one line that says what is wrong and what to do."""


class UnsafeOutputError(SaftHfError, FileExistsError):
    """Writing the requested output would replace or delete something saft_hf did not write (or one of the
    run's inputs)."""


class OutsideFolderError(SaftHfError, ValueError):
    """A file (a shard named by an index, a revision, a path) points outside the folder or repo the user named."""


class NonFiniteError(SaftHfError, ValueError):
    """A tensor holds NaN or infinite values (an input, a task vector, or a merged result)."""


class UnknownTaskError(SaftHfError, KeyError):
    """A task name that is not registered. A ``KeyError`` too, for lookups that expect one; shown as its message
    (``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PushError(SaftHfError):
    """Uploading to the Hub failed after the local output was written completely; the message says where it is."""


_LISTED_NAMES = 3  # names shown in a message before "(+N more)"


def listed_names(names: list[str]) -> str:
    """``names`` as a one-line message lists them: the first three, then ``(+N more)``."""
    more = f" (+{len(names) - _LISTED_NAMES} more)" if len(names) > _LISTED_NAMES else ""
    return ", ".join(names[:_LISTED_NAMES]) + more


# Exceptions that carry a user-facing one-line message (everything else is a bug: traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    SaftHfError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)

__all__ = [
    "USER_ERRORS",
    "NonFiniteError",
    "OutsideFolderError",
    "PushError",
    "SaftHfError",
    "UnknownTaskError",
    "UnsafeOutputError",
    "listed_names",
]
