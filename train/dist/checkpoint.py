"""Checkpoints inside a period: DeepSpeed's engine state plus where the data stood.

A checkpoint counts only once every rank has finished writing it: each rank flushes the files
it wrote itself (its ZeRO partition and RNG state; rank 0 also the shared ones) to disk, then
rank 0 writes the tag's completion mark `COMPLETE-<tag>.json` (the tag, the client state and
every rank's files with their sizes) and `COMPLETE.json` (the same, for the newest), atomically,
and only then are older tags pruned. A save never writes into the complete tag, so a run killed
at any moment, even in the middle of a save or on a full disk, resumes from the last complete
checkpoint. Rank 0 alone reads the marks to pick the tag to save or resume, and tells the
others: ranks that read them on their own could disagree (a shared file system's caches) and
write or load different tags. Before a resume every rank checks its own files of the chosen
checkpoint against the mark; one with a file missing or cut short on any rank, or a damaged
mark, is skipped with a warning for the newest whole one before it (`checkpoint.keep` keeps
that many): a checkpoint is never loaded half. Frozen base weights are not saved (they are in
the backbone folder). Each rank also saves its RNG state (LoRA dropout), loaded back with
`weights_only=True`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time

import torch

from data_tools.atomic import atomic_write_json, writing
from data_tools.readback import DamagedFile, read_json

log = logging.getLogger(__name__)

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
            if _rank_of(name) == rank:
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
    return int(tag.removeprefix("step-").split("-")[0])


def tag_mark(tag: str) -> str:
    """The file name of a tag's own completion mark, beside its folder."""
    return f"COMPLETE-{tag}.json"


MARK_FIELDS = {"tag": str, "world_size": int, "client_state": dict}


def has_checkpoint(folder: str) -> bool:
    """Whether a period's checkpoint folder holds a checkpoint that a run may resume from (a
    completion mark, whole or not: the resume decides, `Checkpointer.load`)."""
    return os.path.isdir(folder) and any(n == COMPLETE or n.startswith("COMPLETE-") for n in os.listdir(folder))


