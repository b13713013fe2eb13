"""Decoding: batched beam search constrained by the prefix trie of real item codes.

The prompt runs once; its KV cache is shared by the user's beams (a 4D attention mask lets each
beam see its prompt and its own earlier tokens); then one token per code level, each step's
candidates restricted to the continuations the trie allows after the beam's prefix. So every
output is a real item (the evaluation counts invalid outputs, and there must be none). Beams
that cannot continue (fewer valid continuations than beams, or an empty allowed set) score -inf
and never rank. The trie's masks are built on the device (`DeviceTrie`, data_tools/index/trie.py).
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

NEG = float("-inf")

# transformers names a forward's KV cache `cache` from 5.24 on; earlier releases call it
# `past_key_values` and ignore `cache` without a word (the search would then decode from an empty
# cache). Later ones still take `past_key_values`, with a warning, until 5.40.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax, with -inf (not NaN) for a row whose logits are all -inf."""
    return torch.log_softmax(logits.float(), -1).nan_to_num(nan=NEG)


def decoding_forward(model):
    """The `forward` that constrained_beam_search calls, for a Hugging Face causal LM (or a
    DeepSpeed engine around one): the logits of the last `keep` positions, with the KV cache."""

    def forward(ids, mask, position, cache, keep):
        kwargs = {CACHE_ARG: cache}
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=keep, **kwargs
        )
        return out.logits

    return forward


