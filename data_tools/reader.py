"""Reading a dataset folder's samples back: one window's split, split by rank and worker.

`window_split` streams a split as a WebDataset pipeline. Each consumer (rank x DataLoader
worker) reads one contiguous slice of the split's samples, cut by sample count, not by shard: a
window with fewer shards than consumers (common: a small window on many GPUs) still gives every
consumer its share, every sample is read exactly once, and the ranks' counts differ by at most
one. Shards outside a consumer's slice are never opened. The converter already stored training
samples in a seeded random order, so contiguous slices are random subsets; a shuffle buffer
seeded by (seed, epoch, consumer) reorders them each epoch (`ReadOrder`). Everything is
deterministic, so a resumed run replays the same order and skips what it has seen.

The trainer (train/loop/data.py) reads by index instead: `epoch_order` gives the order of a rank's
slice without reading a sample (a shuffle buffer never looks at what it shuffles), and
`read_samples_at` reads and decodes only the samples a DataLoader worker's batches need.
`read_split` and `iter_split` read a whole split in stored order, for what one process needs
whole (a window's user sequences, its popular items, its test users).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import orjson
import torch.utils.data
import webdataset as wds

from data_tools.dataset import load_manifest, shard_remedy, split_shards
from data_tools.readback import DamagedFile
from data_tools.shards import read_tar


@dataclass(frozen=True)
class ReadOrder:
    """Which samples of a split a rank reads, and in what order: rank `rank` of `world_size`
    reads its contiguous slice (each DataLoader worker a slice of that), through a shuffle buffer
    of `shuffle_buffer` samples seeded by (seed, epoch, consumer) (no shuffle for 0 or 1)."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")


def consumer_slice(n: int, consumer: int, consumers: int) -> tuple[int, int]:
    """Global sample range [lo, hi) of one consumer; ranges tile 0..n and differ by <= 1 in size."""
    return consumer * n // consumers, (consumer + 1) * n // consumers


def _consumer(rank: int, world_size: int) -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def _shuffled(src, order: ReadOrder, consumer: int):
    """The consumer's seeded shuffle buffer over `src` (samples, or their indices: the same order)."""
    rng = random.Random(f"{order.seed}/{order.epoch}/{consumer}")
    return wds.shuffle(order.shuffle_buffer, initial=order.shuffle_buffer, rng=rng)(src)


class _SliceSource(torch.utils.data.IterableDataset):
    """Yields the raw tar samples of this consumer's slice (resolved inside the worker)."""

    def __init__(self, shards: list[tuple[str, int]], rank: int, world_size: int):
        self.shards, self.rank, self.world_size = shards, rank, world_size

    def __iter__(self):
        consumer, consumers = _consumer(self.rank, self.world_size)
        lo, hi = consumer_slice(sum(n for _, n in self.shards), consumer, consumers)
        start = 0
        for path, n in self.shards:
            if start + n > lo and start < hi:
                for g, (key, payload) in enumerate(read_tar(path, n), start=start):
                    if g >= hi:
                        break
                    if g >= lo:
                        yield {"__key__": key.decode(), "json": payload, "__url__": path}
            start += n
            if start >= hi:
                return


class _ConsumerShuffle(wds.PipelineStage):
    def __init__(self, order: ReadOrder):
        self.order = order

    def run(self, src):
        consumer, _ = _consumer(self.order.rank, self.order.world_size)
        return _shuffled(src, self.order, consumer)


def _decode(sample: dict) -> dict:
    return decode_sample(sample["json"], sample["__key__"], sample["__url__"])


def decode_sample(payload: bytes, key: str, path: str) -> dict:
    """A shard member's sample, with its `key`; a member that is not one is a DamagedFile naming
    the shard."""
    try:
        sample = orjson.loads(payload)
    except orjson.JSONDecodeError:
        sample = None
    if not isinstance(sample, dict) or not {"user", "history", "target"} <= sample.keys():
        raise DamagedFile(
            path,
            f"has a sample {key} that is not one (overwritten or edited?)",
            what="the shard",
            remedy=shard_remedy(path),
        )
    sample["key"] = key
    return sample


def window_split(
    root: str, window: int, split: str, order: ReadOrder = ReadOrder(), *, manifest: dict | None = None
) -> wds.DataPipeline:
    """Samples (`user`, `history`, `target`, `ts`, `group`, `key`) of one window's split for the
    rank of `order` (by default all of them, in stored order); iterate it directly or wrap it in
    a torch DataLoader (its workers split it further)."""
    shards = split_shards(root, manifest or load_manifest(root), window, split)
    stages = [_SliceSource(shards, order.rank, order.world_size)]
    if order.shuffle_buffer > 1:
        stages.append(_ConsumerShuffle(order))
    stages.append(wds.map(_decode))
    return wds.DataPipeline(*stages)


def epoch_order(n: int, order: ReadOrder) -> list[int]:
    """The indices of a split of `n` samples that `window_split` with this `order` (iterated
    without DataLoader workers) gives, in its order, computed without reading a sample: the
    shuffle buffer draws from its own seeded generator and never looks at the samples, so
    shuffling the indices gives the same order as shuffling the samples."""
    lo, hi = consumer_slice(n, order.rank, order.world_size)
    if order.shuffle_buffer <= 1:
        return list(range(lo, hi))
    return list(_shuffled(iter(range(lo, hi)), order, order.rank))


def read_samples_at(root: str, window: int, split: str, wanted: set[int], manifest: dict | None = None):
    """`(index, sample)` for the split's samples whose index is in `wanted`, in stored order.
    Shards without a wanted sample are not opened, and only the wanted samples are decoded: a
    DataLoader worker reads what its own batches need."""
    if not wanted:
        return
    lo, hi = min(wanted), max(wanted) + 1
    start = 0
    for path, n in split_shards(root, manifest or load_manifest(root), window, split):
        if start < hi and start + n > lo and any(g in wanted for g in range(max(start, lo), min(start + n, hi))):
            for g, (key, payload) in enumerate(read_tar(path, n), start=start):
                if g in wanted:
                    yield g, decode_sample(payload, key.decode(), path)
        start += n


def split_size(root: str, window: int, split: str, manifest: dict | None = None) -> int:
    return sum(n for _, n in split_shards(root, manifest or load_manifest(root), window, split))


def read_split(root: str, window: int, split: str, manifest: dict | None = None) -> list[dict]:
    """Every sample of one window's split, in stored order, read at once (for the whole-split
    needs of one process: a window's user sequences, its popular items, its test users)."""
    return list(iter_split(root, window, split, manifest))


def iter_split(root: str, window: int, split: str, manifest: dict | None = None):
    """Every sample of one window's split, in stored order, one at a time (as `read_split`, without
    holding the split in memory: one pass for what a whole split is counted for)."""
    for path, n in split_shards(root, manifest or load_manifest(root), window, split):
        for key, payload in read_tar(path, n):
            yield decode_sample(payload, key.decode(), path)
