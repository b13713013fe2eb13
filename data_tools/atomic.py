"""Writes that are whole or absent: a file or a folder written beside its final path, flushed,
then renamed over it; and the one error a full disk becomes. Every part of the project writes
through here (the dataset folder, the index, run folders, exports, checkpoints' marks)."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replaced_on_close(path: str, *, fsync: bool = True, buffering: int = -1):
    """Yield a binary file beside `path` (`.<name>.<random>`) to write into; when the block is
    done, flush it (to disk too unless `fsync` is off: for files of a folder that is flushed whole
    afterwards) and rename it over `path`. On any failure the temporary file is removed and `path`
    is as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb", buffering=buffering) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    with replaced_on_close(path) as f:
        f.write(data)


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder` to disk, before the folder is renamed into place: some
    file systems (NFS, quota-limited ones) report a full disk only at fsync, not at write."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(Exception):
    """Something could not be written (a full disk, a quota, no permission): the commands print
    it as one line, `<what> (<folder>): <cause>`, and exit with 2."""


@contextmanager
def writing(what: str, folder: str):
    """Turn an OSError inside into a WriteError that says what was being written, where, and why.
    Removing what the block left half-written is the block's job."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"{what} ({folder}): {e.strerror or e}") from e


@contextmanager
def written_aside(what: str, folder: str):
    """Yield an empty staging folder beside `folder` (`.<name>.staging-<random>`, with the
    umask's permissions) to write a whole folder into; when the block is done, flush it to disk
    and rename it over `folder`. On any failure the staging folder is removed, `folder` is as it
    was (or still absent), and an OSError (a full disk) becomes a WriteError naming `what` and
    `folder`. Staging folders that an interrupted earlier write left behind are removed first."""
    parent, name = os.path.split(os.path.abspath(folder))
    with writing(what, folder):
        os.makedirs(parent, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(f".{name}.staging-") + "*")):
            shutil.rmtree(stale, ignore_errors=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.staging-")
        try:
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders
            yield staging
            fsync_tree(staging)
            _replace_folder(staging, os.path.join(parent, name))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _replace_folder(staging: str, final: str) -> None:
    """Rename `staging` to `final`; an existing `final` is moved into a hidden folder first and
    removed after."""
    if os.path.exists(final):
        old = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.old-")
        os.rename(final, os.path.join(old, "d"))
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())
