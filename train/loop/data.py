"""From a window's shards to padded micro-batches, the same on every rank count and restart.

Two training objectives (`data.objective`) give two kinds of training items:
- response: one sample per target, streamed from the rank's slice of the shards
  (data_tools.reader) through a seeded shuffle buffer;
- sequence: the window's targets regrouped into chunks of users' sequences
  (data_tools.sequences), built once per period by rank 0 from the whole training split and
  written into the period folder (`sequence_chunks-h<max_history>/`), from which every rank (and
  DataLoader worker) reads only the chunks of its own batches; shuffled by (seed, epoch), and cut
  into the same contiguous per-rank slices.
Validation and test are one sample per target in both.

A rank's micro-batches in an epoch are a deterministic function of (seed, epoch, rank, world
size), cut from that order. DataLoader workers do not change that sequence: the order is known
before anything is read (a list of item indices), worker w prepares the batches j with
(j - start) % workers == w, reading and decoding only their items, and the DataLoader hands
them out round-robin, i.e. in order. So a run resumed at micro-batch `start` (possibly with
another number of workers) continues with exactly the batches the killed run would have trained
on, and two workers read and decode half the samples each.

Every rank must take the same number of steps (a rank that runs out first leaves the others
waiting in a collective), so an epoch has ceil(ceil(N / ranks) / (micro x accumulation)) steps
on every rank: a rank whose slice ends early wraps around to its start (like torch's
DistributedSampler). Evaluation pads instead with fully masked copies, which count for nothing.

Left padding puts every response at the end of its row; the loss needs the output layer only
from the first labelled position of the batch on (`targets`: the labels of those positions).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from dataclasses import dataclass

import torch
import torch.utils.data

from data_tools.readback import DamagedFile
from data_tools.reader import ReadOrder, consumer_slice, epoch_order, read_samples_at, read_split, split_size
from data_tools.sequences import OFFSETS, ChunkFile, window_chunks, write_chunks
from train.loop.loss import IGNORE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochSize:
    """How big one training epoch is, in samples, optimizer steps and micro-batches."""

    samples: int  # training items in the split (samples, or chunks of the sequence objective)
    steps: int  # optimizer steps per epoch (every rank)
    micro_batches: int  # per rank per epoch = steps x accumulation


def epoch_size(samples: int, world_size: int, micro_batch_size: int, accumulation: int) -> EpochSize:
    per_rank = math.ceil(samples / world_size)
    steps = math.ceil(per_rank / (micro_batch_size * accumulation))
    return EpochSize(samples, steps, steps * accumulation)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad encoded examples into tensors. `targets` are the labels from the first labelled
    column of the batch on: the loss needs logits for those positions only."""
    width = max(len(example["input_ids"]) for example in examples)
    rows = len(examples)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    for i, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise ValueError("input_ids and labels differ in length")
        ids[i, width - length :] = torch.tensor(example["input_ids"])
        mask[i, width - length :] = 1
        labels[i, width - length :] = torch.tensor(example["labels"])
    labelled = (labels != IGNORE).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else width - 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
        "targets": labels[:, max(first, 1) :],
    }


