"""A real backbone from a local Hugging Face folder (tied embeddings, like Llama-3.2-1B): its own
tokenizer gets the item code tokens, the embedding is resized under ZeRO-3, LoRA and the new
rows train on 2 ranks, and the adapter reloads onto the plain model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.conftest import REPO, RESPONSE, train

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, ml_indexed) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_tools.index.prompt import PromptTemplate
    from data_tools.index.tokenizer import train_sentencepiece_tokenizer

    folder = str(tmp_path_factory.mktemp("backbone") / "model")
    with open(os.path.join(ml_indexed, "items.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus(texts), folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    model.save_pretrained(folder)
    return folder


def test_local_backbone_resized_and_lora_trained_under_zero3(backbone, ml_indexed, ds_configs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = str(tmp_path / "run")
    train(
        2,
        [
            "--ds_config",
            ds_configs[3],
            "--config",
            CONFIG,
            "--data",
            ml_indexed,
            "--run_dir",
            run,
            f"model.path={backbone}",
            "model.shape=null",
            "model.period0=lora",
            "schedule.max_steps=4",
            *RESPONSE,
            "data.micro_batch_size=4",
            "schedule.global_batch_size=8",
            "eval.max_users=16",
            "logging.progress=false",
        ],
    )
    tok = AutoTokenizer.from_pretrained(os.path.join(run, "tokenizer"))
    original = AutoTokenizer.from_pretrained(backbone)
    assert len(tok) == len(original) + 4 * 256
    state = load_file(os.path.join(run, "periods", "0", "adapter", "adapter_model.safetensors"))
    delta = [k for k in state if "trainable_tokens" in k]
    assert len(delta) == 1 and state[delta[0]].shape == (4 * 256, 64)  # tied: one shared set of rows
    assert all(t.numel() > 0 for t in state.values())
    base = AutoModelForCausalLM.from_pretrained(backbone)
    # The new rows started random at the embedding's scale, N(0, std of the old rows), not all at
    # their mean (4 steps at lr 3e-3 move a row by about 0.01 at most; mean-initialized rows would
    # spread by that much only).
    old = base.get_input_embeddings().weight.detach()
    rows = state[delta[0]]
    assert 0.6 < float(rows.std(0).mean() / old.std(0).mean()) < 1.6
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, os.path.join(run, "periods", "0", "adapter"))
    live = {
        n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n or "trainable_tokens" in n
    }
    for k, v in state.items():
        assert torch.equal(live[k], v), k
    with open(os.path.join(run, "periods", "0", "metrics.json")) as f:
        assert json.load(f)["windows"]["0"]["invalid_outputs"] == 0


def test_launcher_runs_every_period_once_and_reports(ml_indexed, tmp_path):
    import subprocess
    import sys

    from tests.dist.conftest import env

    run = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "run",
        "--config",
        CONFIG,
        "--data",
        ml_indexed,
        "--run",
        run,
        "--ds_config",
        os.path.join(REPO, "ds_configs", "zero2.json"),
        "--nproc",
        "1",
        "schedule.max_steps=2",
        "eval.max_users=8",
        "data.micro_batch_size=4",
        "schedule.global_batch_size=4",
        "logging.progress=false",
        "checkpoint.every_steps=1",
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(run, "state.json")) as f:
        assert json.load(f)["done"] == [0, 1, 2, 3, 4]
    assert "R[i][j]" in open(os.path.join(run, "report.md")).read()
    stamps = {t: os.stat(os.path.join(run, "periods", str(t), "train_summary.json")).st_mtime_ns for t in range(5)}
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and "== period" not in again.stdout  # nothing left to train
    assert stamps == {
        t: os.stat(os.path.join(run, "periods", str(t), "train_summary.json")).st_mtime_ns for t in range(5)
    }


@pytest.mark.slow
def test_smollm2_lora_then_peso_under_zero3(smollm2_folder, cds_slice, ds_configs, tmp_path):
    """A real pretrained backbone (SmolLM2-135M, tied embeddings, its own tokenizer) as
    `model.path`, on a small slice of the real CDs blocks with the paper's semantic IDs: period 0
    LoRA and period 1 peso on 2 partitioned ranks; the code tokens join its
    tokenizer, their tied rows train, each adapter reloads with PeftModel on the plain model, and the
    plain CPU model with period 1's adapter gives the engine's evaluation (lists and beam scores)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = str(tmp_path / "run")
    args = [
        "--ds_config",
        ds_configs[3],
        "--config",
        os.path.join(REPO, "configs", "smollm2.yaml"),
        "--data",
        cds_slice,
        "--run_dir",
        run,
        f"model.path={smollm2_folder}",
        "schedule.max_steps=2",
        "schedule.epochs=1",
        "data.max_history=5",
        "data.micro_batch_size=2",
        "data.eval_batch_size=16",
        "schedule.global_batch_size=4",
        "logging.every_steps=1",
        "logging.progress=false",
        "eval.every_period=false",
        "eval.max_users=4",
    ]
    train(2, args, timeout=900)
    train(2, [*args, "eval.every_period=true"], timeout=900)  # period 1 is evaluated by the engine
    with open(os.path.join(run, "state.json")) as f:
        assert json.load(f)["done"] == [0, 1]
    assert os.path.isfile(os.path.join(run, "periods", "1", "anchor.safetensors"))
    tok = AutoTokenizer.from_pretrained(os.path.join(run, "tokenizer"))
    original = AutoTokenizer.from_pretrained(smollm2_folder)
    assert len(original) == 49152 and len(tok) == len(original) + 4 * 256
    assert tok("<a_0><b_1>", add_special_tokens=False).input_ids == [len(original), len(original) + 256 + 1]
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    hidden = base.config.hidden_size
    # The rows the new tokens started from (train/model/build.py, init_new_token_rows, model.seed 0).
    old = base.get_input_embeddings().weight.detach()
    start = torch.randn((4 * 256, hidden), generator=torch.Generator().manual_seed(0)) * float(old.std())
    base.resize_token_embeddings(len(tok))
    rows = {}
    for t in (0, 1):
        adapter = os.path.join(run, "periods", str(t), "adapter")
        state = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        delta = [k for k in state if "trainable_tokens" in k]
        assert len(delta) == 1 and state[delta[0]].shape == (4 * 256, hidden)  # tied: one shared set of rows
        rows[t] = state[delta[0]]
        assert len([k for k in state if "lora_" in k]) == 30 * 7 * 2
        model = PeftModel.from_pretrained(base, adapter)
        live = {
            n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n or "trainable_tokens" in n
        }
        for k, v in state.items():
            assert torch.equal(live[k], v), k
        assert model.get_output_embeddings() is not None
        base = model.unload()
    # The rows of the tokens in the batches moved in both periods, the others did not.
    moved0 = (rows[0] - start).abs().amax(1) > 0
    moved1 = (rows[1] - rows[0]).abs().amax(1) > 0
    assert 0 < int(moved0.sum()) < 4 * 256 and int(moved1.sum()) > 0
    # The plain CPU model with period 1's adapter (no DeepSpeed) ranks the test users' items as the
    # engine's evaluation did, with the same beam scores (sums of log-probabilities).
    from train.serve.recommender import Recommender

    rec = Recommender.from_run(run, 1, device="cpu")
    metrics, lists = rec.evaluate_window(cds_slice, 1, [5, 10], max_users=4)
    with open(os.path.join(run, "periods", "1", "metrics.json")) as f:
        engine_metrics = json.load(f)["windows"]["1"]["overall"]
    with open(os.path.join(run, "periods", "1", "recommendations.jsonl")) as f:
        engine_lists = [x for x in map(json.loads, f) if x.get("window", 1) == 1]
    assert len(lists) == len(engine_lists) == 4
    for x, y in zip(engine_lists, lists):
        assert (x["user"], x["target"], x["rank"], x["items"]) == (y["user"], y["target"], y["rank"], y["items"])
        assert max(abs(a - b) for a, b in zip(x["scores"], y["scores"])) < 1e-4
    for key, value in engine_metrics.items():
        if key.startswith(("hit@", "ndcg@")):
            assert metrics[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_smollm2_proximal_term_and_gradient_exact_under_zero3(smollm2_folder, tmp_path):
    """peso's term on SmolLM2's 30 layers x 7 projections: 2 partitioned ranks give one plain
    process's term (within 1e-6) and gradients."""
    from tests.dist.test_methods import probe

    plain, zero3 = probe(tmp_path, "plain", "kl", smollm2_folder), probe(tmp_path, "zero3", "kl", smollm2_folder)
    assert plain["term"].item() > 1e-4
    assert abs(plain["term"].item() - zero3["term"].item()) <= 1e-6
    grads = [k for k in plain if k != "term"]
    assert len(grads) == 30 * 7 * 2
    for k in grads:
        scale = plain[k].abs().max()
        assert scale > 0, k
        assert (plain[k] - zero3[k]).abs().max() <= 1e-5 * scale, f"{k}: {(plain[k] - zero3[k]).abs().max()} of {scale}"
