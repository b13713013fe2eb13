"""Deterministic WebDataset shards: plain POSIX tar files, one `<key>.json` member per sample.

The writer emits ustar headers itself with every metadata field fixed (mtime 0, uid/gid 0, mode
0644, no user names), so the same samples always give the same bytes; `tarfile` and
`webdataset.TarWriter` stamp the current time and take several times longer per member, which
matters when a conversion writes millions of members. Shards are read back with webdataset.
"""

from __future__ import annotations

import hashlib
import os

BLOCK = 512
_EOF = b"\0" * (2 * BLOCK)


def _header(name: bytes, size: int) -> bytes:
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"  # mtime: 0 keeps shards byte-identical across runs
    h[148:156] = b"        "  # checksum field counts as spaces while summing
    h[156] = ord("0")  # regular file
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class ShardWriter:
    """Write `(key, payload)` samples into `<prefix>-NNNNNN.tar` files of at most `per_shard` samples."""

    def __init__(self, folder: str, prefix: str, per_shard: int):
        self.folder, self.prefix, self.per_shard = folder, prefix, per_shard
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def _open(self):
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = os.path.join(self.folder, name)
        self._f = open(self._path + ".tmp", "wb")
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._n = 0
        self.shards.append({"name": name, "samples": 0})

    def _emit(self, b: bytes):
        self._f.write(b)
        self._sha.update(b)
        self._bytes += len(b)

    def write(self, key: str, payload: bytes) -> None:
        if self._f is None:
            self._open()
        self._emit(_header(key.encode() + b".json", len(payload)))
        pad = -len(payload) % BLOCK
        self._emit(payload + b"\0" * pad)
        self._n += 1
        if self._n == self.per_shard:
            self._close()

    def _close(self):
        self._emit(_EOF)
        self._f.close()
        os.replace(self._path + ".tmp", self._path)
        self.shards[-1].update(samples=self._n, bytes=self._bytes, sha256=self._sha.hexdigest())
        self._f = None

    def finish(self) -> list[dict]:
        if self._f is not None:
            self._close()
        return self.shards
