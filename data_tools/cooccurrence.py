"""Collaborative item vectors: which items users take up near each other, as fixed dense vectors
(the input of `model.item_vectors`, train/model/item_vectors.py).

A model that sees an item only through its semantic-ID codes (built from the item's text) learns
what *kind* of item comes next; which exact items go together is collaborative knowledge the codes
do not carry, and a small model cannot memorize it from a few epochs (bench/RESULTS.md,
"Collaborative item vectors reach 3x"). So each item gets a vector from the training sequences:

1. co-occurrence counts of item pairs within `reach` positions of a user's sequence, weighted
   1/distance, both directions;
2. their positive pointwise mutual information (PPMI);
3. a truncated SVD of that matrix (scipy's `svds`, seeded): `u * sqrt(sigma)`, unit-normalized;
4. a later period's vectors rotated onto the earlier ones on the items both have (`align_to`,
   orthogonal Procrustes), since an SVD's basis is arbitrary.

The word2vec-as-matrix-factorization view (Levy & Goldberg 2014): PPMI + SVD gives embeddings
like skip-gram's, in seconds, deterministically. LLaRA and CoLLM feed a collaborative model's
item embeddings into an LLM's input the same way.

Only training splits go in (train/model/item_vectors.py reads them): no validation or test target
leaks into the vectors.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

REACH = 3  # the window of positions in which two items count as co-occurring


def cooccurrence_counts(sequences: Iterable[list[int]], reach: int = REACH) -> dict[tuple[int, int], float]:
    """(a, b) -> sum over the sequences of 1/distance for every pair within `reach` positions."""
    pairs: dict[tuple[int, int], float] = {}
    for items in sequences:
        for i, a in enumerate(items):
            for d in range(1, reach + 1):
                if i + d >= len(items):
                    break
                b = items[i + d]
                if a == b:
                    continue
                pairs[(a, b)] = pairs.get((a, b), 0.0) + 1 / d
                pairs[(b, a)] = pairs.get((b, a), 0.0) + 1 / d
    return pairs


def ppmi_svd_vectors(pairs: dict[tuple[int, int], float], dim: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """(items, unit vectors [items, dim] float32) of the pairs' PPMI matrix. With fewer items than
    the SVD can take (a small dataset), the missing dimensions are zeros."""
    import scipy.sparse
    import scipy.sparse.linalg

    items = sorted({a for a, _ in pairs})
    if not items:
        return [], np.zeros((0, dim), np.float32)
    row = {item: k for k, item in enumerate(items)}
    a, b = zip(*pairs)
    counts = scipy.sparse.csr_matrix(
        (np.fromiter(pairs.values(), np.float64), ([row[i] for i in a], [row[i] for i in b])),
        shape=(len(items), len(items)),
    )
    total, sums = counts.sum(), np.asarray(counts.sum(1)).ravel()
    coo = counts.tocoo()
    pmi = np.log(coo.data * total / (sums[coo.row] * sums[coo.col]))
    ppmi = scipy.sparse.csr_matrix((np.maximum(pmi, 0), (coo.row, coo.col)), shape=counts.shape)
    k = min(dim, len(items) - 2)  # svds needs k < the matrix's smaller side (ARPACK: k <= n - 2)
    vectors = np.zeros((len(items), dim), np.float64)
    if k >= 1:
        # v0: ARPACK's start vector, fixed so the same counts give the same vectors on every run
        v0 = np.random.default_rng(seed).uniform(-1, 1, len(items))
        u, sigma, _ = scipy.sparse.linalg.svds(ppmi, k=k, v0=v0)
        order = np.argsort(-sigma)  # largest first: dimension j means the same across builds
        u, sigma = u[:, order], sigma[order]
        u *= np.sign(u.sum(0) + 1e-12)  # an SVD's sign per dimension is arbitrary: fix one
        vectors[:, :k] = u * np.sqrt(sigma)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return items, (vectors / np.maximum(norms, 1e-8)).astype(np.float32)


def align_to(vectors: np.ndarray, keys: np.ndarray, previous: np.ndarray, previous_keys: np.ndarray) -> np.ndarray:
    """`vectors` rotated (an orthogonal map, so lengths and angles stay) to match `previous` on
    the items both have. An SVD's basis is arbitrary up to rotation: without this, a later
    period's vectors would mean nothing to the projection trained on the earlier ones."""
    from scipy.linalg import orthogonal_procrustes

    shared, here, there = np.intersect1d(keys, previous_keys, return_indices=True)
    if len(shared) < vectors.shape[1]:
        return vectors  # too few shared items to fix a rotation; keep the fresh basis
    rotation, _ = orthogonal_procrustes(vectors[here], previous[there])
    return (vectors @ rotation).astype(np.float32)