class Checkpointer:
    def __init__(self, strategy, folder: str, keep: int):
        self.strategy, self.folder, self.keep = strategy, folder, keep
        self.loaded: str | None = None  # the tag this run resumed from: never written into

    # ---- the complete checkpoints, newest first -------------------------------------------------

    def _read_mark(self, name: str, problems: list[str]) -> dict | None:
        """A completion mark (None if missing); a damaged one is noted in `problems` and skipped."""
        try:
            mark = read_json(
                os.path.join(self.folder, name), what="the checkpoint mark", missing=None, fields=MARK_FIELDS
            )
        except DamagedFile as e:
            problems.append(str(e))
            return None
        if mark is not None and not os.path.isdir(os.path.join(self.folder, os.path.basename(mark["tag"]))):
            problems.append(f"checkpoint {mark['tag']} in {self.folder} is gone (its mark {name} is left)")
            return None
        return mark

    def candidates(self, problems: list[str] | None = None) -> list[dict]:
        """The completion marks of the folder, newest first: COMPLETE.json's, then each tag's own
        (checkpoints written since tags have their own mark), by step and time of saving. A mark
        that is missing, cut short or names no folder is left out (noted in `problems`)."""
        problems = [] if problems is None else problems
        if not os.path.isdir(self.folder):
            return []
        latest = self._read_mark(COMPLETE, problems)
        marks = []
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("COMPLETE-") and name.endswith(".json"):
                mark = self._read_mark(name, problems)
                if mark is not None:
                    marks.append(mark)
        marks.sort(key=lambda m: (tag_step(m["tag"]), m.get("saved", 0)), reverse=True)
        out = [latest] if latest is not None else []
        return out + [m for m in marks if latest is None or m["tag"] != latest["tag"]]

    def latest(self) -> dict | None:
        """The newest complete checkpoint's mark, as far as the marks tell (no file looked at)."""
        found = self.candidates()
        return found[0] if found else None

    def latest_step(self) -> int:
        """The step of the latest complete checkpoint (0 without one): a resumed period goes on from there."""
        info = self.latest()
        return tag_step(info["tag"]) if info else 0

    def _intact(self, mark: dict) -> bool:
        """Whether this rank's files of a checkpoint are there, each of the size its mark records
        (a mark of before tags had their own: its folder, and this rank's RNG state)."""
        if mark["world_size"] != self.strategy.world_size:
            return True  # not a damage: `load` refuses it in one line
        tag = os.path.join(self.folder, os.path.basename(mark["tag"]))
        files = mark.get("files")
        if not isinstance(files, dict):
            return os.path.isfile(os.path.join(tag, f"rng-{self.strategy.rank}.pt"))
        mine = {name: size for name, size in files.items() if _rank_of(name) == self.strategy.rank}
        if not mine:
            return False
        for name, size in mine.items():
            try:
                if os.path.getsize(os.path.join(tag, name)) != size:
                    return False
            except OSError:
                return False
        return True

    # ---- saving ----------------------------------------------------------------------------------

    def _new_tag(self, step: int) -> str:
        """A tag other than the complete checkpoint's and the one this run resumed from. An
        epoch that ends on a checkpoint step saves that step twice; writing over the complete tag
        would leave nothing whole to resume from if the disk filled (or the job died) midway, so
        the second save goes beside it. A folder written into loses its own mark first."""
        latest = self.latest()
        keep = {latest["tag"] if latest else None, self.loaded}
        tag = f"step-{step:08d}"
        while tag in keep:
            tag += AGAIN
        stale = os.path.join(self.folder, tag_mark(tag))
        if os.path.exists(stale):
            os.unlink(stale)
        return tag

    def save(self, engine, step: int, client_state: dict) -> None:
        strategy = self.strategy
        tag = strategy.broadcast_object(self._new_tag(step) if strategy.is_rank0 else None)
        folder = os.path.join(self.folder, tag)
        with writing(f"cannot save the checkpoint {tag}", self.folder):
            engine.save_checkpoint(
                self.folder, tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
            )
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save(rng, os.path.join(folder, f"rng-{strategy.rank}.pt"))
            mine = files_of_rank(folder, strategy.rank)
            _fsync(mine)  # what this rank wrote
            sizes = {os.path.relpath(p, folder): os.path.getsize(p) for p in mine}
        # every rank has written and flushed its files (rank 0 waits for all of them here)
        every = strategy.gather_to_rank0(sizes)
        if strategy.is_rank0:
            mark = {
                "tag": tag,
                "world_size": self.strategy.world_size,
                "client_state": client_state,
                "files": {name: size for part in every for name, size in part.items()},
                "saved": time.time(),
            }
            with writing(f"cannot save the checkpoint {tag}", self.folder):
                atomic_write_json(os.path.join(self.folder, tag_mark(tag)), mark)
                atomic_write_json(os.path.join(self.folder, COMPLETE), mark)
            tags = sorted(
                d
                for d in os.listdir(self.folder)
                if d.startswith("step-") and d not in (tag, self.loaded) and os.path.isdir(os.path.join(self.folder, d))
            )
            for old in tags[: max(0, len(tags) - (self.keep - 1))]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, tag_mark(old)))
                shutil.rmtree(os.path.join(self.folder, old), ignore_errors=True)
        self.strategy.barrier()

    # ---- resuming --------------------------------------------------------------------------------

    def load(self, engine) -> dict | None:
        """Restore the newest complete checkpoint whose files are whole on every rank; its client
        state, or None to start fresh. A checkpoint with a file missing or cut short on any rank,
        or a mark that is damaged, is skipped (rank 0 warns) for the newest whole one before it:
        a checkpoint is never loaded half."""
        strategy = self.strategy
        problems: list[str] = []
        found = strategy.broadcast_object(self.candidates(problems) if strategy.is_rank0 else None)
        broken = strategy.all_reduce_sum([0.0 if self._intact(m) else 1.0 for m in found]) if found else []
        info = next((m for m, bad in zip(found, broken) if not bad), None)
        if strategy.is_rank0:
            for problem in problems:
                log.warning(f"{problem}; a checkpoint mark is skipped")
            for mark, bad in zip(found, broken):
                if mark is info:
                    break
                if bad:
                    after = (
                        f"resuming from {info['tag']}"
                        if info
                        else "no whole one is left: the period trains from its start"
                    )
                    log.warning(
                        f"checkpoint {mark['tag']} in {self.folder} is damaged (a file of it is missing or cut short "
                        f"on {int(bad)} rank(s)); it is skipped, {after}"
                    )
            if info is None and problems and not found:
                log.warning(f"no whole checkpoint is left in {self.folder}: the period trains from its start")
        if info is None:
            return None
        if info["world_size"] != strategy.world_size:
            strategy.agree(
                f"{self.folder} was written by {info['world_size']} ranks and this run has {strategy.world_size}: "
                "a ZeRO checkpoint resumes only on the same number of ranks. Rerun with that many, or add "
                "--restart-period to train the period from its start (periods hand over through adapters, "
                "on any number of ranks)"
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
        rng = torch.load(os.path.join(self.folder, info["tag"], f"rng-{strategy.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.loaded = info["tag"]
        return info["client_state"]


def _rank_of(name: str) -> int:
    m = _RANK_FILE.search(os.path.basename(name))
    return int(m.group(1)) if m else 0
