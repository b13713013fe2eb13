"""PESO's proximal term in one process: the closed-form gradient that the trainer logs (how hard
the term pulls) equals autograd's, and `method.kl_scale: entries` turns each matrix's KL into about
its squared change. (Exactness under ZeRO-3: tests/dist/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_cumulative import _model
from train.methods.l2 import L2
from train.methods.peso import KL
from train.methods.proximal import ProximalTerm, pull_and_data_norms
from train.model.lora import lora_factors, lora_layers


def _anchor(model, spread: float) -> dict[str, torch.Tensor]:
    """The live LoRA factors, each entry moved by N(0, spread): the previous period's adapter."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, layer in lora_layers(model).items():
        for which in ("lora_A", "lora_B"):
            w = layer.__getattr__(which)["default"].weight.detach()
            state[f"{name}.{which}.weight"] = w + torch.randn(w.shape, generator=g) * spread
    return lora_factors(state)


def _collected(model, term: ProximalTerm) -> torch.Tensor:
    with term.collect():
        model(input_ids=torch.arange(1, 20).unsqueeze(0))
    return term.term()


@pytest.mark.parametrize("kind,reduce,scale", [("kl", "sum", "none"), ("kl", "mean", "entries"), ("l2", "sum", "none")])
def test_the_closed_form_gradient_equals_autograd(kind, reduce, scale):
    model = _model()
    term = ProximalTerm(model, _anchor(model, 0.05), KL(kl_scale=scale) if kind == "kl" else L2(), reduce)
    value = _collected(model, term)
    params = list(term.params.values())
    expected = torch.autograd.grad(value, params)
    closed = term.gradients()
    for key, grad in zip(term.params, expected):
        scale = grad.abs().max()
        assert scale > 0, key
        # fp32, another order of operations: equal to 1e-5 of the gradient's magnitude
        assert (closed[key] - grad.reshape(-1)).abs().max() <= 1e-5 * scale, key
    # the split the trainer logs: the whole gradient of data + lam x term, less lam x the term's
    lam, data = (
        3.0,
        {k: torch.randn(p.numel(), generator=torch.Generator().manual_seed(7)) for k, p in term.params.items()},
    )
    pull, rest = pull_and_data_norms(term, lam, {k: data[k] + lam * closed[k] for k in data})
    assert pull == pytest.approx(lam * torch.cat([closed[k] for k in data]).norm().item(), rel=1e-5)
    assert rest == pytest.approx(torch.cat(list(data.values())).norm().item(), rel=1e-5)


def test_kl_over_a_whole_matrix_is_about_its_squared_change_over_twice_its_entries():
    """The reason the authors' lambda barely pulls: a softmax over a whole LoRA matrix is nearly
    uniform, so KL ~ |change|^2 / 2N. `kl_scale: entries` multiplies it back by 2N."""
    model = _model()
    with torch.no_grad():  # LoRA factors of a trained adapter's size (entries ~0.03, not _model's 0.3)
        for w in (p for n, p in model.named_parameters() if "lora_" in n):
            w.mul_(0.1)
    anchor = _anchor(model, 1e-3)
    scaled = ProximalTerm(model, anchor, KL(kl_scale="entries"), "sum")
    plain = ProximalTerm(model, anchor, "kl", "sum")  # a registered distance by its kind
    l2 = ProximalTerm(model, anchor, L2(), "sum")
    kl_scaled = _collected(model, scaled).item()
    kl = _collected(model, plain).item()
    squared = _collected(model, l2).item()
    assert kl_scaled == pytest.approx(squared, rel=0.02)
    sizes = [w.numel() for w in anchor.values()]
    assert kl < squared / (2 * min(sizes))  # the faithful term: orders of magnitude weaker
