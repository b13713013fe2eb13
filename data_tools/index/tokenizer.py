"""Tokenizers that know the item-code tokens, and the map between token ids and items.

- `add_code_tokens`: every `<x_n>` token (levels x codes) added to any Hugging Face tokenizer as
  an added token that is never split (a real backbone's tokenizer, from a local folder).
- `train_sentencepiece_tokenizer`: for the small models built from configs (demo, tests), a
  SentencePiece BPE model trained on the prompt template and the item texts, wrapped as a
  Hugging Face fast tokenizer and saved so `AutoTokenizer.from_pretrained(folder)` loads it.
- `ItemCodebook`: item id <-> code-token ids, and the `CodeTrie` of the catalog.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np

from data_tools.index.codes import token
from data_tools.index.trie import CodeTrie

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


def _bpe_merges(sp) -> list[tuple[str, str]]:
    """The merge list of a SentencePiece BPE model, which stores only scored pieces: every split
    of a piece into two pieces is a merge, ranked by the piece, then by its two halves (the
    order SentencePiece created them in). With these, `tokenizers`' BPE segments text exactly
    as SentencePiece does (tests check it on all MovieLens texts)."""
    rank = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, r in rank.items():
        if sp.is_control(r) or sp.is_byte(r) or sp.is_unknown(r):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in rank and right in rank:
                merges.append((r, rank[left], rank[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1000, seed: int = 0):
    """Train a SentencePiece BPE model on `texts`, save it as a Hugging Face fast tokenizer in
    `out_dir` (plus the SentencePiece model itself, `sentencepiece.model`, for reference), and
    return it (a `PreTrainedTokenizerFast`; BOS is added when encoding).

    Pass `PromptTemplate.tokenizer_corpus(item_texts)`: the template's text and the item texts
    are the only words the model reads besides code tokens. `vocab_size` is an upper bound
    (`hard_vocab_limit` off): a tiny corpus, such as the template alone when items have no text,
    gets fewer pieces. Byte fallback makes any text encodable (unseen characters become byte
    tokens, never `<unk>`). Single-threaded and seeded, so the same texts give the same tokenizer.
    """
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    corpus = [t for t in texts if t and not t.isspace()]
    if not corpus:
        raise ValueError("no text to train a tokenizer on")
    model = _train_sentencepiece(corpus, vocab_size, seed)
    sp = spm.SentencePieceProcessor(model_proto=model)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_fast_tokenizer(sp), bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )
    hf.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "sentencepiece.model"), "wb") as f:
        f.write(model)
    return hf


def _train_sentencepiece(corpus: list[str], vocab_size: int, seed: int) -> bytes:
    """The serialized SentencePiece BPE model trained on `corpus`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    # BPE rather than unigram: on a corpus dominated by one repeated template, BPE merges the
    # template's words into whole tokens (47 tokens for the default template; unigram: ~100+).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # Keep text as written (newlines, runs of spaces): the template's layout is part of the prompt.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _fast_tokenizer(sp):
    """The `tokenizers` BPE tokenizer that segments text as the SentencePiece model `sp` does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # "▁" marks word starts; the prefix space goes only before the start of the text, not after
    # each added (code) token, so the text between code tokens tokenizes the same anywhere.
    tok = Tokenizer(models.BPE(vocab, _bpe_merges(sp), unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def add_code_tokens(tokenizer, levels: int, codes_per_level: int) -> list[int]:
    """Add every code token `<a_0>` ... to `tokenizer` (in place) as a token that is never split;
    returns their ids in (level, code) order. Adding them again changes nothing.

    They are plain added tokens, not special ones: `decode(..., skip_special_tokens=True)` must
    keep them, since the generated item is read from them.
    """
    from tokenizers import AddedToken

    tokens = [token(level, code) for level in range(levels) for code in range(codes_per_level)]
    present = tokenizer.get_added_vocab()
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False, special=False, lstrip=False, rstrip=False, single_word=False)
            for t in tokens
            if t not in present
        ]
    )
    ids = tokenizer.convert_tokens_to_ids(tokens)
    # One call checks all of them: the concatenated tokens must come back one id per token.
    if tokenizer("".join(tokens), add_special_tokens=False)["input_ids"] != ids:
        raise ValueError(f"{type(tokenizer).__name__} splits some code tokens; it cannot be used with item codes")
    return ids


class ItemCodebook:
    """Item ids <-> code-token ids for one item index (`item_index.json` as loaded by
    `codes.load_item_index`) and a tokenizer that has the code tokens (`add_code_tokens`).

    Items that share a code (possible in an imported index, policy `keep`) have the same token
    ids; `item_of` then answers the lowest of their ids.
    """

    def __init__(self, index: dict, tokenizer):
        self.levels = int(index["levels"])
        self.codes_per_level = int(index["codes_per_level"])
        tokens = [token(level, code) for level in range(self.levels) for code in range(self.codes_per_level)]
        token_ids = tokenizer.convert_tokens_to_ids(tokens)
        vocab = tokenizer.get_added_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks {len(missing)} code tokens (first: {missing[0]}); "
                f"call add_code_tokens(tokenizer, {self.levels}, {self.codes_per_level}) first"
            )
        id_of = dict(zip(tokens, token_ids))
        n = 1 + max(int(k) for k in index["items"])
        self._ids = np.full((n, self.levels), -1, dtype=np.int64)
        self._tokens: dict[int, list[str]] = {}
        self._item_of: dict[tuple, int] = {}
        for key, toks in sorted(index["items"].items(), key=lambda kv: int(kv[0])):
            item = int(key)
            ids = [id_of[t] for t in toks]
            self._ids[item] = ids
            self._tokens[item] = toks
            self._item_of.setdefault(tuple(ids), item)
        self.code_token_ids: list[int] = sorted(token_ids)
        # [level][code] -> token id
        self.code_token_table = np.asarray(token_ids, dtype=np.int64).reshape(self.levels, self.codes_per_level)
        self.trie = CodeTrie(self._item_of)

    def __len__(self) -> int:
        """Number of items."""
        return len(self._tokens)

    def item_tokens(self, item: int) -> list[str]:
        return self._tokens[item]

    def item_token_ids(self, item: int) -> list[int]:
        if not 0 <= item < len(self._ids) or self._ids[item, 0] < 0:
            raise KeyError(f"item {item} is not in the item index")
        return self._ids[item].tolist()

    def item_of(self, token_ids) -> int | None:
        """The item whose code is `token_ids` (lowest id if shared), None if no item has it."""
        return self._item_of.get(tuple(int(t) for t in token_ids))
