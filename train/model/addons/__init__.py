"""Model add-ons: parts of a period's model beside the backbone and its LoRA adapter, in the
spirit of torchtitan's model converters (a small protocol, a registry, applied to the model by
name). The protocol is `ModelAddon` (train/model/addons/base.py): an add-on says which periods
have it (`used`), how it is made (`for_training`, `for_run`, `from_export`), attaches to a model
(`attach`, at its `stage`: BACKBONE before LoRA wraps the model, LORA after), and what state it
saves in a period's export (`gather`, `write`), loads back (`load`) and hands to a recommender
export (`fold_into_adapter`, `export_to`).

    item_vectors  `model.item_vectors`: item vectors on the decoder's input (item_vectors.py)
    frozen_sum    the cumulative methods' frozen earlier adapters (frozen_sum.py)

The call sites go through the helpers below: train/main.py (`check_addons`),
train/period/recipe.py (`for_training`, `attach`, `after_lora`, `load_states`),
train/model/build.py and export.py (`owned`, `gather_states`, `write_states`),
train/serve/recommender.py and export.py (`for_run`, `from_export`). Adding an add-on: one
file here with its `ModelAddon` subclass, and its line in `ADDONS` (docs/extending.md,
"A model add-on").
"""

from __future__ import annotations

import torch

from train.model.addons.base import BACKBONE, LORA, ModelAddon, TrainingInputs
from train.model.addons.frozen_sum import FrozenSum
from train.model.addons.item_vectors import ItemVectors

# The registry, in the order the add-ons are made and attached (within a stage) and gathered.
ADDONS: dict[str, type[ModelAddon]] = {cls.name: cls for cls in (ItemVectors, FrozenSum)}

__all__ = [
    "ADDONS",
    "BACKBONE",
    "LORA",
    "ModelAddon",
    "TrainingInputs",
    "addon",
    "after_lora",
    "attach",
    "check_addons",
    "checked_tensors",
    "for_run",
    "for_training",
    "from_export",
    "gather_states",
    "load_states",
    "owned",
    "used_addons",
    "write_states",
]


def addon(name: str) -> type[ModelAddon]:
    """The add-on registered as `name`."""
    try:
        return ADDONS[name]
    except KeyError:
        raise KeyError(f"no model add-on {name!r} (registered: {', '.join(ADDONS)})") from None


def used_addons(cfg, period: int) -> list[type[ModelAddon]]:
    """The add-ons of period `period`'s model, in registry order."""
    return [cls for cls in ADDONS.values() if cls.used(cfg, period)]


def check_addons(cfg, run, period: int) -> None:
    """Before any process group: a ConfigError if an add-on of the period lacks an input."""
    for cls in used_addons(cfg, period):
        cls.check(cfg, run, period)


def for_training(inputs: TrainingInputs) -> list[ModelAddon]:
    """The add-ons of a period that trains, made (collective where one is written by rank 0)."""
    return [cls.for_training(inputs) for cls in used_addons(inputs.cfg, inputs.plan.period)]


def for_run(cfg, run, period: int) -> list[ModelAddon]:
    """The add-ons of period `period` of a run, as it was evaluated."""
    return [cls.for_run(cfg, run, period) for cls in used_addons(cfg, period)]


def from_export(folder: str) -> list[ModelAddon]:
    """The add-ons a recommender export holds."""
    return [a for a in (cls.from_export(folder) for cls in ADDONS.values()) if a is not None]


def attach(addons: list[ModelAddon], model: torch.nn.Module, stage: str) -> None:
    """Attach those of `addons` that belong at `stage` (BACKBONE or LORA)."""
    for a in addons:
        if a.stage == stage:
            a.attach(model)


def after_lora(addons: list[ModelAddon], model: torch.nn.Module) -> None:
    for a in addons:
        a.after_lora(model)


def owned(param_name: str) -> bool:
    """Whether a parameter belongs to an add-on (kept out of adapter and model files)."""
    return any(cls.owns(param_name) for cls in ADDONS.values())


def gather_states(strategy, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Add-on name -> what it saves with an export, on rank 0 ({} elsewhere). Collective: every
    rank asks every add-on, in registry order."""
    states = {}
    for name, cls in ADDONS.items():
        state = cls.gather(strategy, model)
        if state is not None:
            states[name] = state
    return states


def checked_tensors(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The gathered tensors that came from parameters ("<add-on>.<key>"): an export checks that
    none is empty (a ZeRO-3 partition that was not gathered)."""
    return {f"{name}.{key}": state[key] for name, state in states.items() for key in ADDONS[name].checked}


def write_states(states: dict[str, dict[str, torch.Tensor]], folder: str) -> None:
    for name, state in states.items():
        ADDONS[name].write(state, folder)


def load_states(strategy, model: torch.nn.Module, folder: str) -> None:
    """Copy an export's add-on states into the live model (collective)."""
    for cls in ADDONS.values():
        cls.load(strategy, model, folder)
