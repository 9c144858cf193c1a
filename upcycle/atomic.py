"""Atomic writes: an interrupted run never leaves a half-written file or directory behind under the final name.

A directory is written in a temporary sibling ``.NAME.<pid>.<random>.partial`` and renamed into place, under an
exclusive lock on ``.NAME.lock`` held for the whole write, so two processes never write one output at once. The
owner's pid in the temporary names lets the next write to the same output remove what a killed process left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RunFailed, UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class OutputBusy(RunFailed):
    """Another process is writing the same output directory."""


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``path``, removed again on release."""
    lock_path = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"another upcycle process is writing {path}; wait for it to finish or choose another "
                             "output directory") from None  # fmt: skip
        # the holder before us may have removed the file after we opened it: then our lock guards nothing
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # before unlocking, so a waiter that opened the old file retries
        os.close(fd)


def _owner_alive(rest: str) -> bool:
    """Whether the pid that starts ``rest`` (``<pid>.<random>.partial``, ``<pid>.old``) is a live process; names
    without one (older versions) are assumed to be."""
    pid = rest.split(".", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_leftovers(path: Path) -> None:
    """Remove the temporary siblings of ``path`` that dead writers left; call under :func:`output_lock`.

    A writer killed between its two renames left the previous output as ``.NAME.<pid>.old`` and no ``NAME``: the
    old output goes back in place (nothing is lost); beside a complete ``NAME`` it is removed.
    """
    prefix = f".{path.name}."
    for sibling in sorted(path.parent.glob(f".{glob_escape(path.name)}.*")):
        rest = sibling.name[len(prefix) :]
        if rest.endswith(".partial") and not _owner_alive(rest):
            shutil.rmtree(sibling, ignore_errors=True)
        elif rest == "old" or (rest.endswith(".old") and not _owner_alive(rest)):
            if path.exists():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                os.replace(sibling, path)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_not_overlapping(out: str | os.PathLike, source: str | os.PathLike | None, overwrite: bool = False) -> None:
    """Refuse an output that is the source or inside it (the write would change the source), or, with
    ``overwrite``, one that holds the source (replacing it would delete the source)."""
    if source is None or not Path(source).exists():
        return  # timm:ARCH, hub ids: nothing on disk to protect
    out_path, source_path = Path(out).resolve(), Path(source).resolve()
    if out_path == source_path or source_path in out_path.parents:
        raise UserError(f"--out {out} is inside the source {source}, which the write would change; choose an "
                         "output directory outside it")  # fmt: skip
    if overwrite and out_path in source_path.parents:
        raise UserError(f"--out {out} holds the source {source}, which replacing the output would delete; "
                        "choose another output directory")  # fmt: skip


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``path``, on failure it is removed.

    An existing ``path`` is refused unless ``overwrite``; then it is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        clean_leftovers(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another output directory or pass overwrite=True")
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".partial"))
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished output should read like any folder
            yield tmp
            if path.exists():
                old = path.with_name(f".{path.name}.{os.getpid()}.old")
                os.replace(path, old)
                os.replace(tmp, path)  # dying between these two renames: clean_leftovers puts old back
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            raise
