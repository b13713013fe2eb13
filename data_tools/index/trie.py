"""The prefix trie of valid item codes, which constrains beam search to real items.

At decoding step k (k tokens of the code generated), the only tokens allowed are the next tokens
of catalog codes that start with those k tokens. Built once per index over token-id sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class CodeTrie:
    """Token-id sequences of one length; `allowed(prefix)` lists the tokens that may follow."""

    def __init__(self, sequences: Iterable[Sequence[int]]):
        seqs = {tuple(int(t) for t in s) for s in sequences}
        if not seqs:
            raise ValueError("a CodeTrie needs at least one sequence")
        lengths = {len(s) for s in seqs}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"all sequences need the same non-zero length, got lengths {sorted(lengths)}")
        self.depth = lengths.pop()
        self._sequences = seqs
        children: dict[tuple, set[int]] = {}
        for s in seqs:
            for k in range(self.depth):
                children.setdefault(s[:k], set()).add(s[k])
        self._allowed = {prefix: sorted(nxt) for prefix, nxt in children.items()}
        # Tensors are made on first use: a 40k-item catalog has ~80k prefixes, and beam search
        # touches only the few its beams reach.
        self._tensors: dict[tuple, torch.Tensor] = {}
        self._empty = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._sequences)

    def __contains__(self, sequence) -> bool:
        return tuple(sequence) in self._sequences

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The sorted tokens that can follow `prefix`; [] for a prefix of no catalog code and for
        a complete code."""
        return list(self._allowed.get(tuple(prefix), ()))

    def _tensor(self, prefix: tuple) -> torch.Tensor:
        t = self._tensors.get(prefix)
        if t is None:
            ids = self._allowed.get(prefix)
            t = self._empty if ids is None else torch.tensor(ids, dtype=torch.long)
            self._tensors[prefix] = t
        return t

    def allowed_mask(
        self,
        prefixes: Sequence[Sequence[int]] | torch.Tensor,
        vocab_size: int,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Bool [len(prefixes), vocab_size]: True where a token may follow that row's prefix.

        `prefixes` are the code tokens generated so far for each beam (all of one length), as
        tuples or a LongTensor [beams, k]; a row whose prefix leaves the catalog is all False.
        Logits are constrained with `logits.masked_fill(~mask, -inf)`.
        """
        if isinstance(prefixes, torch.Tensor):
            prefixes = prefixes.tolist()
        n = len(prefixes)
        if n == 0:
            return torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        allowed = [self._tensor(tuple(p)) for p in prefixes]
        rows = torch.repeat_interleave(torch.arange(n), torch.tensor([len(a) for a in allowed]))
        mask = torch.zeros(n, vocab_size, dtype=torch.bool)
        mask[rows, torch.cat(allowed)] = True
        return mask.to(device) if device is not None else mask
