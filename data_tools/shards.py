"""Deterministic WebDataset shards: plain POSIX tar files, one `<key>.json` member per sample.

The writer emits ustar headers itself with every metadata field fixed (mtime 0, uid/gid 0, mode
0644, no user names), so the same samples always give the same bytes; `tarfile` and
`webdataset.TarWriter` stamp the current time and take several times longer per member, which
matters when a conversion writes millions of members. `read_tar` reads a whole shard of this
writer back at once, about 15x faster than a webdataset or `tarfile` pipeline: the trainer's
reads by index, the whole-split reads and `window_split`'s stream go through it
(data_tools/reader.py), so a damaged shard is always the same one line (data_tools/readback.py).
"""

from __future__ import annotations

import os

from data_tools.atomic import replaced_on_close
from data_tools.dataset import shard_remedy
from data_tools.readback import DamagedFile, read_bytes
from data_tools.textio import sha256_file

BLOCK = 512
_EOF = b"\0" * (2 * BLOCK)


# The constant parts of a ustar header for a regular file: mode 0644, uid/gid 0, mtime 0 (so
# the same samples always give the same bytes), no user names.
_MID = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"00000000000\0"
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247  # type, linkname, magic+version, rest
_CONST_SUM = sum(_MID) + sum(_MTIME) + sum(_TAIL) + 8 * ord(" ")  # the checksum field counts as spaces


# The whole header as one format (name, size, checksum): one allocation per member.
_HEADER = b"%b" + _MID + b"%011o\0" + _MTIME + b"%06o\0 " + _TAIL  # the constants hold no "%"
_SIZE_SUMS: dict[int, int] = {}  # size -> the checksum of its field: sizes repeat across members


def tar_header(name: bytes, size: int) -> bytes:
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size_sum = _SIZE_SUMS.get(size)
    if size_sum is None:
        size_sum = _SIZE_SUMS[size] = sum(b"%011o\0" % size)
    return _HEADER % (name.ljust(100, b"\0"), size, _CONST_SUM + sum(name) + size_sum)


def write_tar(path: str, members) -> dict:
    """Write `(key, payload)` members as `<key>.json` into a tar file, atomically (temp, rename;
    not flushed to disk: the dataset folder is flushed whole before it is renamed into place).
    Returns its manifest record: name, samples, bytes and sha256 (read back from the page cache:
    one pass at memory speed, cheaper than hashing each member as it is written)."""
    n = 0
    with replaced_on_close(path, fsync=False, buffering=1 << 20) as f:
        write = f.write
        for key, payload in members:
            write(tar_header(key + b".json", len(payload)))
            write(payload + _PAD[len(payload) % BLOCK])
            n += 1
        write(_EOF)
        size = f.tell()
    return {"name": os.path.basename(path), "samples": n, "bytes": size, "sha256": sha256_file(path)}


_PAD = [b"\0" * (-k % BLOCK) for k in range(BLOCK)]


def read_tar(path: str, samples: int | None = None):
    """`(key, payload)` of every `<key>.json` member of a shard this module wrote (regular files
    with ustar headers); anything else, a shard cut short, or (given `samples`, the manifest's
    count) another number of members is a DamagedFile naming the shard, never a silently
    skipped member."""
    how = {"what": "the shard", "remedy": shard_remedy(path)}
    data = read_bytes(path, **how)
    pos, n = 0, 0
    while pos + BLOCK <= len(data) and data[pos]:
        header = data[pos : pos + BLOCK]
        name = header[:100].rstrip(b"\0")
        if header[257:263] != b"ustar\0" or header[156:157] not in (b"0", b"\0") or not name.endswith(b".json"):
            raise DamagedFile(
                path,
                f"has a member at byte {pos} that is not a sample of data_tools' shard writer ({name[:40]!r})",
                **how,
            )
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise DamagedFile(path, f"has a malformed member header at byte {pos}", **how) from None
        pos += BLOCK
        if pos + size > len(data):
            raise DamagedFile(
                path, f"is truncated: its member {name[:-5].decode(errors='replace')} is cut short", **how
            )
        yield name[:-5], data[pos : pos + size]
        n += 1
        pos += -(-size // BLOCK) * BLOCK
    if len(data) - pos < len(_EOF) or any(data[pos:]):
        raise DamagedFile(path, f"is truncated: it ends at byte {len(data):,} without the end-of-archive mark", **how)
    if samples is not None and n != samples:
        raise DamagedFile(path, f"holds {n:,} samples where the manifest says {samples:,}", **how)
