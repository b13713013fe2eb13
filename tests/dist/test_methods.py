"""The continual methods: exact under ZeRO-3 against one plain process; peso's edge cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from launcher.periods import local_command
from tests.dist.conftest import QUICK, REPO, env, train

PROBE = os.path.join(REPO, "tests", "dist", "probe_methods.py")
CONFIG = os.path.join(REPO, "configs", "tiny.yaml")


def probe(tmp_path, mode: str, kind: str, base: str | None = None) -> dict:
    """`base`: a Hugging Face folder instead of the probe's tiny random model."""
    out = str(tmp_path / f"{mode}-{kind}.safetensors")
    cmd = local_command(2 if mode == "zero3" else 1, [mode, kind, out] + ([base] if base else []), PROBE)
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return load_file(out)


@pytest.mark.parametrize("kind", ["kl", "l2"])
def test_proximal_term_and_gradient_exact_under_zero3(tmp_path, kind):
    plain, zero3 = probe(tmp_path, "plain", kind), probe(tmp_path, "zero3", kind)
    assert plain["term"].item() > 1e-4  # the anchor differs: a real, non-zero term
    assert abs(plain["term"].item() - zero3["term"].item()) <= 1e-6
    grads = [k for k in plain if k != "term"]
    assert len(grads) == 2 * 7 * 2  # every LoRA A and B of the 7 projections in 2 layers
    for k in grads:
        assert plain[k].abs().max() > 0, k
        assert torch.allclose(plain[k], zero3[k], atol=1e-6, rtol=0), f"{k}: {(plain[k] - zero3[k]).abs().max()}"


def test_sequence_objective_with_peso_exact_under_zero3(tmp_path):
    """The sequence objective's loss (each rank's chunks of other lengths, so another number of
    output positions) plus the peso term: the gradients of every LoRA factor and of the new-token
    rows on 2 partitioned ranks equal one process's."""
    plain, zero3 = probe(tmp_path, "plain", "sequence"), probe(tmp_path, "zero3", "sequence")
    assert abs(plain["term"].item() - zero3["term"].item()) <= 1e-6
    # The pull against the data that the trainer logs (closed form, from the reduced gradient)
    # equals autograd's split in one process.
    for norm in ("pull_norm", "data_norm"):
        assert plain[norm].item() > 0 and zero3[norm].item() == pytest.approx(plain[norm].item(), rel=1e-5), norm
    grads = [k for k in plain if k not in ("term", "pull_norm", "data_norm")]
    assert len([k for k in grads if "lora_" in k]) == 2 * 7 * 2 and any("trainable_tokens" in k for k in grads)
    assert plain.keys() == zero3.keys()
    for k in grads:
        scale = plain[k].abs().max()
        assert scale > 0, k
        # fp32 with another summation order (ZeRO-3's own linear autograd, the ranks' average):
        # equal to 1e-5 of the gradient's magnitude (the cross-entropy's gradients are ~0.1).
        assert (plain[k] - zero3[k]).abs().max() <= 1e-5 * scale, f"{k}: {(plain[k] - zero3[k]).abs().max()} of {scale}"


def test_item_vectors_exact_under_zero3(tmp_path):
    """The sequence objective with peso on a model with item vectors: the gradient of the
    projection (partitioned like every other weight) and of everything else on 2 ranks equals one
    process's, and the vectors reach the loss (the projection's gradient is not zero)."""
    plain, zero3 = probe(tmp_path, "plain", "vectors"), probe(tmp_path, "zero3", "vectors")
    assert plain.keys() == zero3.keys()
    proj = [k for k in plain if "item_input.proj" in k]
    assert len(proj) == 1 and plain[proj[0]].abs().max() > 1e-4
    for k in (k for k in plain if k != "term"):
        scale = plain[k].abs().max()
        assert scale > 0, k
        assert (plain[k] - zero3[k]).abs().max() <= 1e-5 * scale, f"{k}: {(plain[k] - zero3[k]).abs().max()} of {scale}"


def test_pull_all_exact_under_zero3(tmp_path):
    """method.pull=all: the term over the LoRA factors, the code-token rows and the item-vector
    projection; its value, the logged pull / data norms and every gradient on 2 partitioned ranks
    equal one process's, and the rows and the projection do feel the term (their gradients differ
    from the same model's without it by the term's part)."""
    plain, zero3 = probe(tmp_path, "plain", "pull_all"), probe(tmp_path, "zero3", "pull_all")
    without = probe(tmp_path, "plain", "vectors")  # the same live model, the term on the factors only
    assert plain.keys() == zero3.keys() == without.keys()
    assert abs(plain["term"].item() - zero3["term"].item()) <= 1e-6 * max(1.0, plain["term"].item())
    for norm in ("pull_norm", "data_norm"):
        assert plain[norm].item() > 0 and zero3[norm].item() == pytest.approx(plain[norm].item(), rel=1e-5), norm
    # the data's share is the same model's gradient with or without the extra matrices: only the pull grew
    assert plain["pull_norm"].item() > without["pull_norm"].item()
    extra = [k for k in plain if "trainable_tokens" in k or "item_input.proj" in k]
    assert len(extra) == 3  # the embedding's and the head's rows (untied), the projection
    for k in extra:
        assert (plain[k] - without[k]).abs().max() > 1e-6, f"{k}: the term does not reach it"
    for k in (k for k in plain if k not in ("term", "pull_norm", "data_norm")):
        scale = plain[k].abs().max()
        assert scale > 0, k
        assert (plain[k] - zero3[k]).abs().max() <= 1e-5 * scale, f"{k}: {(plain[k] - zero3[k]).abs().max()} of {scale}"


