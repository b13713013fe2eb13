"""The prefix trie of valid item codes, which constrains beam search to real items.

At decoding step k (k tokens of the code generated), the only tokens allowed are the next tokens
of catalog codes that start with those k tokens. Built once per index over token-id sequences.

`CodeTrie` answers on the host (`allowed`, `allowed_mask`); `DeviceTrie` is the same trie as
tensors on the decoding device (`CodeTrie.on(device)`, built once per trie and device), so beam
search builds each step's mask where the logits are, without a Python loop over beams or a copy
of a [beams, vocabulary] mask from the host.
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
        self._on: dict[str, DeviceTrie] = {}

    def __len__(self) -> int:
        return len(self._sequences)

    def __contains__(self, sequence) -> bool:
        return tuple(sequence) in self._sequences

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The sorted tokens that can follow `prefix`; [] for a prefix of no catalog code and for
        a complete code."""
        return list(self._allowed.get(tuple(prefix), ()))

    def on(self, device: torch.device | str) -> DeviceTrie:
        """This trie as tensors on `device` (built on first use, then kept)."""
        key = str(torch.device(device))
        if key not in self._on:
            self._on[key] = DeviceTrie(self._sequences, self.depth, device)
        return self._on[key]

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


class DeviceTrie:
    """A CodeTrie as tensors on one device. Nodes are numbered per level (level 0: the root, 0);
    the edges out of level k are `keys[k]`, sorted, each `parent * width + token`, and an edge's
    index is the number of the child it leads to, so the node a prefix reaches is found level by
    level with `torch.searchsorted`, and a node's children are the contiguous run
    `offsets[k][node] : offsets[k][node + 1]` of `tokens[k]`. `width` is the largest token + 1.
    Node -1 stands for a prefix that left the catalog (nothing may follow it)."""

    def __init__(self, sequences, depth: int, device: torch.device | str):
        self.depth, self.device = depth, torch.device(device)
        seqs = torch.tensor(sorted(sequences), dtype=torch.long).reshape(-1, depth)  # [items, depth]
        self.width = int(seqs.max()) + 1 if len(seqs) else 1
        self.keys, self.offsets, self.tokens, self.max_children = [], [], [], []
        nodes, count = torch.zeros(len(seqs), dtype=torch.long), 1  # each sequence's node at level k
        for k in range(depth):
            keys, child = torch.unique(nodes * self.width + seqs[:, k], sorted=True, return_inverse=True)
            per_node = torch.bincount(keys // self.width, minlength=count)
            self.keys.append(keys.to(self.device))
            self.offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), per_node.cumsum(0)]).to(self.device))
            self.tokens.append((keys % self.width).to(self.device))
            self.max_children.append(int(per_node.max()))  # host ints: shapes known without a sync
            nodes, count = child, len(keys)

    def step(self, level: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The nodes of level `level + 1` reached from `nodes` (of level `level`) by `tokens`;
        -1 where the token does not continue a catalog code (or the node was already -1)."""
        keys = self.keys[level]
        key = nodes.clamp(min=0) * self.width + tokens.clamp(0, self.width - 1)
        at = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
        found = (keys[at] == key) & (nodes >= 0) & (tokens >= 0) & (tokens < self.width)
        return torch.where(found, at, -1)

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """The node each row of `prefixes` [N, k] (k < depth) reaches, -1 where it left the catalog."""
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=self.device)
        for level in range(prefixes.shape[1]):
            nodes = self.step(level, nodes, prefixes[:, level])
        return nodes

    def mask(self, level: int, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Bool [len(nodes), vocab_size] on the device: the children of each node of `level`
        (every node's run of children is gathered into [N, max children], padded with a column
        past the vocabulary that is cut off)."""
        if self.width > vocab_size:
            raise ValueError(f"the trie has token ids up to {self.width - 1}, beyond the vocabulary of {vocab_size}")
        n = nodes.shape[0]
        if level >= self.depth:  # a complete code: nothing follows
            return torch.zeros(n, vocab_size, dtype=torch.bool, device=self.device)
        offsets, tokens = self.offsets[level], self.tokens[level]
        start = offsets[nodes.clamp(min=0)]
        count = torch.where(nodes >= 0, offsets[nodes.clamp(min=0) + 1] - start, 0)
        slot = torch.arange(self.max_children[level], device=self.device)
        pos = (start.unsqueeze(1) + slot).clamp(max=len(tokens) - 1)
        cols = torch.where(slot < count.unsqueeze(1), tokens[pos], vocab_size)  # [N, max children]
        out = torch.zeros(n, vocab_size + 1, dtype=torch.bool, device=self.device)
        return out.scatter_(1, cols, True)[:, :vocab_size]

    def allowed_mask(self, prefixes: torch.Tensor, vocab_size: int, device=None) -> torch.Tensor:
        """As CodeTrie.allowed_mask, for a LongTensor of prefixes [N, k] (moved to this trie's
        device if elsewhere), computed on the device. `device` is accepted for the same call
        signature; the mask is on this trie's device."""
        prefixes = prefixes.to(self.device, torch.long)
        if prefixes.shape[1] >= self.depth:
            return torch.zeros(prefixes.shape[0], vocab_size, dtype=torch.bool, device=self.device)
        return self.mask(prefixes.shape[1], self.walk(prefixes), vocab_size)
