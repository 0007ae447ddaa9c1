"""Small durable-file helpers shared by every state file and every output file the project writes."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets

from .errors import UsageError


def write_json_atomic(path: str, obj, durable: bool = True) -> None:
    """Temp file, fsync, rename, fsync the directory: a crash leaves the old file or the new, never half.
    durable=False skips the fsyncs (still never half a file to a reader) for a state that a crash makes
    moot anyway: no forced journal commit, which on ext4 stalls every other writer of the volume."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:               # disk full, a bad value: the old file stands and no temp file is left
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename or a new name in `directory` durable."""
    fsync_path(directory)


def fsync_path(path: str) -> None:
    """fsync a file or folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A fresh name beside `path` (same folder, so the rename stays on one file system), hidden, keeping the
    extension (writers that look at it see the same one), and marked as unfinished."""
    directory, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    return os.path.join(directory, f".{stem}.partial-{os.getpid()}-{secrets.token_hex(4)}{ext}")


@contextlib.contextmanager
def output_path(path: str, *, replace: bool = False):
    """Every output file a command writes goes through here: the writer is given a temporary path in the
    output's own folder (nothing exists there yet), and only when the block ends without an exception is the
    file fsynced and renamed to `path`. Any failure or interruption removes the temporary file: nothing is
    ever left at `path` that the command did not finish. An existing `path` is refused unless `replace`
    (and then is swapped atomically: readers see the old file or the new one)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write {path}: the folder {directory} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path}: it is a folder")
    if not replace and os.path.lexists(path):
        raise UsageError(f"{path} already exists")
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        _publish(tmp, path, replace)
        fsync_dir(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def output_file(path: str, mode: str = "wb", *, replace: bool = False, **open_kw):
    """output_path for writers that want an open file object."""
    with output_path(path, replace=replace) as tmp, open(tmp, mode, **open_kw) as f:
        yield f


def _publish(tmp: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:                          # a hard link never replaces a file that appeared meanwhile
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} already exists (it appeared while it was being written)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(tmp, path)     # a file system without hard links: the check above has to do