def test_cumulative_forward_exact_under_zero3(tmp_path):
    plain, zero3 = probe(tmp_path, "plain", "cumulative"), probe(tmp_path, "zero3", "cumulative")
    assert torch.allclose(plain["logits"], zero3["logits"], atol=1e-6, rtol=0), (
        (plain["logits"] - zero3["logits"]).abs().max()
    )


@pytest.fixture(scope="module")
def after_two_periods(tmp_path_factory, cds_data, ds_configs):
    """A run whose periods 0 (full) and 1 (first LoRA) are done: period 2 has an anchor."""
    run = str(tmp_path_factory.mktemp("two") / "run")
    for _ in range(2):
        train(
            1,
            [
                "--ds_config",
                ds_configs[2],
                "--config",
                CONFIG,
                "--data",
                cds_data,
                "--run",
                run,
                "schedule.max_steps=3",
                *QUICK,
            ],
        )
    return run


def _period2(base_run: str, where, cds_data, ds, *overrides) -> str:
    run = str(where)
    shutil.copytree(base_run, run)
    train(
        1,
        [
            "--ds_config",
            ds,
            "--config",
            CONFIG,
            "--data",
            cds_data,
            "--run",
            run,
            "schedule.max_steps=4",
            *QUICK,
            *overrides,
        ],
    )
    return run


def test_peso_with_lambda_zero_equals_single_bit_for_bit(after_two_periods, cds_data, ds_configs, tmp_path):
    peso = _period2(after_two_periods, tmp_path / "peso", cds_data, ds_configs[2], "method.name=peso", "method.lam=0")
    single = _period2(after_two_periods, tmp_path / "single", cds_data, ds_configs[2], "method.name=single")
    a = load_file(os.path.join(peso, "periods", "2", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(single, "periods", "2", "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert os.path.exists(os.path.join(peso, "periods", "2", "anchor.safetensors"))


def test_proximal_term_is_zero_at_the_start_and_positive_after_a_step(
    after_two_periods, cds_data, ds_configs, tmp_path
):
    from tests.dist.test_engine import scalars

    run = _period2(after_two_periods, tmp_path / "peso", cds_data, ds_configs[2], "method.name=peso", "method.lam=1.0")
    prox = scalars(run, "train/proximal")
    first = min(prox)
    assert prox[first] == 0.0  # the adapter starts at its anchor
    assert all(prox[s] > 0 for s in prox if s > first)
    anchor = load_file(os.path.join(run, "periods", "2", "anchor.safetensors"))
    previous = load_file(os.path.join(run, "periods", "1", "adapter", "adapter_model.safetensors"))
    assert anchor.keys() == {k for k in previous if "lora_" in k}
    for k in anchor:
        assert torch.equal(anchor[k], previous[k])
    with open(os.path.join(run, "periods", "2", "config.json")) as f:
        assert json.load(f)["config"]["method"]["name"] == "peso"


def test_pull_all_holds_the_code_token_rows_near_their_anchor(after_two_periods, cds_data, ds_configs, tmp_path):
    """A real period with method.pull=all: the anchor file holds period 1's code-token rows too,
    and a strong pull keeps the rows closer to them than the same pull on the LoRA factors alone
    (train_summary.json's token_rows_relative_distance)."""
    moved = {}
    for pull in ("lora", "all"):
        run = _period2(
            after_two_periods,
            tmp_path / pull,
            cds_data,
            ds_configs[2],
            "method.name=peso",
            "method.kl_scale=entries",
            "method.lam=100",
            f"method.pull={pull}",
        )
        with open(os.path.join(run, "periods", "2", "train_summary.json")) as f:
            moved[pull] = json.load(f)["token_rows_relative_distance"]
    anchor = load_file(os.path.join(run, "periods", "2", "anchor.safetensors"))
    previous = load_file(os.path.join(run, "periods", "1", "adapter", "adapter_model.safetensors"))
    assert any("trainable_tokens" in k for k in anchor) and anchor.keys() == previous.keys()
    assert all(torch.equal(anchor[k], previous[k]) for k in anchor)
    assert 0 < moved["all"] < 0.5 * moved["lora"], moved


def test_gradient_checkpointing_gives_the_same_peso_period_under_zero3(
    after_two_periods, cds_data, ds_configs, tmp_path
):
    """Non-reentrant checkpointing recomputes the LoRA forwards (and reruns the proximal hooks,
    which then must not add terms twice): the losses and the proximal term match a run without it."""
    from tests.dist.test_engine import scalars

    runs = {}
    for gc in ("false", "true"):
        run = str(tmp_path / f"gc-{gc}")
        shutil.copytree(after_two_periods, run)
        train(
            2,
            [
                "--ds_config",
                ds_configs[3],
                "--config",
                CONFIG,
                "--data",
                cds_data,
                "--run_dir",
                run,
                "schedule.max_steps=4",
                *QUICK,
                "method.name=peso",
                "method.lam=1.0",
                f"model.gradient_checkpointing={gc}",
            ],
        )
        runs[gc] = run
    for tag in ("train/loss", "train/proximal"):
        a, b = scalars(runs["false"], tag), scalars(runs["true"], tag)
        assert a.keys() == b.keys() and len(a) >= 4  # the copied periods 0-1 (loss) and period 2's 4 steps
        for step in a:
            assert abs(a[step] - b[step]) < 1e-5, (tag, step, a[step], b[step])
    assert max(scalars(runs["true"], "train/proximal").values()) > 0