@torch.no_grad()
def constrained_beam_search(
    forward,
    prompts: list[list[int]],
    trie,
    levels: int,
    beams: int,
    pad_id: int,
    device,
    shared_prompt: bool = True,
    trie_masks: str = "device",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `beams` code sequences per prompt: (tokens [B, beams, levels], log-prob scores [B, beams]).

    `forward(input_ids, attention_mask, position_ids, cache, keep)` returns the logits of the last
    `keep` input positions, [N, keep, V]; `attention_mask` is 2D [N, seen + new] or, for the
    decoding steps of the shared-prompt search, an additive float 4D mask [N, 1, new, seen + new].

    `shared_prompt` (the default): the B prompts run once, and their KV cache (B rows, not
    B*beams) is shared by the beams of each user; each decoding step feeds the beams' newest
    tokens as one row of `beams` query positions per user, whose 4D mask lets each beam attend
    to its prompt and to its own ancestors' tokens among the cached generated ones (a tree of
    beams: no copy of the prompt cache per beam, no reorder). It needs an attention that takes
    a 4D mask (sdpa, eager). `shared_prompt=False`: the cache is repeated for the beams and
    reordered at each step (for flash_attention_2), one query position per beam.

    `trie` is a CodeTrie; `trie_masks` "device" (the default) builds each step's mask on `device`
    from the trie's tensors (`trie.on(device)`), "host" as before: from the beams' prefixes read
    back to the host, then copied over (kept to measure the difference: bench/eval.py). Both
    give the same masks, so the same sequences and scores."""
    if trie_masks not in ("device", "host"):
        raise ValueError(f"trie_masks must be device or host, not {trie_masks!r}")
    masks = trie.on(device) if trie_masks == "device" else trie
    ids, mask = _left_padded(prompts, pad_id, device)
    position = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = forward(ids, mask, position, cache, 1)[:, -1]  # [B, V]
    seqs, scores = _first_codes(logits, masks, beams, device)
    steps = (_SharedPromptSteps if shared_prompt else _RepeatedPromptSteps)(
        forward, cache, mask, position, beams, device, logits.dtype
    )
    for step in range(1, levels):
        logits = steps.logits(seqs, step)  # [B*beams, V]
        seqs, scores, parent = _extend_beams(seqs, scores, logits, masks, device)
        if step < levels - 1:  # after the last level the cache is not read again
            steps.follow(parent)
    return seqs, scores


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch on `device`: input ids and attention mask, [B, width]."""
    b, width = len(prompts), max(len(prompt) for prompt in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _first_codes(logits: torch.Tensor, masks, beams: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The beams' first tokens from the prompts' last logits [B, V]: (seqs [B, beams, 1], scores
    [B, beams]), -inf scores where fewer first tokens than beams exist."""
    b, vocab_size = logits.shape
    root = torch.zeros((b, 0), dtype=torch.long, device=device)  # no token generated yet
    logp = _log_probs(logits).masked_fill(~masks.allowed_mask(root, vocab_size, device), NEG)
    scores, tokens = logp.topk(beams, dim=-1)  # [B, beams]
    return tokens.unsqueeze(-1), scores


def _extend_beams(seqs: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor, masks, device):
    """One code level more: the best `beams` continuations the trie allows of every user's
    beams, from the beams' logits [B*beams, V]. Returns (seqs [B, beams, step + 1], scores
    [B, beams], each new beam's parent [B, beams])."""
    b, beams, step = seqs.shape
    vocab_size = logits.shape[-1]
    logp = _log_probs(logits)
    allowed = masks.allowed_mask(seqs.reshape(b * beams, step), vocab_size, device)
    cand = (scores.reshape(-1, 1) + logp).masked_fill(~allowed, NEG)  # dead beams stay -inf
    scores, idx = cand.reshape(b, beams * vocab_size).topk(beams, dim=-1)
    parent, token = idx // vocab_size, idx % vocab_size
    seqs = torch.cat([seqs.gather(1, parent.unsqueeze(-1).expand(-1, -1, step)), token.unsqueeze(-1)], -1)
    return seqs, scores, parent


class _SharedPromptSteps:
    """The decoding steps of the shared-prompt search: the B prompts' cache read by every beam,
    each step's new tokens fed as one row of `beams` query positions per user under a 4D mask."""

    def __init__(self, forward, cache, mask, position, beams: int, device, logits_dtype):
        b, width = mask.shape
        self.forward, self.cache, self.beams, self.device = forward, cache, beams, device
        self.last_pos = position[:, -1:]  # [B, 1]
        layers = getattr(cache, "layers", None)
        self.dtype = layers[0].keys.dtype if layers and layers[0].keys is not None else logits_dtype  # the queries'
        # Bool [B, beams, keys] of what each beam's newest token may attend to: its prompt (the
        # left padding excluded), then the generated tokens fed so far, one block of `beams` per
        # step, of which a beam sees its ancestors' (one per block) and its own.
        self.sees = mask.bool().unsqueeze(1).expand(b, beams, width)
        self.eye = torch.eye(beams, dtype=torch.bool, device=device).expand(b, beams, beams)

    def logits(self, seqs: torch.Tensor, step: int) -> torch.Tensor:
        """The logits [B*beams, V] after each beam's newest token (the step's forward)."""
        b, beams, dtype = seqs.shape[0], self.beams, self.dtype
        self.sees = torch.cat([self.sees, self.eye], -1)
        bias = torch.zeros(self.sees.shape, dtype=dtype, device=self.device).masked_fill_(
            ~self.sees, torch.finfo(dtype).min
        )
        position = (self.last_pos + step).expand(b, beams)
        return self.forward(seqs[:, :, -1], bias.unsqueeze(1), position, self.cache, beams).reshape(b * beams, -1)

    def follow(self, parent: torch.Tensor) -> None:
        """A new beam sees what its parent saw (its parent's token included)."""
        self.sees = self.sees.gather(1, parent.unsqueeze(-1).expand(-1, -1, self.sees.shape[-1]))


class _RepeatedPromptSteps:
    """The decoding steps without a 4D mask (flash_attention_2): the prompts' cache repeated for
    the beams and reordered after each step, one query position per beam."""

    def __init__(self, forward, cache, mask, position, beams: int, device, logits_dtype):
        self.forward, self.cache, self.beams, self.device = forward, cache, beams, device
        cache.batch_repeat_interleave(beams)
        self.mask = mask.repeat_interleave(beams, 0)
        self.last_pos = position[:, -1:].repeat_interleave(beams, 0)

    def logits(self, seqs: torch.Tensor, step: int) -> torch.Tensor:
        """The logits [B*beams, V] after each beam's newest token (the step's forward)."""
        flat = seqs.reshape(-1, step)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        return self.forward(flat[:, -1:], self.mask, self.last_pos + step, self.cache, 1)[:, -1]

    def follow(self, parent: torch.Tensor) -> None:
        """A full copy of the cache, in the new beams' order."""
        b = parent.shape[0]
        self.cache.reorder_cache((parent + torch.arange(b, device=self.device).unsqueeze(1) * self.beams).reshape(-1))


def decode_batch(
    forward,
    prompts: list[list[int]],
    codebook,
    beams: int,
    pad_id: int,
    device,
    shared_prompt: bool = True,
    trie_masks: str = "device",
    users: int | None = None,
) -> tuple[list[list[list[int]]], list[list[float]]]:
    """The evaluation's decoding of one batch: the constrained beam search, then the codes and
    scores of the first `users` prompts (the rest are padding) read back to the host at once,
    as lists [users][beams] (one transfer per tensor, not one per beam)."""
    seqs, scores = constrained_beam_search(
        forward, prompts, codebook.trie, codebook.levels, beams, pad_id, device, shared_prompt, trie_masks
    )
    users = len(prompts) if users is None else users
    return seqs[:users].tolist(), scores[:users].tolist()
