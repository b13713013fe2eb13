"""From a window's shards to padded micro-batches, the same on every rank count and restart.

A rank's micro-batches in an epoch are a deterministic function of (seed, epoch, rank, world
size): the rank's slice of the split (data_tools.reader), shuffled with a seeded buffer, cut
into micro-batches. DataLoader workers do not change that sequence: worker w prepares the
batches j with (j - start) % workers == w, and the DataLoader hands them out round-robin, i.e.
in order. So a run resumed at micro-batch `start` (possibly with another number of workers)
continues with exactly the batches the killed run would have trained on.

Every rank must take the same number of steps (a rank that runs out first leaves the others
waiting in a collective), so an epoch has ceil(ceil(N / ranks) / (micro x accumulation)) steps
on every rank: a rank whose slice ends early wraps around to its start (like torch's
DistributedSampler). Evaluation pads instead with fully masked copies, which count for nothing.

Left padding puts every response (the item code tokens and EOS) at the end of the sequence, so
the loss needs the output layer on the last `response_len + 1` positions only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.utils.data

from data_tools.reader import split_size, window_split

IGNORE = -100


@dataclass(frozen=True)
class EpochPlan:
    samples: int  # in the split
    steps: int  # optimizer steps per epoch (every rank)
    micro_batches: int  # per rank per epoch = steps x accumulation


def plan_epoch(samples: int, world_size: int, micro_batch_size: int, accumulation: int) -> EpochPlan:
    per_rank = math.ceil(samples / world_size)
    steps = math.ceil(per_rank / (micro_batch_size * accumulation))
    return EpochPlan(samples, steps, steps * accumulation)


def collate(examples: list[dict], pad_id: int, response_len: int) -> dict[str, torch.Tensor]:
    """Left-pad encoded examples into tensors; every response must have `response_len` tokens."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, width - k:] = torch.tensor(e["input_ids"])
        mask[i, width - k:] = 1
        labels[i, width - k:] = torch.tensor(e["labels"])
    tail = labels[:, -response_len:]
    if ((labels != IGNORE).sum(1) > response_len).any() or (labels[:, :-response_len] != IGNORE).any():
        raise ValueError("every response must be the last response_len tokens")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "labels": labels, "targets": tail}


@dataclass
class RankEpoch(torch.utils.data.IterableDataset):
    """One rank's micro-batches for one epoch, from micro-batch `start` on. `pad_with`: "wrap"
    (training: samples from the slice's start count again) or "mask" (evaluation: they count
    for nothing)."""

    root: str
    manifest: dict
    window: int
    split: str
    rank: int
    world_size: int
    seed: int
    epoch: int
    shuffle_buffer: int
    micro_batch_size: int
    micro_batches: int
    start: int
    encode: object
    pad_id: int
    response_len: int
    pad_with: str

    def _samples(self):
        def one_pass():
            return window_split(self.root, self.window, self.split, rank=self.rank, world_size=self.world_size,
                                seed=self.seed, epoch=self.epoch, shuffle_buffer=self.shuffle_buffer,
                                manifest=self.manifest, split_by_worker=False)

        first = True
        while True:
            n = 0
            for s in one_pass():
                n += 1
                yield s, first
            if n == 0:
                raise ValueError(f"rank {self.rank} has no {self.split} samples in window {self.window} "
                                 f"(the split has fewer samples than ranks)")
            first = False

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self._samples()
        for j in range(self.micro_batches):
            batch = list(itertools.islice(stream, self.micro_batch_size))
            if j < self.start or (j - self.start) % workers != worker:
                continue
            examples = []
            for sample, fresh in batch:
                e = self.encode(sample)
                if not fresh and self.pad_with == "mask":
                    e = {"input_ids": e["input_ids"], "labels": [IGNORE] * len(e["labels"])}
                examples.append(e)
            yield collate(examples, self.pad_id, self.response_len)


class WindowData:
    """Loaders over one window's splits for one rank."""

    def __init__(self, root: str, manifest: dict, window: int, cfg, rank: int, world_size: int,
                 accumulation: int, encode, pad_id: int, response_len: int):
        self.root, self.manifest, self.window, self.cfg = root, manifest, window, cfg
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.encode, self.pad_id, self.response_len = encode, pad_id, response_len
        self.train_plan = plan_epoch(split_size(root, window, "train", manifest), world_size,
                                     cfg.data.micro_batch_size, accumulation)
        valid = split_size(root, window, "valid", manifest)
        self.valid_batches = math.ceil(math.ceil(valid / world_size) / cfg.data.eval_batch_size)

    def _loader(self, dataset) -> torch.utils.data.DataLoader:
        workers = self.cfg.data.num_workers
        # A generator of its own: a DataLoader draws its workers' seed from the global RNG when
        # iterated, which would shift LoRA dropout's random stream in a resumed run.
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, generator=torch.Generator(),
                                           persistent_workers=False, prefetch_factor=4 if workers else None)

    def train(self, epoch: int, start: int = 0):
        return self._loader(RankEpoch(
            root=self.root, manifest=self.manifest, window=self.window, split="train", rank=self.rank,
            world_size=self.world_size, seed=self.cfg.data.seed, epoch=epoch, shuffle_buffer=self.cfg.data.shuffle_buffer,
            micro_batch_size=self.cfg.data.micro_batch_size, micro_batches=self.train_plan.micro_batches, start=start,
            encode=self.encode, pad_id=self.pad_id, response_len=self.response_len, pad_with="wrap"))

    def valid(self):
        return self._loader(RankEpoch(
            root=self.root, manifest=self.manifest, window=self.window, split="valid", rank=self.rank,
            world_size=self.world_size, seed=0, epoch=0, shuffle_buffer=0, micro_batch_size=self.cfg.data.eval_batch_size,
            micro_batches=self.valid_batches, start=0, encode=self.encode, pad_id=self.pad_id,
            response_len=self.response_len, pad_with="mask"))
