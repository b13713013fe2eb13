"""A window's training targets regrouped as one sequence per user, cut into chunks: the unit of the
`sequence` training objective.

The shards hold one sample per target (`{"user", "history", "target", ...}`, key
`<user>_<window>_<position>`). A user's training targets in a window are consecutive items of
their stream, so the sequence is the first target's history (what the user did before the
window, up to `max_history` items) followed by every target, in stream order.

A chunk holds at most `max_history + 1` items: context, then the targets it trains, each
target in exactly one chunk, its history being the items before it in the chunk. Chunks are
cut so that a user whose targets fit after some context gets one chunk with as much context as
fits; a longer sequence is cut into chunks whose targets see at least `max_history // 2` items
of history (less only where the user has no more). So every training target (a sample of the
response objective) is trained once per epoch, from the same kind of history, in one causal pass
per chunk. A window's chunks are built once and written to a folder (`write_chunks`), from which
`ChunkFile` reads any of them by position.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator

import numpy as np
import orjson

from data_tools.atomic import written_aside
from data_tools.readback import DamagedFile, load_npy, read_size


def _position(sample: dict) -> int:
    return int(sample["key"].rsplit("_", 1)[1])


def user_sequences(samples: Iterable[dict]) -> list[dict]:
    """{"user", "context", "targets"} per user, sorted by user id; `samples` are one window's
    training samples (any order, with their shard `key`)."""
    by_user: dict[int, list[dict]] = {}
    for s in samples:
        by_user.setdefault(s["user"], []).append(s)
    out = []
    for user in sorted(by_user):
        ordered = sorted(by_user[user], key=_position)
        for prev, cur in itertools.pairwise(ordered):
            if _position(cur) != _position(prev) + 1 or not cur["history"] or cur["history"][-1] != prev["target"]:
                raise ValueError(
                    f"user {user}'s training targets are not consecutive items of their stream "
                    f"(samples {prev['key']} and {cur['key']}); was the dataset made by data_tools convert?"
                )
        out.append({"user": user, "context": list(ordered[0]["history"]), "targets": [s["target"] for s in ordered]})
    return out


def chunk_sequence(sequence: dict, max_history: int) -> list[dict]:
    """{"user", "items", "first_target"} chunks of one user's sequence (see the module doc)."""
    size = max_history + 1
    least = max_history // 2  # context of a target that opens a later chunk
    context = sequence["context"][-max_history:] if max_history else []
    full = context + list(sequence["targets"])
    first, n = len(context), len(sequence["targets"])
    chunks, i = [], 0
    while i < n:
        p = first + i
        lo = max(0, p - max(least, size - (n - i)))
        hi = min(lo + size, len(full))
        chunks.append({"user": sequence["user"], "items": full[lo:hi], "first_target": p - lo})
        i = hi - first
    return chunks


def window_chunks(samples: Iterable[dict], max_history: int) -> list[dict]:
    """Every chunk of a window's training samples, in user order."""
    return [c for seq in user_sequences(samples) for c in chunk_sequence(seq, max_history)]


# ---- chunks on disk: built once, read by position -------------------------------------------------

CHUNKS, OFFSETS = "chunks.jsonl", "offsets.npy"


def write_chunks(chunks: list[dict], folder: str) -> None:
    """`folder` (atomically): the chunks as JSON lines, plus each line's byte offset, so that a
    reader fetches any chunk by position without reading the others."""
    lines = [orjson.dumps(c) + b"\n" for c in chunks]
    offsets = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum([len(line) for line in lines], out=offsets[1:])
    with written_aside("cannot write the sequence chunks", folder) as tmp:
        with open(os.path.join(tmp, CHUNKS), "wb") as f:
            f.writelines(lines)
        np.save(os.path.join(tmp, OFFSETS), offsets)


def chunks_remedy(folder: str) -> str:
    return f"delete the folder {folder}: it is built again from the dataset as the period starts"


class ChunkFile:
    """The chunks `write_chunks` wrote: their number, and any of them by position. A folder cut
    short or edited is a DamagedFile naming the file."""

    def __init__(self, folder: str):
        self.folder = folder
        how = {"what": "the sequence chunks' offsets", "remedy": chunks_remedy(folder)}
        path = os.path.join(folder, OFFSETS)
        self.offsets = load_npy(path, **how, mmap_mode="r")
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets.dtype.kind != "i" or self.offsets[0] != 0:
            raise DamagedFile(path, "does not hold the chunks' byte offsets (overwritten?)", **how)
        chunks = os.path.join(folder, CHUNKS)
        size = read_size(chunks, what="the sequence chunks", remedy=chunks_remedy(folder))
        if size != int(self.offsets[-1]):
            raise DamagedFile(
                chunks,
                f"is damaged: {size:,} bytes where its offsets say {int(self.offsets[-1]):,}",
                what="the sequence chunks",
                remedy=chunks_remedy(folder),
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def fetch(self, wanted: Iterable[int]) -> Iterator[tuple[int, dict]]:
        """`(position, chunk)` for the wanted positions, in file order: one seek and read each."""
        path = os.path.join(self.folder, CHUNKS)
        with open(path, "rb") as f:
            for k in sorted(wanted):
                start, end = int(self.offsets[k]), int(self.offsets[k + 1])
                f.seek(start)
                try:
                    chunk = orjson.loads(f.read(end - start))
                except orjson.JSONDecodeError:
                    raise DamagedFile(
                        path,
                        f"has a chunk {k} that is not JSON (overwritten or edited?)",
                        what="the sequence chunks",
                        remedy=chunks_remedy(self.folder),
                    ) from None
                yield k, chunk
