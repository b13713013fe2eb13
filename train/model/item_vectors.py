"""`model.item_vectors`: collaborative item vectors added to the model's input at each item's
last code token (why: data_tools/cooccurrence.py).

The vectors are fixed; what trains is one projection (`Linear(dim, hidden, bias=False)`), in
period 0 and in every later period, like the code-token rows (a proximal term pulls on it only
with `method.pull: all`: train/methods/proximal.py).

Per period t, rank 0 builds the vectors once from the training splits of windows 0..t (so items
new in window t have one), rotated onto period t-1's vectors so that the projection trained on
those still reads them, and writes `periods/<t>/item_vectors.safetensors` atomically; every rank,
and a resumed run, loads that file:

    codes           [items, levels]   each item's code per level (the key of its row)
    vectors         [items, dim]      its unit vector
    code_token_ids  [levels, codes]   the token id of (level, code) in the run's tokenizer

Every export (the period's adapter or model folder, and a recommender export) holds the same
file plus `proj` [hidden, dim], the trained projection, so it can be served on its own. The rest
of train/ reaches all this through the model add-on `item_vectors` (train/model/addons/).

Where it is added: a forward pre-hook on the decoder (the Llama `model.model`) turns
`input_ids` into `inputs_embeds` (the token embeddings, through peft's trainable-token rows,
plus the projected vector at every position that ends an item: a last-level code token right
after the item's other codes). A hook on the embedding itself would be bypassed: peft's
trainable-tokens wrapper computes its own `F.embedding` from the base weight. Decoding needs
nothing special: the beam search feeds back only the codes of levels 1..L-1 of the item it
generates, and the prompt's items get their vectors in the prompt's forward.

Exact under ZeRO-3: the projection is an ordinary child module of the decoder, so ZeRO-3
partitions it and gathers it while it runs (tests/dist/test_methods.py compares the gradients
of 2 partitioned ranks with one process's).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save, save_file

from data_tools.atomic import atomic_write_bytes
from data_tools.cooccurrence import REACH, align_to, cooccurrence_counts, ppmi_svd_vectors
from data_tools.readback import load_safetensors
from data_tools.reader import window_split
from data_tools.sequences import user_sequences
from train.dist.params import rank0_writes

log = logging.getLogger(__name__)

FILE = "item_vectors.safetensors"


# ---- building the vectors of a period -----------------------------------------------------------


def item_codes(codebook, items: list[int]) -> np.ndarray:
    """[items, levels]: each item's code index per level."""
    table = codebook.code_token_table  # [levels, codes] token ids
    code_of = {int(t): c for level in table for c, t in enumerate(level)}
    return np.array([[code_of[t] for t in codebook.item_token_ids(i)] for i in items], dtype=np.int64)


def code_keys(codes: torch.Tensor | np.ndarray, codes_per_level: int):
    """One integer per item: its codes in base `codes_per_level`, the first level most significant."""
    keys = codes[:, 0] * 0
    for level in range(codes.shape[1]):
        keys = keys * codes_per_level + codes[:, level]
    return keys


def build_item_vectors(data_root: str, manifest: dict, period: int, codebook, dim: int, previous: dict | None):
    """The tensors of period `period`'s file (see the module doc), from the training splits of
    windows 0..period; rotated onto `previous` (period-1's file) when given."""
    counts: dict = {}
    for window in range(period + 1):
        sequences = user_sequences(window_split(data_root, window, "train", manifest=manifest))
        for pair, n in cooccurrence_counts((s["context"] + s["targets"] for s in sequences), REACH).items():
            counts[pair] = counts.get(pair, 0.0) + n
    items, vectors = ppmi_svd_vectors(counts, dim)
    codes = item_codes(codebook, items)
    per_level = codebook.codes_per_level
    keys = code_keys(codes, per_level)
    # Items that share every code (an imported index may have them) are one input to the model:
    # the first of them in item-id order keeps the row.
    keys, first = np.unique(keys, return_index=True)
    codes, vectors = codes[first], vectors[first]
    if previous is not None:
        old = previous["vectors"].numpy()
        vectors = align_to(vectors, keys, old, code_keys(previous["codes"].numpy(), per_level))
    return {
        "codes": torch.from_numpy(codes),
        "vectors": torch.from_numpy(np.ascontiguousarray(vectors)),
        "code_token_ids": torch.as_tensor(np.asarray(codebook.code_token_table), dtype=torch.int64),
    }


def vectors_path(run, period: int) -> str:
    return os.path.join(run.period_dir(period), FILE)


def prepare_item_vectors(cfg, run, manifest: dict, period: int, codebook, strategy) -> dict:
    """Period `period`'s vectors: built and written by rank 0 if missing, then loaded by every rank."""
    path = vectors_path(run, period)
    if strategy.is_rank0 and not os.path.isfile(path):
        # train/main.py (check_inputs) has made sure period t-1 has its file
        previous = load_safetensors(vectors_path(run, period - 1), what="the item vectors") if period > 0 else None
        tensors = build_item_vectors(cfg.data.path, manifest, period, codebook, cfg.model.item_vectors, previous)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, save(tensors))
        log.info(
            f"period {period}: item vectors of {len(tensors['codes']):,} items (dim {cfg.model.item_vectors}) "
            f"from the training splits of windows 0..{period} -> {path}"
        )
    strategy.barrier()
    return load_safetensors(path, what="the item vectors")


# ---- the model part -----------------------------------------------------------------------------


def _shifted(t: torch.Tensor, back: int, fill: int) -> torch.Tensor:
    """[batch, seq]: at each position, the value `back` positions earlier (`fill` before the start)."""
    return torch.nn.functional.pad(t, (back, 0), value=fill)[:, : t.shape[1]]


