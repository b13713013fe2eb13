"""The two seams of train/: the continual methods' registry (train/methods/registry.py) and the
model add-ons' (train/model/addons/). Unknown names are clear errors; what the config accepts
and what the plan does come from the registry; a new method or add-on plugs in with its own
class and one registry entry (docs/extending.md)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from tests.unit.test_cumulative import _adapter, _model
from tests.unit.test_item_vectors import table, tiny_model, tokens
from train.common.config import ConfigError, MethodConfig, load_config
from train.common.run_folder import RunFolder
from train.methods import registry
from train.methods.proximal import Distance, ProximalTerm, make_term
from train.model import addons
from train.model.addons.frozen_sum import FrozenSum
from train.model.addons.item_vectors import ItemVectors
from train.model.lora import lora_factors, lora_layers
from train.period.plan import PeriodPlan, frozen_adapter_periods

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK0 = SimpleNamespace(is_rank0=True, device=torch.device("cpu"), barrier=lambda: None)
RANK0.gathered = lambda params, modify=False: contextlib.nullcontext()


# ---- methods ---------------------------------------------------------------------------------


def test_the_registry_and_the_config_import_no_torch():
    """The launcher imports the config, which validates method names: no torch on that path."""
    code = (
        "import sys, train.common.config, train.methods, train.period.plan; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_an_unknown_method_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"method.name must be one of single, peso, .*, not 'ewc'"):
        registry.method("ewc")
    with pytest.raises(ConfigError, match=r"method\.name must be one of"):
        load_config(None, ["model.shape=tiny", "method.name=ewc"])


def test_the_config_accepts_exactly_the_registered_methods():
    names = registry.method_names()
    assert names == ("single", "peso", "l2", "cumulative", "cumulative_all")
    for name in names:
        assert load_config(None, ["model.shape=tiny", f"method.name={name}"]).method.name == name
    help_text = MethodConfig.__dataclass_fields__["name"].metadata["help"]
    assert all(name in help_text for name in names)


@pytest.mark.parametrize("name", registry.method_names())
def test_every_registered_method_resolves(name):
    spec = registry.method(name)
    assert spec.name == name
    cls = spec.distance_class()
    assert (cls is None) == (spec.term is None)
    if cls is not None:
        assert issubclass(cls, Distance) and cls.kind and spec.anchor
        cls.from_config(MethodConfig())  # built from the method section's defaults
    assert all(a in addons.ADDONS for a in spec.addons)
    assert spec.frozen_periods(0, 0) == []


def test_the_plan_takes_the_anchor_and_the_frozen_adapters_from_the_registry(tmp_path, monkeypatch):
    """A new method that pulls toward an anchor and freezes every earlier adapter: the plan gives
    both, with no list of names to extend."""
    monkeypatch.setitem(
        registry.METHODS, "both", registry.Method("both", "test", anchor=True, freezes="all", term="x:y")
    )
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.adapter_dir(2))
    open(os.path.join(run.adapter_dir(2), "adapter_model.safetensors"), "w").close()
    cfg = load_config(None, ["model.shape=tiny", "model.period0=lora", "method.name=both"])
    plan = PeriodPlan.make(cfg, run, 3)
    assert plan.anchor == plan.start_adapter == run.adapter_dir(2)
    assert plan.frozen_periods == (0, 1, 2) and frozen_adapter_periods(cfg, "both", 3) == [0, 1, 2]
    single = PeriodPlan.make(load_config(None, ["model.shape=tiny", "model.period0=lora"]), run, 3)
    assert single.anchor is None and single.frozen_periods == () and single.start_adapter == run.adapter_dir(2)
    with pytest.raises(ValueError, match="anchor"):
        registry.Method("bad", "a term without an anchor", term="x:y")


class Importance(Distance):
    """An EWC-style distance (docs/extending.md): sum_i F_i (w_i - w_prev_i)^2, here with
    F = |w_prev| (any fixed per-entry importance fits)."""

    kind = "importance"

    def prepare(self, groups, targets):
        self.weights = {n: t.abs() for n, t in targets.items()}

    def distance(self, n, entries, target):
        return (self.weights[n] * (entries - target).pow(2)).sum(1)

    def gradient(self, n, entries, target):
        return 2 * self.weights[n] * (entries - target)


def test_a_new_method_plugs_its_term_in_through_the_registry(tmp_path, monkeypatch):
    monkeypatch.setitem(
        registry.METHODS,
        "importance",
        registry.Method("importance", "test", anchor=True, term=f"{__name__}:Importance"),
    )
    cfg = load_config(None, ["model.shape=tiny", "lora.r=4", "lora.dropout=0.0", "method.name=importance"])
    model = _model()
    run = RunFolder(str(tmp_path / "run"))
    previous, state = _adapter(run.adapter_dir(0), model)
    plan = SimpleNamespace(period=1, anchor=previous)
    term = make_term(cfg, plan, run, model, RANK0)
    assert isinstance(term.measure, Importance)
    assert os.path.isfile(run.anchor_path(1))  # the anchor is saved, as for peso
    with term.collect():
        model(input_ids=torch.arange(1, 20).unsqueeze(0))
    value = term.term()
    by_hand = sum(
        (state[k].abs() * (layer_w.detach().float() - state[k]).pow(2)).sum() for k, layer_w in term.params.items()
    )
    assert torch.allclose(value, by_hand, rtol=1e-5)
    grads = torch.autograd.grad(value, list(term.params.values()))
    closed = term.gradients()
    for key, grad in zip(term.params, grads):
        assert torch.allclose(closed[key], grad.reshape(-1), atol=1e-5 * grad.abs().max())
    # a method without a term, or a period without an anchor: no term
    assert make_term(load_config(None, ["model.shape=tiny"]), plan, run, model, RANK0) is None
    assert make_term(cfg, SimpleNamespace(period=0, anchor=None), run, model, RANK0) is None


def test_a_distance_is_found_by_its_kind():
    model = _model()
    anchor = lora_factors({f"{n}.{w}.weight": torch.zeros(1) for n in lora_layers(model) for w in ("lora_A", "lora_B")})
    with pytest.raises(ValueError, match="no registered method has a distance of kind 'ewc'"):
        ProximalTerm(model, anchor, "ewc", "sum")


# ---- model add-ons ---------------------------------------------------------------------------


def test_the_addon_registry_names_and_picks_the_addons_of_a_period():
    assert {"item_vectors": ItemVectors, "frozen_sum": FrozenSum} == addons.ADDONS
    assert addons.addon("frozen_sum") is FrozenSum
    with pytest.raises(KeyError, match="no model add-on 'lora_bias'"):
        addons.addon("lora_bias")
    cumulative = load_config(None, ["model.shape=tiny", "model.item_vectors=8", "method.name=cumulative"])
    assert addons.used_addons(cumulative, 0) == [ItemVectors]  # period 0 has no earlier adapter
    assert addons.used_addons(cumulative, 2) == [ItemVectors, FrozenSum]
    assert addons.used_addons(load_config(None, ["model.shape=tiny", "method.name=peso"]), 2) == []
    assert ItemVectors.stage == addons.BACKBONE and FrozenSum.stage == addons.LORA


def test_addon_parameters_are_kept_out_of_adapter_and_model_files():
    assert addons.owned("base_model.model.model.item_input.proj.weight")
    assert addons.owned("model.layers.0.self_attn.q_proj.frozen_sum.A.weight")
    assert not addons.owned("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert not addons.owned("model.embed_tokens.weight")


def test_item_vectors_save_and_load_back_through_the_addon_interface(tmp_path):
    """What a period's export writes (gather_states, write_states), a recommender export reads
    back (from_export), and load_states copies into a live model: the same outputs."""
    items = [[1, 2, 3, 4], [0, 0, 0, 0]]
    trained = tiny_model()
    addons.attach([ItemVectors(seed=3, tensors=table(items))], trained, addons.BACKBONE)
    states = addons.gather_states(RANK0, trained)
    assert set(states) == {"item_vectors"} and set(addons.checked_tensors(states)) == {"item_vectors.proj"}
    folder = str(tmp_path / "export")
    os.makedirs(folder)
    addons.write_states(states, folder)
    ids = torch.tensor([[1, *tokens(items[0]), *tokens(items[1])]])
    served = tiny_model()
    extras = addons.from_export(folder)
    assert [type(a) for a in extras] == [ItemVectors]
    addons.attach(extras, served, addons.BACKBONE)
    live = tiny_model()
    addons.attach([ItemVectors(seed=4, tensors=table(items))], live, addons.BACKBONE)  # another projection
    addons.load_states(RANK0, live, folder)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        assert (expected - tiny_model()(input_ids=ids).logits).abs().max() > 1e-3
        assert torch.equal(served(input_ids=ids).logits, expected)
        assert torch.equal(live(input_ids=ids).logits, expected)
    assert addons.from_export(str(tmp_path)) == []  # a folder without the file: no add-on


class Bias(addons.ModelAddon):
    """A third add-on, as docs/extending.md makes one: a trained bias on the logits."""

    name = "bias"
    stage = addons.LORA
    checked = ("bias",)

    def __init__(self, value: float = 0.0):
        self.value = value

    @classmethod
    def used(cls, cfg, period):
        return period > 0

    @classmethod
    def for_run(cls, cfg, run, period):
        return cls(float(period))

    def attach(self, model):
        model.register_parameter("bias", torch.nn.Parameter(torch.tensor([self.value])))
        model.register_forward_hook(lambda mod, inputs, out: out.__class__(logits=out.logits + mod.bias))

    @classmethod
    def gather(cls, strategy, model):
        return {"bias": model.bias.detach().clone()} if hasattr(model, "bias") else None

    @classmethod
    def write(cls, state, folder):
        save_file(state, os.path.join(folder, "bias.safetensors"))


def test_a_new_addon_plugs_in_with_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(addons.ADDONS, "bias", Bias)
    cfg = load_config(None, ["model.shape=tiny"])
    assert addons.used_addons(cfg, 0) == [] and addons.used_addons(cfg, 2) == [Bias]
    model = tiny_model()
    extras = addons.for_run(cfg, RunFolder(str(tmp_path / "run")), 2)
    addons.attach(extras, model, addons.BACKBONE)
    assert not hasattr(model, "bias")  # its stage is LORA
    addons.attach(extras, model, addons.LORA)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits + 2.0)
    states = addons.gather_states(RANK0, model)
    assert addons.checked_tensors(states) == {"bias.bias": states["bias"]["bias"]}
    addons.write_states(states, str(tmp_path))
    assert os.path.isfile(tmp_path / "bias.safetensors")
