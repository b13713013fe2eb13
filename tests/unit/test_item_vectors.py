"""`model.item_vectors`: the co-occurrence vectors (deterministic, from training splits only,
aligned across periods) and the input they add (exactly at each item's last code token, the
same in a one-pass forward and a cached decode)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_tools.cooccurrence import align_to, cooccurrence_counts, ppmi_svd_vectors
from data_tools.dataset import load_manifest
from data_tools.index.codes import load_item_index
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer
from data_tools.reader import window_split
from train.model.item_vectors import attach_item_input, build_item_vectors, code_keys, item_codes, item_input_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LEVELS, CODES, FIRST = 4, 8, 200  # token id of (level, code) = FIRST + level * CODES + code


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=FIRST + LEVELS * CODES,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def tokens(codes: list[int]) -> list[int]:
    return [FIRST + level * CODES + c for level, c in enumerate(codes)]


def table(items: list[list[int]], dim: int = 5) -> dict:
    return {
        "codes": torch.tensor(items),
        "vectors": torch.randn(len(items), dim, generator=torch.Generator().manual_seed(1)),
        "code_token_ids": torch.arange(FIRST, FIRST + LEVELS * CODES).reshape(LEVELS, CODES),
    }


def test_vectors_are_added_exactly_where_an_item_ends():
    items = [[1, 2, 3, 4], [0, 0, 0, 0], [7, 6, 5, 4]]
    vectors = table(items)
    # BOS, item 0, item 2, a lone last-level token (no item ends there), item 1, an item without
    # a vector ([2, 2, 2, 2]), and the first codes of an item (no end yet)
    ids = [1, *tokens(items[0]), *tokens(items[2]), FIRST + 3 * CODES + 4, *tokens(items[1]), *tokens([2, 2, 2, 2])]
    ids = torch.tensor([ids + tokens([1, 2, 3])])
    model = tiny_model()
    plain = model.model.embed_tokens(ids).detach()
    module = attach_item_input(model, vectors, seed=0)
    expected = plain.clone()
    for position, item in ((4, 0), (8, 2), (13, 1)):
        expected[0, position] += module.proj.weight.detach() @ vectors["vectors"][item]
    _, known = module.rows(ids)
    assert torch.nonzero(known[0]).ravel().tolist() == [4, 8, 13]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        reference = tiny_model()(inputs_embeds=expected).logits
        without = tiny_model()(input_ids=ids).logits
    assert torch.allclose(out, reference, atol=1e-6)
    assert (out - without).abs().max() > 1e-3  # the vectors change the output: the test can fail


def test_a_cached_decode_equals_one_pass():
    """The beam search runs the prompt once, then one token at a time with the cache: the same
    logits as one pass over the whole sequence (the generated codes of levels 1-3 get nothing)."""
    items = [[1, 2, 3, 4], [0, 0, 0, 0], [7, 6, 5, 4]]
    model = tiny_model()
    attach_item_input(model, table(items), seed=0)
    prompt = torch.tensor([[1, *tokens(items[0]), *tokens(items[2])]])
    generated = torch.tensor([tokens([0, 0, 0])])
    with torch.no_grad():
        whole = model(input_ids=torch.cat([prompt, generated], 1)).logits
        out = model(input_ids=prompt, use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for k in range(generated.shape[1]):
            out = model(input_ids=generated[:, k : k + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), whole[:, prompt.shape[1] - 1 :], atol=1e-5)


def test_ppmi_svd_vectors_are_deterministic_unit_and_collaborative():
    rng = np.random.default_rng(0)
    # two groups of items that users take up together; no sequence mixes them
    sequences = [list(rng.choice(20, 6, replace=False)) for _ in range(300)]
    sequences += [list(rng.choice(20, 6, replace=False) + 20) for _ in range(300)]
    counts = cooccurrence_counts(sequences)
    items, vectors = ppmi_svd_vectors(counts, dim=8)
    again_items, again = ppmi_svd_vectors(cooccurrence_counts(sequences), dim=8)
    assert items == again_items == list(range(40)) and np.array_equal(vectors, again)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    cos = vectors @ vectors.T
    same = np.mean([cos[i, j] for i in range(20) for j in range(20) if i != j])
    other = np.mean([cos[i, j] for i in range(20) for j in range(20, 40)])
    assert same > other + 0.5, (same, other)


def test_fewer_items_than_dimensions_pad_with_zeros():
    items, vectors = ppmi_svd_vectors(cooccurrence_counts([[1, 2, 3, 4, 5]]), dim=16)
    assert items == [1, 2, 3, 4, 5] and vectors.shape == (5, 16) and not vectors[:, 3:].any()


def test_alignment_undoes_a_rotation():
    rng = np.random.default_rng(0)
    previous = rng.normal(size=(50, 6)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    keys = np.arange(50)
    # the new build has the shared items rotated, plus 10 new ones
    fresh = np.concatenate([previous[5:] @ rotation, rng.normal(size=(10, 6))]).astype(np.float32)
    fresh_keys = np.concatenate([keys[5:], np.arange(100, 110)])
    aligned = align_to(fresh, fresh_keys, previous, keys)
    assert np.allclose(aligned[:45], previous[5:], atol=1e-4)
    assert np.allclose(np.linalg.norm(aligned, axis=1), np.linalg.norm(fresh, axis=1), atol=1e-5)


@pytest.fixture(scope="module")
def codebook(ml_indexed, tmp_path_factory):
    index = load_item_index(ml_indexed)
    tok = train_sentencepiece_tokenizer(["items"], str(tmp_path_factory.mktemp("tok")), vocab_size=300, seed=0)
    add_code_tokens(tok, index["levels"], index["codes_per_level"])
    return ItemCodebook(index, tok)


def test_a_period_s_vectors_come_from_training_splits_only_and_follow_the_previous(ml_indexed, codebook):
    manifest = load_manifest(ml_indexed)
    first = build_item_vectors(ml_indexed, manifest, 0, codebook, 16, None)
    second = build_item_vectors(ml_indexed, manifest, 1, codebook, 16, first)
    per_level = codebook.codes_per_level
    for period, tensors in ((0, first), (1, second)):
        trained = set()
        for window in range(period + 1):
            for s in window_split(ml_indexed, window, "train", manifest=manifest):
                trained.update([*s["history"], s["target"]])
        keys = set(code_keys(tensors["codes"], per_level).tolist())
        assert len(keys) == len(tensors["codes"]) > 0  # one row per distinct code
        assert keys == set(code_keys(item_codes(codebook, sorted(trained)), per_level).tolist())
    # period 1's vectors were rotated onto period 0's: the shared items point the same way
    a, b = code_keys(first["codes"], per_level).numpy(), code_keys(second["codes"], per_level).numpy()
    _, i, j = np.intersect1d(a, b, return_indices=True)
    cos = (first["vectors"][i] * second["vectors"][j]).sum(1)
    assert len(i) > 100 and cos.mean() > 0.5, cos.mean()


def test_the_projection_is_found_and_trains():
    model = tiny_model().train()
    attach_item_input(model, table([[1, 2, 3, 4]]), seed=0)
    ids = torch.tensor([[1, *tokens([1, 2, 3, 4]), *tokens([0, 1, 2])]])
    model(input_ids=ids, labels=ids).loss.backward()
    grad = item_input_of(model).proj.weight.grad
    assert grad is not None and grad.abs().max() > 0
