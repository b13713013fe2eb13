"""The proximal term of a method with an anchor (peso, l2): lambda x reduce_m over the wrapped
layers of the distance of each LoRA matrix M to M_prev, the adapter exported at the end of period
t-1 (the period's anchor, also saved as periods/<t>/anchor.safetensors). What the distance is,
is the method's (`Distance`: train/methods/peso.py, l2.py); the rest is shared and here.

`method.pull: all` extends the same term to the rest of what a LoRA period trains: the code-token
rows (peft's trainable-token deltas, one matrix per wrapped layer; one when tied) and the
item-vector projection, toward their values at the end of period t-1 (the anchor's adapter file
and its item_vectors.safetensors). Each is one more matrix in the sum; `reduce: mean` still
divides by the number of LoRA layers, so adding them does not weaken the pull on the factors.

Exact under ZeRO-3: a weight is only whole while its module runs, so each pulled tensor is copied
in a forward hook on the module that uses it (every lora_A / lora_B; the trainable-tokens layer;
the projection): never read outside its forward, which is silently 0 with partitioned parameters.

The hooks only copy each factor (two operations); the distances are computed after the
forward, every matrix of one size in one batch, so the term costs tens of kernels per step, not
a score per matrix (448 matrices at 8B). Outside a training forward the hooks return at once
(validation, beam search and the recomputation of non-reentrant gradient checkpointing run them
too): the copy saves nothing for the backward, so a recomputation that skips it finds the
checkpoint's saved tensors as they were (docs/zero3.md, "Gradient checkpointing"). The anchor's
targets live on the rank's device, stacked once: no copy per step.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn as nn
from safetensors.torch import save

from data_tools.atomic import atomic_write_bytes
from data_tools.readback import load_safetensors
from train.dist.params import is_partitioned
from train.methods.registry import METHODS, PULLS, method
from train.model.item_vectors import has_item_vectors, item_input_of, load_item_vectors
from train.model.lora import lora_factors, lora_layers

log = logging.getLogger(__name__)


class Distance:
    """How far LoRA matrices are from their anchor: a method's part of the proximal term. Every
    call gets all matrices of one size at once: `entries` [matrices, n] (fp32, the live factors,
    flattened) and `target` [matrices, n] (the anchor's)."""

    kind = ""  # its short name (ProximalTerm's `kind`, e.g. "kl")

    @classmethod
    def from_config(cls, method_cfg, anchor_dir: str | None = None) -> Distance:
        """Built from the `method` section of the config (its own keys) and the anchor's folder
        (period t-1's export: what else the previous period wrote there)."""
        return cls()

    def prepare(self, groups: dict[int, list[str]], targets: dict[int, torch.Tensor]) -> None:
        """Once, before any step: per matrix size n, the matrices' names (`groups[n]`, the row
        order of every batch) and the anchor's entries (`targets[n]`, [matrices, n], on the
        rank's device). What stays fixed is computed here."""

    def distance(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[matrices]: each matrix's distance (before `scale`)."""
        raise NotImplementedError

    def gradient(self, n: int, entries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[matrices, n]: the gradient of each matrix's `distance` with respect to its entries, in
        closed form (no backward; the trainer logs how hard the term pulls with it)."""
        raise NotImplementedError

    def scale(self, n: int) -> float:
        """A factor on the distance (and gradient) of a matrix of n entries."""
        return 1.0


def distance_of_kind(kind: str) -> Distance:
    """The distance of a registered method by its `kind` ("kl": peso's, "l2"), with its defaults."""
    for spec in METHODS.values():
        cls = spec.distance_class()
        if cls is not None and cls.kind == kind:
            return cls()
    kinds = [s.distance_class().kind for s in METHODS.values() if s.term]
    raise ValueError(f"no registered method has a distance of kind {kind!r} (known: {', '.join(kinds)})")


class ProximalTerm:
    """Distance of the live LoRA factors to the anchor's. Each factor is copied (in fp32) in a
    forward hook, where it is whole; `term()` then computes every matrix's distance at once, in
    one batch per shape, on the rank's device. `distance`: a `Distance`, or the kind of a
    registered one ("kl", "l2")."""

    def __init__(
        self,
        model: nn.Module,
        anchor: dict[str, torch.Tensor],
        distance: Distance | str,
        reduce: str,
        device: torch.device = None,
        pull: str = "lora",
    ):
        self.measure = distance_of_kind(distance) if isinstance(distance, str) else distance
        self.kind, self.reduce = self.measure.kind, reduce
        self.collecting = False
        self.seen: dict[str, torch.Tensor] = {}  # matrix -> its entries in this forward, fp32, flat
        self.params: dict[str, nn.Parameter] = {}  # matrix -> the live weight
        self.n_layers = len(lora_layers(model))
        self.handles = []
        targets, missing = {}, []
        for key, (module, weight_of) in pulled_tensors(model, pull).items():
            if key not in anchor:
                missing.append(key)
                continue
            targets[key] = anchor[key].to(device or "cpu", torch.float32).reshape(-1)  # vec M_prev
            self.params[key] = weight_of(module)
            self.handles.append(module.register_forward_hook(self._hook(key, weight_of)))
        if missing:
            raise ValueError(
                f"the anchor lacks {len(missing)} of the matrices that method.pull={pull} pulls (first: "
                f"{missing[0]}); was the previous period trained with other lora.targets or model add-ons?"
            )
        # Matrices of one size share a batch: [matrices, entries] targets, stacked once.
        self.groups: dict[int, list[str]] = {}
        for key, target in targets.items():
            self.groups.setdefault(target.numel(), []).append(key)
        self.targets = {n: torch.stack([targets[k] for k in keys]) for n, keys in self.groups.items()}
        self.measure.prepare(self.groups, self.targets)

    def _hook(self, key: str, weight_of):
        def hook(module, inputs, output):
            if not self.collecting:
                return
            weight = weight_of(module)
            if is_partitioned(weight):
                raise RuntimeError(
                    f"{key} is partitioned inside its own module's forward; the proximal term would be wrong"
                )
            # A copy: under ZeRO-3 the gathered weight's storage is released (and reused) once the
            # module is done. Copying saves nothing for the backward, so a checkpoint's
            # recomputation, where this returns at once, finds the same saved tensors.
            self.seen[key] = weight.to(torch.float32, copy=True).reshape(-1)

        return hook

    @contextlib.contextmanager
    def collect(self):
        self.seen = {}
        self.collecting = True
        try:
            yield
        finally:
            self.collecting = False

    def _entries(self, n: int, keys: list[str]) -> torch.Tensor:
        return torch.stack([self.seen[k] for k in keys])  # [matrices, n]

    def distances(self) -> torch.Tensor:
        """[matrices]: each collected matrix's distance to its anchor, in `self.groups` order."""
        missing = [k for keys in self.groups.values() for k in keys if k not in self.seen]
        if missing:
            raise RuntimeError(
                f"{len(missing)} LoRA matrices were not seen in the forward (first: {missing[0]}): "
                "was it run inside collect()?"
            )
        out = []
        for n, keys in self.groups.items():
            out.append(self.measure.distance(n, self._entries(n, keys), self.targets[n]) * self.measure.scale(n))
        return torch.cat(out)

    def term(self) -> torch.Tensor:
        total = self.distances().sum()
        return total / self.n_layers if self.reduce == "mean" else total

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradient of `term()` on each collected matrix (flat, fp32), in closed form, without
        a backward."""
        scale = 1.0 / self.n_layers if self.reduce == "mean" else 1.0
        out = {}
        with torch.no_grad():
            for n, keys in self.groups.items():
                grad = self.measure.gradient(n, self._entries(n, keys), self.targets[n])
                out.update(zip(keys, grad * (scale * self.measure.scale(n))))
        return out


def _weight(module: nn.Module) -> nn.Parameter:
    return module.weight


def _token_rows(module: nn.Module) -> nn.Parameter:
    return module.trainable_tokens_delta["default"]


def pulled_tensors(model: nn.Module, pull: str = "lora") -> dict[str, tuple[nn.Module, object]]:
    """What the proximal term pulls, in the anchor's key names (peft's state-dict names; the
    projection: the live parameter's name): key -> (the module whose forward uses it, a function
    from that module to the live parameter). `pull`: lora (the LoRA factors) or all (also the
    code-token rows and the item-vector projection)."""
    if pull not in PULLS:
        raise ValueError(f"method.pull must be one of {', '.join(PULLS)}, not {pull!r}")
    out = {}
    for name, layer in lora_layers(model).items():
        for which in ("lora_A", "lora_B"):
            out[f"{name}.{which}.weight"] = (layer.__getattr__(which)["default"], _weight)
    if pull == "lora":
        return out
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokensLayer) and "default" in module.trainable_tokens_delta:
            delta = _token_rows(module)
            if id(delta) not in seen:  # a tied head shares the embedding's rows: one matrix
                seen.add(id(delta))
                out[f"{name}.trainable_tokens_delta"] = (module, _token_rows)
    projection = _item_projection(model)
    if projection is not None:
        key, module = projection
        out[key] = (module, _weight)
    return out


def _item_projection(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The item-vector projection's weight name and module, if the model has one."""
    item_input = item_input_of(model)
    if item_input is None:
        return None
    name = next(n for n, m in model.named_modules() if m is item_input.proj)
    return f"{name}.weight", item_input.proj


def anchor_state(plan_anchor: str, model: nn.Module, pull: str) -> dict[str, torch.Tensor]:
    """The anchor's values of what `pull` pulls, from period t-1's adapter folder: its LoRA factors
    (and with pull=all its code-token rows, and the projection from its item_vectors.safetensors,
    under the live projection's name)."""
    state = load_safetensors(os.path.join(plan_anchor, "adapter_model.safetensors"), what="the anchor's adapter")
    if pull == "lora":
        return lora_factors(state)
    projection = _item_projection(model)
    if projection is not None and has_item_vectors(plan_anchor):
        state[projection[0]] = load_item_vectors(plan_anchor)["proj"]
    return state


def make_term(cfg, plan, run, model: nn.Module, strategy) -> ProximalTerm | None:
    """The proximal term of the period of `plan` (train/period/plan.py), for a method that has one
    and a period that has an anchor; None otherwise. Rank 0 saves the anchor's pulled tensors as
    periods/<t>/anchor.safetensors."""
    spec = method(cfg.method.name)
    if spec.term is None:
        return None
    if plan.anchor is None:
        log.info(f"{spec.name}: no previous adapter in period {plan.period}, so no proximal term this period")
        return None
    anchor = anchor_state(plan.anchor, model, cfg.method.pull)
    if strategy.is_rank0:
        atomic_write_bytes(run.anchor_path(plan.period), save(anchor))
    distance = spec.distance_class().from_config(cfg.method, plan.anchor)
    return ProximalTerm(model, anchor, distance, cfg.method.reduce, device=strategy.device, pull=cfg.method.pull)


def relative_distance(adapter: dict[str, torch.Tensor], start: dict[str, torch.Tensor], rows: bool = False) -> float:
    """||theta - theta_start|| / ||theta_start|| over the LoRA factors of two adapter states (with
    `rows`: over their code-token rows instead): how far a period moved its adapter from where it
    started (peso's anchor). NaN if the start is zero or has none."""
    factors = lora_factors(start)
    keys = sorted(k for k in start if (k not in factors) == rows)
    diff = sum(float((adapter[k].double() - start[k].double()).pow(2).sum()) for k in keys)
    base = sum(float(start[k].double().pow(2).sum()) for k in keys)
    return (diff / base) ** 0.5 if base > 0 else float("nan")


def pull_and_data_norms(term: ProximalTerm, lam: float, grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """How hard the proximal term pulls against the data, on the LoRA factors: (the norm of
    lam x the term's gradient, the norm of the data loss's gradient), over all factors. `grads`:
    each factor's whole gradient of the loss (flat, fp32, after the backward), from which the
    term's part is taken away. One read-back."""
    pull = term.gradients()
    squares = torch.stack(
        [torch.stack([(lam * pull[k]).pow(2).sum(), (grads[k].float() - lam * pull[k]).pow(2).sum()]) for k in pull]
    ).sum(0)
    pull_sq, data_sq = squares.tolist()
    return pull_sq**0.5, data_sq**0.5
