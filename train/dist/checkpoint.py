"""Checkpoints inside a period: DeepSpeed's engine state plus where the data stood.

A checkpoint counts only once every rank has finished writing it: each rank flushes the files
it wrote itself (its ZeRO partition and RNG state; rank 0 also the shared ones) to disk, then
rank 0 writes `COMPLETE.json` (atomically) naming its tag, and only then are older tags pruned.
A save never writes into the complete tag, so a run killed at any moment, even in the middle of a
save or on a full disk, resumes from the last complete checkpoint. Rank 0 alone reads
COMPLETE.json to pick the tag to save or resume, and tells the others: ranks that read it on
their own could disagree (a shared file system's caches) and write or load different tags.
Frozen base weights are not saved (they are in the backbone folder). Each rank also saves its
RNG state (LoRA dropout), loaded back with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from data_tools.atomic import atomic_write_json, writing

COMPLETE = "COMPLETE.json"
AGAIN = "-again"  # the suffix of a second save at the same step (Checkpointer._new_tag)


# The per-rank files of a DeepSpeed checkpoint tag (`zero_pp_rank_<r>_mp_rank_00_model_states.pt`,
# `bf16_zero_pp_rank_<r>_..._optim_states.pt`) and ours (`rng-<r>.pt`); any other file
# (`mp_rank_00_model_states.pt`) is rank 0's.
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|^rng-)(\d+)[_.]")


def files_of_rank(folder: str, rank: int) -> list[str]:
    """The files under a checkpoint tag's folder that rank `rank` wrote."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            m = _RANK_FILE.search(name)
            if (int(m.group(1)) if m else 0) == rank:
                out.append(os.path.join(root, name))
    return sorted(out)


def _fsync(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tag_step(tag: str) -> int:
    """The optimizer step a checkpoint tag was saved at: `step-00000200` or `step-00000200-again`."""
    return int(tag.removeprefix("step-").removesuffix(AGAIN))


class Checkpointer:
    def __init__(self, strategy, folder: str, keep: int):
        self.strategy, self.folder, self.keep = strategy, folder, keep

    def latest(self) -> dict | None:
        try:
            with open(os.path.join(self.folder, COMPLETE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def latest_step(self) -> int:
        """The step of the latest complete checkpoint (0 without one): a resumed period goes on from there."""
        info = self.latest()
        return tag_step(info["tag"]) if info else 0

    def _new_tag(self, step: int) -> str:
        """A tag other than the complete checkpoint's. An epoch that ends on a checkpoint step
        saves that step twice; writing over the complete tag would leave nothing whole to resume
        from if the disk filled (or the job died) midway, so the second save goes beside it."""
        tag = f"step-{step:08d}"
        complete = self.latest()
        return tag + AGAIN if complete and complete["tag"] == tag else tag

    def save(self, engine, step: int, client_state: dict) -> None:
        strategy = self.strategy
        tag = strategy.broadcast_object(self._new_tag(step) if strategy.is_rank0 else None)
        with writing(f"cannot save the checkpoint {tag}", self.folder):
            engine.save_checkpoint(
                self.folder, tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
            )
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save(rng, os.path.join(self.folder, tag, f"rng-{strategy.rank}.pt"))
            _fsync(files_of_rank(os.path.join(self.folder, tag), strategy.rank))  # what this rank wrote
        strategy.barrier()
        if strategy.is_rank0:
            with writing(f"cannot save the checkpoint {tag}", self.folder):
                atomic_write_json(
                    os.path.join(self.folder, COMPLETE),
                    {"tag": tag, "world_size": self.strategy.world_size, "client_state": client_state},
                )
            tags = sorted(d for d in os.listdir(self.folder) if d.startswith("step-") and d != tag)
            for old in tags[: max(0, len(tags) - (self.keep - 1))]:
                shutil.rmtree(os.path.join(self.folder, old), ignore_errors=True)
        self.strategy.barrier()

    def load(self, engine) -> dict | None:
        """Restore the latest complete checkpoint; its client state, or None to start fresh."""
        info = self.strategy.broadcast_object(self.latest() if self.strategy.is_rank0 else None)
        if info is None:
            return None
        if info["world_size"] != self.strategy.world_size:
            raise RuntimeError(
                f"{self.folder} was written by {info['world_size']} ranks and this run has {self.strategy.world_size}: "
                "a ZeRO checkpoint resumes only on the same number of ranks. Rerun with that many, or delete "
                "ds_ckpt/ to restart the period (periods hand over through adapters, on any number of ranks)."
            )
        path, _ = engine.load_checkpoint(
            self.folder,
            tag=info["tag"],
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {info['tag']} from {self.folder}")
        rng = torch.load(os.path.join(self.folder, info["tag"], f"rng-{self.strategy.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return info["client_state"]
