"""`model.item_vectors` as a model add-on: the collaborative item vectors on the decoder's input
and their trained projection (the vectors, the module and its files: train/model/item_vectors.py).

A period that trains builds its vectors (rank 0, once) and starts the projection from its start
adapter's export (else its backbone's, a full period 0's; else new); every export of a period
holds `item_vectors.safetensors` with the projection it trained, which a served model reads back.
"""

from __future__ import annotations

import os
import shutil

import torch

from train.model import item_vectors as iv
from train.model.addons.base import BACKBONE, ModelAddon, TrainingInputs


class ItemVectors(ModelAddon):
    name = "item_vectors"
    stage = BACKBONE
    checked = ("proj",)  # the vectors themselves are buffers, never partitioned

    def __init__(self, seed: int, tensors: dict[str, torch.Tensor] | None = None, folder: str | None = None):
        """From `tensors` (a training period's), or from the file in `folder` (an export)."""
        self.seed, self.tensors, self.folder = seed, tensors, folder

    @classmethod
    def used(cls, cfg, period: int) -> bool:
        return cfg.model.item_vectors > 0

    @classmethod
    def check(cls, cfg, run, period: int) -> None:
        from train.common.config import ConfigError

        if period > 0 and not os.path.isfile(iv.vectors_path(run, period - 1)):
            raise ConfigError(
                f"model.item_vectors: period {period - 1} has no item vectors ({iv.vectors_path(run, period - 1)}); "
                "a run adds them from period 0 on, or never (set model.item_vectors=0)"
            )

    @classmethod
    def for_training(cls, inputs: TrainingInputs) -> ItemVectors:
        """The period's item vectors (built once, by rank 0), with the projection the period
        starts from: its start adapter's, else its backbone's (a full period 0's export), else new."""
        cfg, plan = inputs.cfg, inputs.plan
        tensors = iv.prepare_item_vectors(
            cfg, inputs.run, inputs.manifest, plan.period, inputs.codebook, inputs.strategy
        )
        start = next((f for f in (plan.start_adapter, plan.backbone) if f and iv.has_item_vectors(f)), None)
        if start:
            tensors["proj"] = iv.load_item_vectors(start)["proj"]
        return cls(cfg.model.seed + plan.period, tensors=tensors)

    @classmethod
    def for_run(cls, cfg, run, period: int) -> ItemVectors:
        from train.period.plan import export_dir

        return cls(cfg.model.seed, folder=export_dir(cfg, run, period))

    @classmethod
    def from_export(cls, folder: str) -> ItemVectors | None:
        return cls(0, folder=folder) if iv.has_item_vectors(folder) else None

    def attach(self, model: torch.nn.Module) -> None:
        tensors = self.tensors if self.tensors is not None else iv.load_item_vectors(self.folder)
        iv.attach_item_input(model, tensors, seed=self.seed)

    def after_lora(self, model: torch.nn.Module) -> None:
        iv.item_input_of(model).proj.requires_grad_(True)  # trains every period, like the code rows

    @classmethod
    def owns(cls, param_name: str) -> bool:
        return iv.is_item_input_param(param_name)

    @classmethod
    def gather(cls, strategy, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        return iv.gather_item_input(strategy, model)

    @classmethod
    def write(cls, state: dict[str, torch.Tensor], folder: str) -> None:
        iv.write_item_vectors(state, folder)

    @classmethod
    def load(cls, strategy, model: torch.nn.Module, folder: str) -> None:
        iv.load_item_input_weights(strategy, model, folder)

    def export_to(self, folder: str) -> None:
        shutil.copyfile(os.path.join(self.folder, iv.FILE), os.path.join(folder, iv.FILE))
