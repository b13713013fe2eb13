"""The model add-on protocol (train/model/addons/__init__.py has the registry and the helpers the
call sites use)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

BACKBONE = "backbone"  # attached to the loaded backbone, before LoRA wraps it
LORA = "lora"  # attached once the model has its adapter, beside its LoRA layers


@dataclass(frozen=True)
class TrainingInputs:
    """What an add-on may need to be made for a period that trains (train/period/recipe.py)."""

    cfg: object
    run: object  # the RunFolder
    plan: object  # the period's PeriodPlan
    strategy: object
    manifest: dict
    codebook: object  # the run's ItemCodebook


class ModelAddon:
    """A part of a period's model beside the backbone and its LoRA adapter: made for a period
    (`for_training`, `for_run`, `from_export`), attached to a model (`attach`), with the state it
    saves in a period's export (`gather`, `write`), loads back (`load`) and hands to a recommender
    export (`fold_into_adapter`, `export_to`). Every hook but `used` and `attach` has a default
    that does nothing."""

    name: ClassVar[str]
    stage: ClassVar[str]  # BACKBONE or LORA: when it is attached
    checked: ClassVar[tuple[str, ...]] = ()  # tensors of `gather` taken from (maybe partitioned) parameters

    # ---- which periods have it, and how it is made -------------------------------------------

    @classmethod
    def used(cls, cfg, period: int) -> bool:
        """Whether period `period`'s model has this add-on."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg, run, period: int) -> None:
        """Before any process group (train/main.py): a ConfigError if what it needs is missing."""

    @classmethod
    def for_training(cls, inputs: TrainingInputs) -> ModelAddon:
        """For the period that trains: its inputs made (collective if they are written once, by
        rank 0), with the state the period starts from."""
        raise NotImplementedError

    @classmethod
    def for_run(cls, cfg, run, period: int) -> ModelAddon:
        """As period `period` of a run was evaluated (from the run folder, no DeepSpeed)."""
        raise NotImplementedError

    @classmethod
    def from_export(cls, folder: str) -> ModelAddon | None:
        """From a recommender export (train/serve/export.py); None if the folder has none."""
        return None

    # ---- on a model --------------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> None:
        """Add it to `model`: a Hugging Face causal LM at stage BACKBONE, a peft model at LORA."""
        raise NotImplementedError

    def after_lora(self, model: torch.nn.Module) -> None:
        """A training period's model, once LoRA has wrapped it (and frozen everything else): what
        of the add-on trains."""

    @classmethod
    def owns(cls, param_name: str) -> bool:
        """Whether a parameter is the add-on's: kept out of adapter and model files (the add-on
        saves its own state, `gather`)."""
        return False

    # ---- its state in a period's export (train/model/export.py) ---------------------------------

    @classmethod
    def gather(cls, strategy, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """What it saves with a period's export, as whole CPU tensors on rank 0 (collective: its
        parameters may be partitioned); None on the other ranks, or when `model` has none of it."""
        return None

    @classmethod
    def write(cls, state: dict[str, torch.Tensor], folder: str) -> None:
        """Write `gather`'s tensors into an export folder being written."""

    @classmethod
    def load(cls, strategy, model: torch.nn.Module, folder: str) -> None:
        """Copy an export's saved state into the live (possibly partitioned) `model`, if it has
        the add-on (collective)."""

    # ---- a recommender export (train/serve/export.py) -------------------------------------------

    def fold_into_adapter(self, state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], object]:
        """The period's adapter (tensors, peft LoraConfig) with this add-on folded in, if it can be."""
        return state, config

    def export_to(self, folder: str) -> None:
        """Its files in a recommender export being written (what `from_export` reads back)."""
