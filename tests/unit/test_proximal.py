"""PESO's proximal term in one process: the closed-form gradient that the trainer logs (how hard
the term pulls) equals autograd's, and `method.kl_scale: entries` turns each matrix's KL into about
its squared change, and `method.pull: all` extends the term to the code-token rows and the
item-vector projection. (Exactness under ZeRO-3: tests/dist/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.unit.test_cumulative import NEW_TOKENS, _base, _model
from train.common.config import load_config
from train.methods.l2 import L2
from train.methods.peso import KL
from train.methods.proximal import ProximalTerm, anchor_state, pull_and_data_norms, pulled_tensors
from train.model.build import apply_lora
from train.model.item_vectors import attach_item_input, item_input_of
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


def _model_with_rows_and_projection(tied: bool):
    """A LoRA model whose period also trains code-token rows and an item-vector projection."""
    cfg = load_config(None, ["model.shape=tiny", "lora.r=4", "lora.dropout=0.0"])
    base = _base(layers=1, tied=tied)
    g = torch.Generator().manual_seed(5)
    vectors = {  # 6 items of 2 levels of 8 codes (tokens 100 + 8 x level + code)
        "codes": torch.randint(0, 8, (6, 2), generator=g),
        "vectors": torch.randn(6, 4, generator=g),
        "code_token_ids": torch.tensor(NEW_TOKENS).reshape(2, 8),
    }
    attach_item_input(base, vectors, seed=7)
    model = apply_lora(base, cfg.lora, NEW_TOKENS, seed=1)
    item_input_of(model).proj.requires_grad_(True)
    return model.eval()


def _moved(model, keys, spread: float) -> dict[str, torch.Tensor]:
    """Each pulled tensor's live value, moved by N(0, spread): the anchor."""
    g = torch.Generator().manual_seed(9)
    live = {k: weight_of(module).detach() for k, (module, weight_of) in pulled_tensors(model, "all").items()}
    return {k: live[k] + torch.randn(live[k].shape, generator=g) * spread for k in keys}


@pytest.mark.parametrize("tied", [False, True])
def test_pull_all_adds_the_code_token_rows_and_the_projection(tied):
    """method.pull=all: the same term over the code-token rows (one matrix per wrapped layer, one
    when tied) and the item-vector projection too; its closed-form gradient is still autograd's."""
    model = _model_with_rows_and_projection(tied)
    everything = pulled_tensors(model, "all")
    rows = [k for k in everything if k.endswith("trainable_tokens_delta")]
    proj = [k for k in everything if "item_input.proj" in k]
    assert len(rows) == (1 if tied else 2) and len(proj) == 1
    assert set(pulled_tensors(model, "lora")) == {k for k in everything if ".lora_" in k}
    anchor = _moved(model, everything, 0.05)
    lora = ProximalTerm(model, anchor, "kl", "sum")  # the anchor's rows and projection: not pulled
    full = ProximalTerm(model, anchor, "kl", "sum", pull="all")
    assert set(full.params) == set(everything) and set(lora.params) < set(everything)
    ids = torch.tensor([[1, 100, 108, 101, 109, 2, 103]])  # two items' codes: the projection runs
    with lora.collect(), full.collect():
        model(input_ids=ids)
    extra = 0.0
    for k in rows + proj:  # KL(softmax(w) || softmax(w_prev)) of each added matrix, in float64
        w, w0 = everything[k][1](everything[k][0]).detach().double().reshape(-1), anchor[k].double().reshape(-1)
        p, q = torch.log_softmax(w, 0), torch.log_softmax(w0, 0)
        extra += float((p.exp() * (p - q)).sum())
    assert extra > 0
    assert full.term().item() == pytest.approx(lora.term().item() + extra, rel=1e-4)
    value = full.term()
    expected = torch.autograd.grad(value, list(full.params.values()))
    closed = full.gradients()
    for key, grad in zip(full.params, expected):
        assert grad.abs().max() > 0, key
        assert (closed[key] - grad.reshape(-1)).abs().max() <= 1e-5 * grad.abs().max(), key


def test_pull_all_needs_the_rows_and_projection_in_the_anchor(tmp_path):
    model = _model_with_rows_and_projection(tied=False)
    factors = _moved(model, pulled_tensors(model, "lora"), 0.05)
    with pytest.raises(ValueError, match=r"method\.pull=all"):
        ProximalTerm(model, factors, "kl", "sum", pull="all")
    with pytest.raises(ValueError, match=r"method\.pull must be"):
        pulled_tensors(model, "everything")
    # From an adapter folder as a period exports it: its file holds the factors and the rows (in
    # peft's names), its item_vectors.safetensors the projection as `proj`.
    everything = _moved(model, pulled_tensors(model, "all"), 0.05)
    (proj,) = [k for k in everything if "item_input.proj" in k]
    save_file({k: v.contiguous() for k, v in everything.items() if k != proj}, tmp_path / "adapter_model.safetensors")
    save_file({"proj": everything[proj].contiguous()}, tmp_path / "item_vectors.safetensors")
    assert anchor_state(str(tmp_path), model, "lora").keys() == factors.keys()
    loaded = anchor_state(str(tmp_path), model, "all")
    assert loaded.keys() == everything.keys()
    assert all(torch.equal(loaded[k], everything[k]) for k in everything)
