"""The sequence objective: the same supervised targets as the response objective, each once, with
its history inside its chunk, and a chunk's loss equal to its targets' one-by-one losses."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from data_tools.dataset import load_manifest
from data_tools.index.codes import load_item_index
from data_tools.index.prompt import COMPACT_SEPARATOR, COMPACT_TEMPLATE, PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer
from data_tools.reader import window_split
from data_tools.sequences import chunk_sequence, user_sequences, window_chunks
from train.loop.data import collate
from train.loop.loss import lm_loss
from train.model.vocab import SampleEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("max_history", [20, 5])
def test_chunks_supervise_exactly_the_response_targets(ml_indexed, max_history):
    manifest = load_manifest(ml_indexed)
    empty_histories = 0
    for t in range(len(manifest["windows"])):
        samples = list(window_split(ml_indexed, t, "train", manifest=manifest))
        empty_histories += sum(not s["history"] for s in samples)
        histories: dict = {}
        for s in samples:
            histories.setdefault((s["user"], s["target"]), []).append(tuple(s["history"]))
        chunks = window_chunks(samples, max_history)
        supervised = Counter()
        for c in chunks:
            items, first = c["items"], c["first_target"]
            assert len(items) <= max_history + 1 and 0 <= first < len(items)
            for k in range(first, len(items)):
                supervised[(c["user"], items[k])] += 1
                # The history a target sees in its chunk is the end of its response-mode history,
                # and at least half of max_history long (or all the user has).
                seen = tuple(items[:k])
                full = [h for h in histories[(c["user"], items[k])] if h[len(h) - len(seen) :] == seen]
                assert full and len(seen) >= min(len(full[0]), max_history // 2)
        assert supervised == Counter((s["user"], s["target"]) for s in samples), f"window {t}"
    # A new user's first interaction is a training target with an empty history (the authors' rule).
    assert empty_histories == sum(w["stats"]["train_targets_without_history"] for w in manifest["windows"]) > 0


def test_a_long_sequence_is_cut_with_half_a_history_of_context():
    seq = {"user": 7, "context": list(range(100, 130)), "targets": list(range(50))}
    chunks = chunk_sequence(seq, 20)
    assert [c["items"][c["first_target"] :] for c in chunks] == [
        list(range(0, 11)),
        list(range(11, 22)),
        list(range(22, 33)),
        list(range(33, 44)),
        list(range(44, 50)),
    ]
    assert chunks[0]["items"][:10] == list(range(120, 130))  # the context: the last items before the window
    assert chunks[-1]["items"] == list(range(29, 50))  # the last one takes all the context that fits
    assert chunk_sequence({"user": 1, "context": [], "targets": [4, 5]}, 20) == [
        {"user": 1, "items": [4, 5], "first_target": 0}
    ]


def test_targets_that_are_not_consecutive_are_refused():
    samples = [
        {"user": 3, "key": "3_0_1", "history": [9], "target": 1},
        {"user": 3, "key": "3_0_3", "history": [9, 1, 2], "target": 4},
    ]
    with pytest.raises(ValueError, match="not consecutive"):
        user_sequences(samples)


@pytest.fixture(scope="module")
def vocab(ml_indexed, tmp_path_factory):
    index = load_item_index(ml_indexed)
    folder = str(tmp_path_factory.mktemp("tok"))
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus([]), folder)
    add_code_tokens(tok, index["levels"], index["codes_per_level"])
    return tok, ItemCodebook(index, tok)


@pytest.mark.parametrize(
    "template", [PromptTemplate(), PromptTemplate(COMPACT_TEMPLATE, COMPACT_SEPARATOR)], ids=["paper", "compact"]
)
def test_a_chunk_loss_equals_the_sum_of_its_targets_losses(vocab, ml_indexed, template):
    """One causal pass over a chunk gives every target exactly the loss it has alone, with its
    in-chunk history as the prompt that validation and test use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, book = vocab
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    encoder = SampleEncoder(tok, book, template, 20, "sequence")
    every = window_chunks(window_split(ml_indexed, 1, "train"), 20)
    # new users (no context: the first target has an empty history) and users with earlier items
    chunks = [c for c in every if c["first_target"] == 0][:3] + [c for c in every if c["first_target"] > 0][:3]
    assert len(chunks) == 6
    with torch.no_grad():
        total, count = lm_loss(model, collate([encoder(c) for c in chunks], tok.pad_token_id), 0.8)
        one_by_one = [
            lm_loss(model, collate([encoder.target(c["items"][:k], c["items"][k])], tok.pad_token_id), 0.8)
            for c in chunks
            for k in range(c["first_target"], len(c["items"]))
        ]
    assert (
        int(count) == sum(int(n) for _, n in one_by_one) == 4 * sum(len(c["items"]) - c["first_target"] for c in chunks)
    )
    assert abs(float(total) - sum(float(s) for s, _ in one_by_one)) < 1e-3 * float(total)
    # The test prompt is the chunk's own prefix: the list so far, the next item's codes follow.
    c = chunks[0]
    ids = encoder(c)["input_ids"]
    k = len(c["items"]) - 1
    prompt = encoder.prompt(c["items"][:k])
    assert ids[: len(prompt)] == prompt and ids[len(prompt) :] == book.item_token_ids(c["items"][k])


def test_response_objective_keeps_the_papers_prompt_and_eos(vocab):
    tok, book = vocab
    template = PromptTemplate()
    encoder = SampleEncoder(tok, book, template, 20, "response")
    sample = encoder({"history": [1, 2, 3], "target": 4})
    assert sample == template.encode(tok, book, [1, 2, 3], 4)
    assert sample["labels"][-5:] == book.item_token_ids(4) + [tok.eos_token_id] and encoder.response_len == 5
    assert SampleEncoder(tok, book, template, 20, "sequence").response_len == 4
