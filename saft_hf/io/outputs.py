"""Output folders saft_hf may replace: a manifest of what it wrote, staging beside the target, atomic swaps,
the never-an-input rule, and cleanup of staging folders left by interrupted runs.

saft_hf replaces an existing output folder only when it can show that everything in it is its own: every folder it
writes records the files it holds (name, size, mtime) in a manifest, and a folder is replaceable only while it
still holds exactly those files, unchanged. A folder is built in a staging folder beside the target, named after
its owner (pid@host), and swapped in with renames; a later run removes the staging folders of dead owners.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from ..errors import UnsafeOutputError, listed_names
from ..layout import OUTPUT_MANIFEST_NAME, PRETRAINING_RECORD_NAME, RECIPE_NAME, TASK_VECTOR_WEIGHT_FILES

_MANIFEST_FORMAT = "saft_hf.output/1"


# Files only saft_hf writes (a merge's recipe, a task vector, the demo's pre-training record): a folder holding one but
# no manifest was written before manifests existed.
_LEGACY_MARKERS = (RECIPE_NAME, *TASK_VECTOR_WEIGHT_FILES, PRETRAINING_RECORD_NAME)


def check_outside_inputs(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], *, field: str
) -> None:
    """Raise :class:`UnsafeOutputError` when ``output`` is, contains or lies inside one of ``inputs`` (``(label,
    path)`` pairs), or holds a file an input links to: writing there would replace, delete or add to an input.
    Paths are compared resolved."""
    output = Path(output).expanduser().resolve()
    for label, path in inputs:
        folder = Path(path).expanduser().resolve()
        if (link := _link_into(folder, output)) is not None:
            raise UnsafeOutputError(
                f"{field}: {output} holds {link.resolve()}, which input {label} reads through its link {link}; "
                f"writing there would change that input, choose another {field}"
            )
        if output == folder:
            relation = "is"
        elif output.is_relative_to(folder):
            relation = "is inside"
        elif folder.is_relative_to(output):
            relation = "contains"
        else:
            continue
        where = "" if str(folder) in label else f" ({folder})"
        raise UnsafeOutputError(
            f"{field}: {output} {relation} the folder of input {label}{where}; writing there would replace or "
            f"change that input, choose another {field}"
        )


def file_in_the_way(path: Path) -> Path | None:
    """A parent of ``path`` that exists as a file (no folder can be made there), or None."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


def _link_into(folder: Path, output: Path) -> Path | None:
    """A symbolic link under ``folder`` (a model folder: few files) that resolves to a path inside ``output``."""
    for root, directories, files in os.walk(folder):
        for name in [*directories, *files]:
            path = Path(root) / name
            if path.is_symlink() and path.resolve().is_relative_to(output):
                return path
    return None


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    *,
    kind: str,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
    field: str = "output folder",
) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``target``; move it into place only if the block succeeds.

    Before any work: ``target`` must lie apart from ``inputs`` (:func:`check_outside_inputs`) and, if it exists, be
    replaceable (:func:`check_replaceable`), which is checked again right before the swap. On success the folder
    gets a manifest of its files (``kind`` says what it holds) and the umask's permissions; on error or SIGTERM the
    staging folder is removed, and so are the parent folders made for ``target`` (when still empty), and ``target``
    is left as it was. Staging left by dead processes (SIGKILL) for this target is removed first.
    """
    target = Path(target).expanduser().resolve()
    check_outside_inputs(target, inputs, field=field)
    if (blocking := file_in_the_way(target)) is not None:
        raise UnsafeOutputError(f"{field}: {blocking} is a file, not a folder; choose another {field}")
    if os.path.ismount(target):  # the swap renames folders, and a mount point cannot be renamed
        raise UnsafeOutputError(f"{field}: {target} is a mount point; choose a folder inside it")
    check_replaceable(target)
    created = [parent for parent in target.parents if not parent.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target)
    with _sigterm_interrupts():
        staging = _owned_dir_beside(target, "tmp")
        try:
            yield staging
            write_manifest(staging, kind)
            check_replaceable(target)  # the folder may have changed during a long run
            replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for parent in created:  # the folders made for the output, if nothing else was put there meanwhile
                with contextlib.suppress(OSError):
                    parent.rmdir()
            raise


def write_manifest(folder: Path, kind: str) -> None:
    """Record every file under ``folder`` (relative posix path, size, mtime_ns) in its manifest."""
    files = {name: {"size": info.st_size, "mtime_ns": info.st_mtime_ns} for name, info in _files_under(folder)}
    manifest = {"format": _MANIFEST_FORMAT, "kind": kind, "files": files}
    (folder / OUTPUT_MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _files_under(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative posix path, lstat)`` of every non-folder entry under ``folder`` but the manifest (links are
    not followed)."""
    for directory, subfolders, names in os.walk(folder):
        subfolders.sort()
        for name in sorted(names):
            path = Path(directory, name)
            relative = path.relative_to(folder).as_posix()
            if relative != OUTPUT_MANIFEST_NAME:
                yield relative, path.lstat()


