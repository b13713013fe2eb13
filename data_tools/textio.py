"""Streaming line reader for plain or gzip files, hashing the raw bytes as it goes.

Reading in large chunks and splitting on newlines is several times faster than iterating a
GzipFile line by line, and hashing while reading avoids a second pass over a multi-GB input.
Gzip input is read, hashed and decompressed on a second thread (ISA-L and hashlib release the
GIL), so parsing on the main thread overlaps with it. A UTF-8 byte-order mark at the start of the
text (Windows tools and some exporters write one) is dropped here, where the text starts, so
every format reads its first record like any other; the hash still covers the file's own bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator

from isal import igzip_threaded, isal_zlib

from data_tools.accounting import InputError
from data_tools.progress import progress_bar

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"


class _HashingReader:
    """A raw file wrapper that feeds every byte read into sha256 and a progress bar."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar
        self.sha = hashlib.sha256()

    def read(self, n=-1):
        b = self.f.read(n)
        self.sha.update(b)
        if self.bar is not None:
            self.bar.update(len(b))
        return b

    def readinto(self, buf):
        n = self.f.readinto(buf)
        self.sha.update(memoryview(buf)[:n])
        if self.bar is not None:
            self.bar.update(n)
        return n

    def drain(self):
        while self.read(CHUNK):
            pass


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def open_input(path: str):
    """Open an input for reading; failing to is bad input (named), not a crash."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read it ({e.strerror or e})", path) from None


class LineStream:
    """Iterate `(line_number, bytes)` over a plain or gzip file; `sha256` is set once exhausted."""

    def __init__(self, path: str, desc: str | None = None, progress: bool = True):
        if not os.path.isfile(path):
            raise InputError("no such file", path)
        self.path = path
        self.size = os.path.getsize(path)
        self.desc = desc or os.path.basename(path)
        self.progress = progress
        self.sha256: str | None = None

    def chunks(self) -> Iterator[tuple[int, list[bytes]]]:
        """(number of the first line, lines) per ~1 MiB block: the cheap way through big files."""
        with open_input(self.path) as raw_file:
            gz = raw_file.read(2) == GZIP_MAGIC
            raw_file.seek(0)
            bar = progress_bar(total=self.size, unit="B", unit_scale=True, desc=self.desc, enabled=self.progress)
            raw = _HashingReader(raw_file, bar)
            # ISA-L's gzip decoder: the same format, about 4x faster than the zlib one; on its
            # own thread, which also does the raw reads and the hashing.
            stream = igzip_threaded.open(raw, "rb", threads=1, block_size=CHUNK) if gz else raw
            lineno, rest = 0, b""
            try:
                while True:
                    try:
                        chunk = stream.read(CHUNK)
                    except (EOFError, gzip.BadGzipFile, zlib.error, isal_zlib.error) as e:
                        raise InputError(
                            f"corrupt or truncated gzip stream after line {lineno} ({e})", self.path, lineno + 1
                        ) from None
                    except OSError as e:
                        raise InputError(
                            f"cannot read it after line {lineno} ({e.strerror or e})", self.path, lineno + 1
                        ) from None
                    if not chunk:
                        break
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    if lines:
                        if lineno == 0:  # the first line is whole only now, however the chunks fell
                            lines[0] = lines[0].removeprefix(BOM)
                        yield lineno + 1, lines
                        lineno += len(lines)
                if rest:
                    yield lineno + 1, [rest.removeprefix(BOM) if lineno == 0 else rest]
                # The reader thread handed over the end of the stream as its last act, so the
                # bytes after it (if any) are ours to hash.
                raw.drain()
                self.sha256 = raw.sha.hexdigest()
            finally:
                if gz:
                    stream.close()  # joins the reader thread, also when parsing stopped early
                bar.close()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for first, lines in self.chunks():
            yield from enumerate(lines, first)
