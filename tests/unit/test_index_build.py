"""Built item indexes on real data (MovieLens-100K): unique codes, training, incremental coding."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_tools.__main__ import main
from data_tools.accounting import InputError
from data_tools.dataset import ITEM_INDEX, ITEMS
from data_tools.index.build import QUANTIZER, CodingOptions, build_index, read_items
from data_tools.index.codes import TOKEN_RE, load_item_index
from data_tools.index.embed import Embedder
from data_tools.index.prompt import PromptTemplate
from data_tools.index.rqvae import RQVAE, RQVAEConfig, fit_rqvae
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _dataset_with(tmp, items: list[dict]) -> str:
    """A folder with just an items.jsonl: all that `index` reads."""
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, ITEMS), "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return str(tmp)


@pytest.fixture(scope="module")
def ml_items(ml_dataset):
    return read_items(ml_dataset)


@pytest.fixture(scope="module")
def ml_embeddings(ml_items, tmp_path_factory) -> str:
    """all-MiniLM-L6-v2 embeddings of every MovieLens item text, computed once (a few seconds)."""
    x = Embedder("minilm", progress=False)([it["text"] for it in ml_items], [it["item_id"] for it in ml_items])
    path = str(tmp_path_factory.mktemp("emb") / "ml.npy")
    np.save(path, x)
    return path


@pytest.fixture(scope="module")
def ml_index(ml_items, ml_embeddings, tmp_path_factory):
    root = _dataset_with(tmp_path_factory.mktemp("full"), ml_items)
    doc = build_index(root, CodingOptions(embedder=f"npy:{ml_embeddings}"), progress=False, log=io.StringIO())
    return root, doc


def test_movielens_items_all_get_unique_codes(ml_items, ml_index):
    root, doc = ml_index
    codes = {int(k): tuple(v) for k, v in doc["items"].items()}
    assert sorted(codes) == [it["item_id"] for it in ml_items]
    assert len(set(codes.values())) == len(ml_items) == 1682
    for tokens in codes.values():
        assert [TOKEN_RE.match(t).group(1) for t in tokens] == ["a", "b", "c", "d"]
        assert all(int(TOKEN_RE.match(t).group(2)) < 256 for t in tokens)
    c = doc["method"]["collisions"]
    # 18 MovieLens texts occur twice (same embedding, same natural code): one item of each pair
    # had to move, so resolution really had work to do, and left no collision.
    assert sum(s["reassigned"] for s in c["steps"]) >= 18
    assert c["before"]["items_sharing_a_code"] >= 18
    assert c["after"] == {"items_sharing_a_code": 0, "codes_shared": 0}
    assert sum(s["items"] for s in c["steps"]) == 1682
    # Restarting dead codewords keeps every level in wide use (without it level 0 falls to ~80).
    assert len(doc["perplexity"]) == 4 and min(doc["perplexity"]) > 150
    assert load_item_index(root) == doc


def test_reconstruction_loss_falls(ml_items, ml_embeddings, ml_index):
    root, doc = ml_index
    method = doc["method"]
    x0 = np.load(ml_embeddings)[[it["item_id"] for it in ml_items if it["first_window"] == 0]]
    assert method["fit"] == {"first_window": 0, "items": len(x0)}
    # The saved quantizer reproduces the recorded final losses on the fitting set...
    model = RQVAE(RQVAEConfig.from_json(method["rqvae"]))
    model.load_state_dict(load_file(os.path.join(root, QUANTIZER)))
    end = model.evaluate(model.standardize(torch.from_numpy(x0)))
    assert end == method["training"]["end"]
    # ...and the same seed without training (k-means init only) gives the recorded start.
    _, untrained = fit_rqvae(x0, RQVAEConfig.from_json({**method["rqvae"], "epochs": 0}), progress=False)
    assert untrained["end"] == method["training"]["start"]
    assert end["reconstruction"] < 0.6 * untrained["end"]["reconstruction"]


def test_later_windows_never_change_earlier_codes(ml_items, ml_embeddings, ml_index, tmp_path):
    """Index a dataset whose catalog is only window 0, then the same dataset once later windows
    bring new items: old codes stay, new items get unique codes, and the result is byte for
    byte the index built in one go (so the run is also deterministic across two fits)."""
    full_root, _ = ml_index
    spec = f"npy:{ml_embeddings}"
    first = [it for it in ml_items if it["first_window"] == 0]
    root = _dataset_with(tmp_path / "ds", first)
    before = build_index(root, CodingOptions(embedder=spec), progress=False, log=io.StringIO())["items"]
    assert len(before) == len(first)

    _dataset_with(tmp_path / "ds", ml_items)
    with pytest.raises(InputError, match="--levels 4"):
        build_index(root, CodingOptions(embedder=spec, levels=3), progress=False, log=io.StringIO())
    log = io.StringIO()
    after = build_index(root, CodingOptions(embedder=spec), progress=False, log=log)["items"]
    assert "fit the RQ-VAE" not in log.getvalue()  # the frozen quantizer coded the new items
    assert {k: after[k] for k in before} == before
    assert len(after) == len(ml_items) and len({tuple(v) for v in after.values()}) == len(ml_items)
    with open(os.path.join(root, ITEM_INDEX), "rb") as a, open(os.path.join(full_root, ITEM_INDEX), "rb") as b:
        assert a.read() == b.read()


def test_rerun_without_new_items_is_up_to_date(ml_index, ml_embeddings):
    root, doc = ml_index
    path = os.path.join(root, ITEM_INDEX)
    stamp = os.stat(path).st_mtime_ns
    log = io.StringIO()
    assert build_index(root, CodingOptions(embedder=f"npy:{ml_embeddings}"), progress=False, log=log) == doc
    assert "up to date" in log.getvalue() and os.stat(path).st_mtime_ns == stamp


def test_code_tokens_to_item_to_code_tokens_is_identity(ml_items, ml_index, tmp_path):
    _, doc = ml_index
    template = PromptTemplate()
    tok = train_sentencepiece_tokenizer(
        template.tokenizer_corpus([it["text"] for it in ml_items]), str(tmp_path / "tok")
    )
    ids = add_code_tokens(tok, doc["levels"], doc["codes_per_level"])
    book = ItemCodebook(doc, tok)
    assert book.code_token_ids == sorted(ids) and len(book) == len(ml_items)
    for key, tokens in doc["items"].items():
        token_ids = book.item_token_ids(int(key))
        assert tok.convert_ids_to_tokens(token_ids) == tokens
        assert book.item_of(token_ids) == int(key)
    # A code of no item: item 0's prefix with a last-level token none of its siblings has.
    prefix = book.item_token_ids(0)[:-1]
    unused = next(t for t in ids[3 * 256 :] if t not in book.trie.allowed(prefix))
    assert book.item_of(prefix + [unused]) is None
    assert len(book.trie) == len(ml_items)


def test_cli_builds_with_minilm_on_a_tiny_catalog(ml_items, tmp_path, capsys):
    """End to end through the command line with the bundled MiniLM: 40 items and 64 codes per
    level, so k-means starts from fewer points than codewords."""
    root = _dataset_with(tmp_path / "tiny", ml_items[:40])
    assert sum(it["first_window"] == 0 for it in ml_items[:40]) < 64
    rc = main(["index", root, "--levels", "2", "--codes", "64", "--epochs", "5", "--no-progress"])
    assert rc == 0
    doc = load_item_index(root)
    assert doc["levels"] == 2 and doc["codes_per_level"] == 64 and doc["method"]["embedder"] == "minilm"
    assert len({tuple(v) for v in doc["items"].values()}) == 40
    assert "perplexity per level" in capsys.readouterr().err


def test_items_without_text_point_to_import(ml_items, tmp_path, capsys):
    root = _dataset_with(tmp_path / "notext", [{**it, "title": "", "text": ""} for it in ml_items[:50]])
    with pytest.raises(InputError, match="--import"):
        build_index(root, progress=False, log=io.StringIO())
    assert main(["index", root, "--no-progress"]) == 2
    assert "--import" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, ITEM_INDEX))


def test_missing_quantizer_is_a_clear_error(ml_index, ml_items, ml_embeddings, tmp_path):
    src, _ = ml_index
    root = str(tmp_path / "copy")
    shutil.copytree(src, root)
    os.unlink(os.path.join(root, QUANTIZER))
    _dataset_with(root, ml_items + [{**ml_items[0], "item_id": len(ml_items), "source_id": "new", "first_window": 5}])
    with pytest.raises(FileNotFoundError, match="--force"):
        build_index(root, CodingOptions(embedder=f"npy:{ml_embeddings}"), progress=False, log=io.StringIO())