def _read_manifest(target: Path) -> dict[str, dict[str, int]]:
    """The recorded files of ``target``'s manifest; raises :class:`UnsafeOutputError` when it is missing or invalid."""
    path = target / OUTPUT_MANIFEST_NAME
    if not path.is_file():
        if any((target / marker).exists() for marker in _LEGACY_MARKERS):
            raise UnsafeOutputError(
                f"{target}: was written by an older saft_hf, which kept no record of its files "
                f"({OUTPUT_MANIFEST_NAME}), so files added since cannot be told apart; move its contents away or "
                "choose another output folder"
            )
        raise UnsafeOutputError(
            f"{target}: is not empty and was not written by saft_hf (no {OUTPUT_MANIFEST_NAME}); move its files "
            "away or choose another output folder"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        valid = manifest["format"] == _MANIFEST_FORMAT and all(
            isinstance(name, str)
            and not name.startswith("/")
            and ".." not in name.split("/")
            and isinstance(entry["size"], int)
            and isinstance(entry["mtime_ns"], int)
            for name, entry in files.items()
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        valid = False
    if not valid:
        raise UnsafeOutputError(
            f"{target}: its {OUTPUT_MANIFEST_NAME} is not a valid saft_hf manifest, so saft_hf cannot tell its own "
            "files; move the folder's contents away or choose another output folder"
        )
    return files


def check_replaceable(target: Path) -> None:
    """Raise :class:`UnsafeOutputError` unless ``target`` is missing, empty, or a folder saft_hf wrote that still
    holds exactly the files its manifest records (each with its recorded size and mtime; a file removed since is
    fine, nothing of the user's is lost by replacing the rest)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UnsafeOutputError(f"{target}: exists and is not a folder; choose another output folder")
    if not any(target.iterdir()):
        return
    recorded = _read_manifest(target)
    recorded_folders = {parent.as_posix() for name in recorded for parent in PurePosixPath(name).parents}
    foreign, changed = [], []
    for directory, subfolders, names in os.walk(target):
        relative = Path(directory).relative_to(target)
        ours = [
            name
            for name in sorted(subfolders)
            if (relative / name).as_posix() in recorded_folders and not Path(directory, name).is_symlink()
        ]
        foreign += [f"{(relative / name).as_posix()}/" for name in sorted(set(subfolders) - set(ours))]
        subfolders[:] = ours
        for name in sorted(names):
            path = (relative / name).as_posix()
            if path == OUTPUT_MANIFEST_NAME:
                continue
            entry = recorded.get(path)
            if entry is None:
                foreign.append(path)
                continue
            info = (target / path).lstat()
            if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                changed.append(path)
    if foreign:
        raise UnsafeOutputError(
            f"{target}: holds files saft_hf did not write: {listed_names(sorted(foreign))}; move them away or choose "
            "another output folder"
        )
    if changed:
        files = (
            f"file {changed[0]} changed since saft_hf wrote it"
            if len(changed) == 1
            else (f"files {listed_names(changed)} changed since saft_hf wrote them")
        )
        raise UnsafeOutputError(f"{target}: {files}; move the folder's contents away or choose another output folder")


def replace_dir(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; an old ``target`` is renamed away first and deleted only afterwards."""
    if not target.exists():
        try:
            os.replace(staging, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another run made ``target`` since it was checked: its output is not replaced unchecked.
            raise UnsafeOutputError(
                f"{target}: another run wrote this folder while this one worked; run again to replace it (if "
                "saft_hf wrote all of it) or choose another output folder"
            ) from None
        return
    retired = _owned_dir_beside(target, "old")
    try:
        os.replace(target, retired / target.name)
        os.replace(staging, target)
    except BaseException:
        if os.path.lexists(retired / target.name) and not os.path.lexists(target):  # interrupted between the renames
            os.replace(retired / target.name, target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _owned_dir_beside(target: Path, role: str) -> Path:
    """A new folder ``.<target name>.<role>-<pid>@<host>-<random>`` beside ``target``: its name says which process
    owns it, so a later run can tell an abandoned one. Made with ``mkdir`` (mode 0o777 less the umask), as the
    finished output's permissions should be the user's usual ones, not ``mkdtemp``'s 0o700."""
    prefix = f".{target.name}.{role}-{os.getpid()}@{socket.gethostname()}-"
    while True:
        folder = target.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def remove_abandoned_staging(target: Path) -> list[Path]:
    """Remove the staging (``.tmp-``) and retired (``.old-``) folders of ``target`` whose owner process is gone
    (killed before it could clean up); those of live processes, other hosts and other targets are kept. Returns
    the removed folders."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:tmp|old)-(\d+)@([^@/]+)-[0-9a-f]+")
    removed = []
    for entry in sorted(target.parent.iterdir()) if target.parent.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _owner_alive(int(match[1]), match[2]):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _owner_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, keep its folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # no such pid can exist
    return True


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived while an output was being staged; raised so the staging folder is removed on the way out."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """In the block, SIGTERM raises (in the main thread, as Ctrl-C does) so that cleanup code runs; afterwards the
    previous handler is restored and the signal delivered to it again, so the process still ends as terminated
    (exit status 143 under the default handler). Elsewhere, or when SIGTERM is ignored, nothing changes."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise _Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise  # the previous handler returned: report the interruption
    finally:
        signal.signal(signal.SIGTERM, previous)
