"""The prompt: a user's history as item-code tokens in the paper's instruction format.

The default is the authors' (hsyoo32/peso, Fine-tuning/prompt.py): an Alpaca-style instruction,
"The user has interacted with items {history} in chronological order. Can you predict the next
possible item that the user may expect?", history items joined by ", ", and the response is the
target's code tokens followed by EOS, directly after "### Response:".

Two objectives share the template (`data.objective` in the trainer's config):
- response (the paper's): the prompt is the whole template, the target's codes and EOS follow it
  (`encode_prompt`, `encode`);
- sequence: the user's items are one list in the template's history slot, and the model learns
  to continue it. The prompt for a target is the template's text up to the history slot, then
  the history items each followed by the separator (`encode_list_prompt`), and the target's codes
  come next, without EOS (the list goes on). One pass over a chunk of a user's items
  (`encode_sequence`) trains every target inside it: target k sees exactly the tokens that
  `encode_list_prompt` gives for the items before it, so the per-target prompt of validation and
  test is the chunk's own prefix.

Encoding is done per training sample, so `encode` does not re-tokenize the rendered string: the
template's fixed text pieces are tokenized once per tokenizer and the items' code-token ids are
spliced in between. That equals tokenizing the rendered text (tests check it) because code
tokens are added tokens: a tokenizer splits the text at them first and tokenizes the pieces in
between independently.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from data_tools.index.codes import token
from data_tools.index.tokenizer import ItemCodebook

IGNORE = -100  # the label the loss skips (the default ignore_index of torch's cross_entropy)

DEFAULT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nThe user has interacted with items {history} in chronological order. "
    "Can you predict the next possible item that the user may expect?\n\n### Response:"
)

# For models built from a shape (random weights): the items alone. English words teach a
# from-scratch model nothing and cost tokens; the code tokens are distinct per level, so items
# need no separator either.
COMPACT_TEMPLATE = "{history}"
COMPACT_SEPARATOR = ""

Codes = ItemCodebook | Mapping[int, Sequence[str]]


def _tokens(codes: Codes, item: int) -> Sequence[str]:
    return codes.item_tokens(item) if isinstance(codes, ItemCodebook) else codes[item]


@dataclass(frozen=True)
class _Pieces:
    """Token ids of the template's fixed text, for one tokenizer."""

    vocab_size: int  # the tokenizer's length when these were made: a change invalidates them
    head: list[int]  # BOS (if any) + the text before the first history item
    separator: list[int]
    tail: list[int]  # the text after the last history item
    empty: list[int]  # BOS + the whole prompt for an empty history