class ItemVectorInput(nn.Module):
    """embeds + proj(vector of the item that ends here), at every position that ends an item of
    the table; unchanged elsewhere."""

    def __init__(self, tensors: dict[str, torch.Tensor], hidden: int):
        super().__init__()
        table = tensors["code_token_ids"]
        self.levels, self.codes_per_level = table.shape
        if self.codes_per_level**self.levels >= 2**62:
            raise ValueError(f"{self.levels} levels of {self.codes_per_level} codes do not fit one int64 key per item")
        keys = code_keys(tensors["codes"], self.codes_per_level)
        order = torch.argsort(keys)
        # token id -> its level (-1: not a code token) and code, up to the largest code token id
        level_of = torch.full((int(table.max()) + 2,), -1, dtype=torch.int64)
        code_of = torch.zeros(len(level_of), dtype=torch.int64)
        for level in range(self.levels):
            level_of[table[level]] = level
            code_of[table[level]] = torch.arange(self.codes_per_level)
        # Not persistent: they come from the vectors file, never from a checkpoint or state dict.
        self.register_buffer("keys", keys[order].contiguous(), persistent=False)
        self.register_buffer("codes", tensors["codes"][order].contiguous(), persistent=False)
        self.register_buffer("code_token_ids", table.clone(), persistent=False)
        self.register_buffer("vectors", tensors["vectors"][order].float().contiguous(), persistent=False)
        self.register_buffer("level_of", level_of, persistent=False)
        self.register_buffer("code_of", code_of, persistent=False)
        self.proj = nn.Linear(tensors["vectors"].shape[1], hidden, bias=False)

    def rows(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row of the item that ends at each position, whether one does) for [batch, seq] ids."""
        ids = input_ids.clamp(0, len(self.level_of) - 1)  # the last entry is no code: -1
        levels, codes = self.level_of[ids], self.code_of[ids]
        ends = levels == self.levels - 1
        key = torch.zeros_like(ids)
        for back in range(self.levels):  # the item's code of level L-1-back sits `back` positions earlier
            ends &= _shifted(levels, back, -1) == self.levels - 1 - back
            key = key + _shifted(codes, back, 0) * self.codes_per_level**back
        if len(self.keys) == 0:
            return torch.zeros_like(ids), torch.zeros_like(ends)
        row = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        return row, ends & (self.keys[row] == key)

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        row, known = self.rows(input_ids)
        vectors = self.vectors[row] * known.unsqueeze(-1)
        return embeds + self.proj(vectors.to(self.proj.weight.dtype)).to(embeds.dtype)


def _with_item_vectors(decoder: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the decoder: `input_ids` -> `inputs_embeds` with the item vectors."""
    ids = args[0] if args else kwargs.get("input_ids")
    if ids is None:  # the caller passed inputs_embeds itself
        return None
    embeds = decoder.item_input(ids, decoder.embed_tokens(ids))
    args = (None, *args[1:]) if args else ()
    return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds}


def attach_item_input(model: nn.Module, tensors: dict[str, torch.Tensor], seed: int) -> ItemVectorInput:
    """Add the item-vector input to a Hugging Face causal LM (before peft and DeepSpeed wrap it).
    The projection is seeded, so every rank starts from the same values; `tensors` holding a
    `proj` (an export's file) sets it."""
    decoder = model.get_decoder()
    torch.manual_seed(seed)
    module = ItemVectorInput(tensors, model.config.hidden_size)
    # Beside the embedding it adds to: its device (a model loaded onto a GPU, or spread over
    # several by accelerate) and the model's dtype.
    module.to(device=next(decoder.get_input_embeddings().parameters()).device, dtype=model.dtype)
    if "proj" in tensors:
        with torch.no_grad():
            module.proj.weight.copy_(tensors["proj"])
    decoder.add_module("item_input", module)  # a child: ZeRO-3 sees and partitions its projection
    decoder.register_forward_pre_hook(_with_item_vectors, with_kwargs=True)
    return module


def item_input_of(model: nn.Module) -> ItemVectorInput | None:
    for module in model.modules():
        if isinstance(module, ItemVectorInput):
            return module
    return None


def is_item_input_param(name: str) -> bool:
    """Whether a parameter name belongs to the item-vector input (kept out of adapter and model
    files: it has its own)."""
    return ".item_input." in f".{name}"


def has_item_vectors(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, FILE))


def load_item_vectors(folder: str) -> dict[str, torch.Tensor]:
    return load_safetensors(os.path.join(folder, FILE), what="the item vectors")


def gather_item_input(strategy, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The export file's tensors on rank 0 (collective: the projection may be partitioned); None
    elsewhere, or when the model has no item-vector input."""
    module = item_input_of(model)
    if module is None:
        return None
    with strategy.gathered([module.proj.weight]):
        if not strategy.is_rank0:
            return None
        proj = module.proj.weight.detach().to("cpu", copy=True).float().contiguous()
    return {
        "codes": module.codes.cpu(),
        "vectors": module.vectors.cpu().float(),
        "code_token_ids": module.code_token_ids.cpu(),
        "proj": proj,
    }


def write_item_vectors(tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Into a folder being written (an export's staging folder)."""
    save_file(tensors, os.path.join(folder, FILE))


def load_item_input_weights(strategy, model: nn.Module, folder: str) -> None:
    """Copy an export's trained projection into the live (possibly partitioned) model."""
    module = item_input_of(model)
    if module is None:
        return
    if not has_item_vectors(folder):
        raise FileNotFoundError(f"{folder} has no {FILE}, and this model adds item vectors (model.item_vectors)")
    proj = load_item_vectors(folder)["proj"]
    weight = module.proj.weight
    with rank0_writes(strategy, [weight]) as writes:
        if writes:
            with torch.no_grad():
                weight.copy_(proj.to(weight.dtype))
