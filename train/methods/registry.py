"""The continual methods (`method.name`): one descriptor each, without torch.

A descriptor says what a period of the method needs and does; train/common/config.py (which the
launcher imports, so no torch) takes the method names from here, train/period/plan.py the anchor
and the frozen earlier adapters, train/period/recipe.py the add-ons and the proximal term. The
implementations (a term's distance, an add-on) are imported only when a period sets them up.

    method("peso")            the descriptor; an unknown name is a ConfigError listing the known ones
    method_names()            every registered name, in the order below

Adding a method (docs/extending.md, "A continual method"): one row below, its config keys in
`MethodConfig` (train/common/config.py), and, for a proximal term, one file in train/methods/
with its distance (train/methods/proximal.py, `Distance`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

FREEZES = ("none", "latest", "all")  # which earlier adapters a method adds to the model, frozen
# method.pull: what a proximal term pulls, the LoRA factors (the paper's) or all a LoRA period trains
PULLS = ("lora", "all")


@dataclass(frozen=True)
class Method:
    """What a continual method is, as the rest of train/ needs to know it."""

    name: str
    summary: str  # one line: what it adds to plain fine-tuning
    # LoRA periods start from period t-1's exported adapter (train/period/plan.py, start_adapter)
    starts_from_previous: bool = True
    # its term pulls toward period t-1's adapter (plan.anchor; saved as periods/<t>/anchor.safetensors)
    anchor: bool = False
    # earlier adapters added to the model, frozen: none, latest (t-1's) or all (0..t-1)
    freezes: str = "none"
    # model add-ons it attaches (train/model/addons/), where a period has what they need
    addons: tuple[str, ...] = ()
    # "module:Class" of its proximal term's distance (train/methods/proximal.py, Distance), if any:
    # loss = CE + method.lam x the term
    term: str | None = None

    def __post_init__(self):
        if self.freezes not in FREEZES:
            raise ValueError(f"method {self.name}: freezes must be one of {FREEZES}, not {self.freezes!r}")
        if self.term and not self.anchor:
            raise ValueError(f"method {self.name}: a proximal term pulls toward an anchor (set anchor=True)")

    def frozen_periods(self, first: int, period: int) -> list[int]:
        """The earlier periods whose adapters this method adds, frozen, to period `period`'s model;
        `first`: the first period that has an adapter (1 after a full period 0)."""
        if self.freezes == "latest":
            return [period - 1] if period - 1 >= first else []
        if self.freezes == "all":
            return list(range(first, period))
        return []

    def distance_class(self):
        """The class of its term's distance (imported now: torch), or None."""
        if self.term is None:
            return None
        module, name = self.term.split(":")
        return getattr(importlib.import_module(module), name)


_METHODS = (
    Method("single", "start from the previous period's adapter; nothing added"),
    Method(
        "peso",
        "single + lam x reduce_m KL(softmax(vec M) || softmax(vec M_prev)) per LoRA matrix (the paper)",
        anchor=True,
        term="train.methods.peso:KL",
    ),
    Method(
        "l2",
        "single + lam x reduce_m ||M - M_prev||^2 per LoRA matrix (an ablation)",
        anchor=True,
        term="train.methods.l2:L2",
    ),
    Method(
        "cumulative",
        "period t-1's adapter, frozen and normalized, added to every LoRA layer's output",
        freezes="latest",
        addons=("frozen_sum",),
    ),
    Method(
        "cumulative_all",
        "every earlier adapter, frozen and normalized, added to every LoRA layer's output",
        freezes="all",
        addons=("frozen_sum",),
    ),
)

METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def method(name: str) -> Method:
    """The descriptor of method `name`; a ConfigError naming the known ones if there is none."""
    try:
        return METHODS[name]
    except KeyError:
        from train.common.config import ConfigError  # here: train/common/config.py imports this module

        raise ConfigError(f"method.name must be one of {', '.join(METHODS)}, not {name!r}") from None