@dataclass(frozen=True)
class PromptTemplate:
    """`text` with one "{history}" placeholder, filled with the history items' code tokens
    joined by `separator`. Rendering takes the codes as an `ItemCodebook` or a mapping
    item id -> tokens; encoding needs the codebook (the token ids)."""

    text: str = DEFAULT_TEMPLATE
    separator: str = ", "
    # tokenizer -> its _Pieces; weak, so a template never keeps a tokenizer alive
    _cache: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if self.text.count("{history}") != 1:
            raise ValueError("the prompt template needs exactly one {history} placeholder")

    def __reduce__(self):
        # Pickled without the cache (a WeakKeyDictionary cannot be), e.g. into DataLoader workers.
        return (PromptTemplate, (self.text, self.separator))

    def tokenizer_corpus(self, item_texts: Sequence[str]) -> list[str]:
        """What to train a tokenizer on (`train_sentencepiece_tokenizer`): the template's fixed
        text (separator included) once per item text, then the item texts. The repetition gives
        the template the weight it has in training data, where every sample contains it, so its
        words become whole tokens and prompts stay short. Empty for a template without words."""
        fixed = self.text.replace("{history}", self.separator)
        if not fixed.strip():
            return []  # a template of items alone (the compact one) reads no words at all
        return [fixed] * max(1, len(item_texts)) + list(item_texts)

    def render_prompt(self, history: Sequence[int], codes: Codes) -> str:
        return self.text.replace("{history}", self.separator.join("".join(_tokens(codes, i)) for i in history))

    def render_response(self, target: int, codes: Codes) -> str:
        """The target's code tokens (EOS is appended as an id by `encode`)."""
        return "".join(_tokens(codes, target))

    def _pieces(self, tokenizer, codebook: ItemCodebook) -> _Pieces:
        pieces = self._cache.get(tokenizer)
        if pieces is not None and pieces.vocab_size == len(tokenizer):
            return pieces
        # Render a history of two made-up items, tokenize it once, and cut the ids at the code
        # tokens: what precedes the first item, what lies between the two, what follows the last.
        levels = codebook.levels
        fake = "".join(token(level, 0) for level in range(levels))
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

        def ids_of(history: str) -> list[int]:
            return bos + tokenizer(self.text.replace("{history}", history), add_special_tokens=False)["input_ids"]

        ids = ids_of(self.separator.join([fake, fake]))
        code_ids = set(codebook.code_token_ids)
        at = [k for k, t in enumerate(ids) if t in code_ids]
        if len(at) != 2 * levels:
            raise ValueError("the prompt template's own text must not contain code tokens")
        empty = ids_of("")
        pieces = _Pieces(len(tokenizer), ids[: at[0]], ids[at[levels - 1] + 1 : at[levels]], ids[at[-1] + 1 :], empty)
        self._cache[tokenizer] = pieces
        return pieces

    def encode_prompt(self, tokenizer, codebook: ItemCodebook, history: Sequence[int]) -> list[int]:
        """Token ids of the prompt (BOS first if the tokenizer has one): the input of generation."""
        p = self._pieces(tokenizer, codebook)
        if not history:
            return list(p.empty)
        out = list(p.head)
        for k, item in enumerate(history):
            if k:
                out += p.separator
            out += codebook.item_token_ids(item)
        return out + p.tail

    def encode(self, tokenizer, codebook: ItemCodebook, history: Sequence[int], target: int) -> dict[str, list[int]]:
        """One training sample: input_ids = prompt + the target's code tokens + EOS; labels are
        IGNORE (-100, skipped by the loss) on the prompt and the ids themselves on the response."""
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no EOS token; the response must end with one")
        prompt = self.encode_prompt(tokenizer, codebook, history)
        if not prompt:
            raise ValueError(
                "an empty prompt leaves nothing to predict the first code from: use a tokenizer with a BOS "
                "token or a template with text before {history}"
            )
        response = codebook.item_token_ids(target) + [tokenizer.eos_token_id]
        return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}

    def encode_list_prompt(self, tokenizer, codebook: ItemCodebook, history: Sequence[int]) -> list[int]:
        """The sequence objective's prompt: the template up to its history slot, then every
        history item followed by the separator; the next item's codes continue it."""
        p = self._pieces(tokenizer, codebook)
        out = list(p.head)
        for item in history:
            out += codebook.item_token_ids(item) + p.separator
        return out

    def encode_sequence(
        self, tokenizer, codebook: ItemCodebook, items: Sequence[int], first_target: int
    ) -> dict[str, list[int]]:
        """A chunk of a user's items as one list; the code tokens of items[first_target:] are
        labels (each is a training target whose history is the items before it in the chunk),
        the others only context."""
        p = self._pieces(tokenizer, codebook)
        if not p.head:
            raise ValueError(
                "an empty prompt leaves nothing to predict the first code from: use a tokenizer with a BOS "
                "token or a template with text before {history}"
            )
        ids, labels = list(p.head), [IGNORE] * len(p.head)
        for k, item in enumerate(items):
            if k:
                ids += p.separator
                labels += [IGNORE] * len(p.separator)
            codes = codebook.item_token_ids(item)
            ids += codes
            labels += codes if k >= first_target else [IGNORE] * len(codes)
        return {"input_ids": ids, "labels": labels}