class ResponseSamples:
    """The response objective's training items: one sample per target, read from the shards.
    `order` is the rank's slice through a seeded shuffle buffer, as data_tools.reader streams it."""

    def __init__(self, root: str, manifest: dict, window: int, split: str, shuffle_buffer: int):
        self.root, self.manifest, self.window, self.split = root, manifest, window, split
        self.shuffle_buffer = shuffle_buffer

    def __len__(self) -> int:
        return split_size(self.root, self.window, self.split, self.manifest)

    def order(self, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
        return epoch_order(len(self), ReadOrder(rank, world_size, seed, epoch, self.shuffle_buffer))

    def fetch(self, wanted: set[int]):
        """`(index, sample)` of the wanted samples, in stored order."""
        return read_samples_at(self.root, self.window, self.split, wanted, self.manifest)


def sequence_chunks_dir(period_dir: str, max_history: int) -> str:
    return os.path.join(period_dir, f"sequence_chunks-h{max_history}")


def prepare_sequence_chunks(root: str, manifest: dict, window: int, max_history: int, folder: str, strategy) -> None:
    """The window's chunks in `folder`: built from the whole training split by rank 0 alone (the
    other ranks would read the whole split, and hold every chunk, for the share they train on),
    once per period (a resumed run finds them; a folder cut short or edited is built again, with a
    warning: it holds nothing but what the split gives); every rank waits until they are there.
    A damaged shard met on the way is one line for all ranks (`DeepSpeedStrategy.agreeing`)."""
    with strategy.agreeing():
        if strategy.is_rank0:
            build = not os.path.isfile(os.path.join(folder, OFFSETS))
            if not build:
                try:
                    ChunkFile(folder)
                except DamagedFile as e:
                    log.warning(f"{e}: built again")
                    build = True
            if build:
                write_chunks(window_chunks(read_split(root, window, "train", manifest), max_history), folder)


class SequenceChunks:
    """The sequence objective's training items: the chunks of users' sequences in `folder`
    (prepare_sequence_chunks), reshuffled every epoch; only the rank's own are ever read."""

    def __init__(self, folder: str):
        self.file = ChunkFile(folder)

    def __len__(self) -> int:
        return len(self.file)

    def order(self, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
        order = list(range(len(self.file)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        lo, hi = consumer_slice(len(order), rank, world_size)
        return order[lo:hi]

    def fetch(self, wanted: set[int]):
        return self.file.fetch(wanted)


@dataclass
class RankEpoch(torch.utils.data.IterableDataset):
    """One rank's micro-batches for one epoch, from micro-batch `start` on. `pad_with`: "wrap"
    (training: items from the slice's start count again) or "mask" (evaluation: they count for
    nothing)."""

    source: ResponseSamples | SequenceChunks
    window: int
    split: str
    rank: int
    world_size: int
    seed: int
    epoch: int
    micro_batch_size: int
    micro_batches: int
    start: int
    encode: object
    pad_id: int
    pad_with: str

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.source.order(self.rank, self.world_size, self.seed, self.epoch)
        if not order:
            raise ValueError(
                f"rank {self.rank} has no {self.split} samples in window {self.window} "
                f"(the split has fewer samples than ranks)"
            )
        size = self.micro_batch_size
        mine = [j for j in range(self.start, self.micro_batches) if (j - self.start) % workers == worker]
        items = self._items_at([p for j in mine for p in range(j * size, (j + 1) * size)], order)
        for j in mine:
            examples = []
            for p in range(j * size, (j + 1) * size):
                example = self.encode(next(items))
                if p >= len(order) and self.pad_with == "mask":  # a second pass over the slice
                    example = {"input_ids": example["input_ids"], "labels": [IGNORE] * len(example["labels"])}
                examples.append(example)
            yield collate(examples, self.pad_id)

    def _items_at(self, positions: list[int], order: list[int]):
        """The items at these (ascending) positions of the epoch: position p is item order[p % n],
        one pass over the slice per n positions. Each pass reads only its wanted items, in stored
        order; the shuffle buffer keeps positions near their stored place, so few wait in `ready`."""
        n = len(order)
        for _, in_pass in itertools.groupby(positions, key=lambda p: p // n):
            in_pass = [order[p % n] for p in in_pass]
            stored, ready = self.source.fetch(set(in_pass)), {}
            for index in in_pass:
                while index not in ready:
                    k, item = next(stored)
                    ready[k] = item
                yield ready.pop(index)


class WindowData:
    """Loaders over one window's splits for one rank; `encoder` (train/model/vocab.py's SampleEncoder)
    turns an item into token ids and labels, padded with its tokenizer's pad token."""

    def __init__(
        self,
        root: str,
        manifest: dict,
        window: int,
        *,
        settings,
        encoder,
        rank: int,
        world_size: int,
        accumulation: int,
        chunks: str | None = None,
    ):
        """`settings`: the config's data section. `chunks`: with the sequence objective, the folder
        prepare_sequence_chunks filled."""
        self.window, self.settings = window, settings
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.encode, self.pad_id = encoder, encoder.tokenizer.pad_token_id
        if settings.objective == "sequence":
            if chunks is None:
                raise ValueError("the sequence objective reads its chunks from a folder (prepare_sequence_chunks)")
            self.train_source = SequenceChunks(chunks)
        else:
            self.train_source = ResponseSamples(root, manifest, window, "train", settings.shuffle_buffer)
        self.valid_source = ResponseSamples(root, manifest, window, "valid", 0)
        self.train_epoch = epoch_size(len(self.train_source), world_size, settings.micro_batch_size, accumulation)
        self.valid_batches = math.ceil(math.ceil(len(self.valid_source) / world_size) / settings.eval_batch_size)

    def _loader(self, dataset) -> torch.utils.data.DataLoader:
        workers = self.settings.num_workers
        # A generator of its own: a DataLoader draws its workers' seed from the global RNG when
        # iterated, which would shift LoRA dropout's random stream in a resumed run.
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            generator=torch.Generator(),
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            # Page-locked batches: the trainer's copy to the GPU (non_blocking) then does not wait.
            pin_memory=torch.cuda.is_available(),
        )

    def train(self, epoch: int, start: int = 0):
        return self._loader(
            RankEpoch(
                source=self.train_source,
                window=self.window,
                split="train",
                rank=self.rank,
                world_size=self.world_size,
                seed=self.settings.seed,
                epoch=epoch,
                micro_batch_size=self.settings.micro_batch_size,
                micro_batches=self.train_epoch.micro_batches,
                start=start,
                encode=self.encode,
                pad_id=self.pad_id,
                pad_with="wrap",
            )
        )

    def valid(self):
        return self._loader(
            RankEpoch(
                source=self.valid_source,
                window=self.window,
                split="valid",
                rank=self.rank,
                world_size=self.world_size,
                seed=0,
                epoch=0,
                micro_batch_size=self.settings.eval_batch_size,
                micro_batches=self.valid_batches,
                start=0,
                encode=self.encode,
                pad_id=self.pad_id,
                pad_with="mask",
            )
        )
