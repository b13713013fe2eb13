"""The dataset folder contract (see docs/folders.md, "Dataset folder"): paths, manifest, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

# 2: a new user's first interaction is a training sample (empty history); 1 dropped it.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ITEMS = "items.jsonl"
USERS = "users.jsonl"
ITEM_INDEX = "item_index.json"


def window_dir(root: str, t: int) -> str:
    return os.path.join(root, "windows", f"{t:02d}")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """Yield `<folder>.tmp` to write a whole folder into; when the block is done, flush it and
    rename it over `folder`. On any failure the temporary folder is removed, `folder` is as it
    was, and an OSError (a full disk) becomes a WriteError naming `what` and `folder`."""
    tmp = folder.rstrip("/") + ".tmp"
    with writing(what, folder):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            yield tmp
            fsync_tree(tmp)
            _replace_folder(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace_folder(tmp: str, final: str) -> None:
    if os.path.isdir(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def load_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{root} is not a dataset folder (no {MANIFEST}); create one with `python -m data_tools convert`"
        )
    with open(path) as f:
        m = json.load(f)
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {m.get('schema_version')} is not {SCHEMA_VERSION}; reconvert with this version"
        )
    return m


def split_shards(root: str, manifest: dict, t: int, split: str) -> list[tuple[str, int]]:
    """(path, samples) of each shard of one window's split, in order."""
    windows = manifest["windows"]
    if not 0 <= t < len(windows):
        raise ValueError(f"window {t} does not exist: the dataset has windows 0..{len(windows) - 1}")
    return [(os.path.join(window_dir(root, t), s["name"]), s["samples"]) for s in windows[t]["shards"][split]]
