"""What one period does, decided once before any rank trains (`PeriodPlan`), and the folders a
period's model comes from.

Every period trains LoRA (plus the rows of the item code tokens) on a frozen backbone, starting
from period t-1's exported adapter, except period 0 with `model.period0: full`, which trains the
whole model; its export is then the backbone of every later period. `trains_in_full` is the one
place that says which; the rest of train/ is handed the plan, or asks the functions below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from data_tools.readback import DamagedFile
from train.common.config import Config, period_epochs
from train.common.run_folder import RunFolder
from train.methods.registry import method


def trains_in_full(cfg: Config, period: int) -> bool:
    """Period `period` trains the whole model (else LoRA and the code-token rows)."""
    return cfg.model.period0 == "full" and period == 0


def backbone_dir(cfg: Config, run: RunFolder, period: int) -> str:
    """The weights a period starts from: after a full period 0, its exported model; else
    `model.path` or the run's random-weight backbone (`<run>/base/`)."""
    if period > 0 and trains_in_full(cfg, 0):
        return run.model_dir(0)
    return cfg.model.path if cfg.model.path else run.base_dir


def evaluated_model_dir(cfg: Config, run: RunFolder, period: int) -> str:
    """The folder a period's evaluated model loads from: its own export after full training, else
    its backbone (the period's adapter goes on top)."""
    return run.model_dir(period) if trains_in_full(cfg, period) else backbone_dir(cfg, run, period)


def export_dir(cfg: Config, run: RunFolder, period: int) -> str:
    """Where a period exports its best epoch: the whole model, or the adapter."""
    return run.model_dir(period) if trains_in_full(cfg, period) else run.adapter_dir(period)


def start_adapter(cfg: Config, run: RunFolder, period: int) -> str | None:
    """The adapter a LoRA period starts from (and is pulled toward): period t-1's export."""
    if period == 0:
        return None
    path = run.adapter_dir(period - 1)
    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        return path
    if period == 1 and trains_in_full(cfg, 0):
        return None  # period 0 trained the whole model; the first adapter starts fresh
    if period - 1 in run.state()["done"]:  # finished, then its adapter was deleted: not trained again
        raise DamagedFile(
            os.path.join(path, "adapter_model.safetensors"),
            "is missing",
            what=f"period {period - 1}'s adapter, which period {period} starts from,",
            remedy=f"period {period - 1} is finished and never trains again: put {path} back from a copy, "
            "or start a new run folder",
        )
    raise FileNotFoundError(
        f"period {period} starts from period {period - 1}'s adapter, and {path} has none; "
        f"train period {period - 1} first"
    )


def frozen_adapter_periods(cfg: Config, name: str, period: int) -> list[int]:
    """The earlier periods whose adapters method `name` adds, frozen, to this period's model
    (the cumulative methods: train/methods/registry.py, `freezes`)."""
    first = 1 if trains_in_full(cfg, 0) else 0  # a full period 0 has no adapter
    return method(name).frozen_periods(first, period)


@dataclass(frozen=True)
class PeriodPlan:
    """Everything a period's set-up decides from the config and the run folder alone."""

    period: int
    full: bool  # trains the whole model (else LoRA and the code-token rows)
    backbone: str  # the folder the model loads from
    start_adapter: str | None  # LoRA: the adapter it starts from (period t-1's export), if any
    anchor: str | None  # a method with an anchor (peso, l2): the adapter its term pulls toward, if any
    frozen_periods: tuple[int, ...]  # a method that freezes (cumulative): the earlier adapters added, frozen
    lora_seed: int  # the LoRA factors' initialization
    lr: float
    epochs: int  # the cap: `schedule.patience` may end the period earlier
    max_steps: int | None  # `schedule.max_steps`: a cap on the period's optimizer steps
    export_dir: str  # where the best epoch is exported, and evaluated from
    eval_only: bool  # evaluate the period's export again; no training
    restart: bool  # discard the period's checkpoints and train it from its start

    @classmethod
    def make(cls, cfg: Config, run: RunFolder, period: int, *, eval_only: bool = False, restart: bool = False):
        full = trains_in_full(cfg, period)
        spec = method(cfg.method.name)
        start = start_adapter(cfg, run, period) if spec.starts_from_previous else None
        return cls(
            period=period,
            full=full,
            backbone=evaluated_model_dir(cfg, run, period) if eval_only else backbone_dir(cfg, run, period),
            start_adapter=start,
            anchor=start if spec.anchor else None,
            frozen_periods=tuple(frozen_adapter_periods(cfg, cfg.method.name, period)),
            lora_seed=cfg.model.seed + period,
            lr=cfg.optim.lr * (cfg.optim.later_lr_factor if period > 0 else 1.0),
            epochs=period_epochs(cfg, period),
            max_steps=cfg.schedule.max_steps or None,
            export_dir=export_dir(cfg, run, period),
            eval_only=eval_only,
            restart=restart,
        )

    def total_steps(self, steps_per_epoch: int) -> int:
        """The period's optimizer steps: its epochs, capped by `schedule.max_steps`."""
        total = self.epochs * steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total
