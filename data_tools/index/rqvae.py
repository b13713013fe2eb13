"""Residual-quantized autoencoder (RQ-VAE): item embeddings -> one code per level.

An MLP encoder maps an embedding to a latent z; level 0 picks the nearest codeword of codebook 0
to z, level 1 the nearest codeword of codebook 1 to what is left (z minus codeword 0), and so on:
the code is coarse-to-fine, so items sharing a prefix are similar. A decoder maps the sum of the
chosen codewords back to the embedding, and training minimizes

    loss = ||x - decoder(z_q)||^2 + sum_levels ( ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2 )

(reconstruction, codebook and commitment terms; sg = stop-gradient; the encoder gets the
reconstruction gradient straight through the quantizer). Codebooks start from k-means on the
initial latents, level by level on the residuals, so no codeword starts unused.

Everything is seeded: the same embeddings, config and seed give the same codes on the same
machine (CPU float reductions can differ between machines and thread counts).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from data_tools.progress import progress_bar


@dataclass(frozen=True)
class RQVAEConfig:
    input_dim: int
    levels: int = 4
    codes: int = 256
    code_dim: int = 32
    hidden: tuple[int, ...] = (256, 128)
    beta: float = 0.25
    lr: float = 1e-3
    batch_size: int = 256
    # None: sized so that training takes about `target_steps` optimizer steps (see `epochs_for`).
    epochs: int | None = None
    kmeans_iters: int = 20
    seed: int = 0

    target_steps = 2000  # class constant, not a field (see `epochs_for`)

    def epochs_for(self, n: int) -> int:
        """Epochs to train on n items: `epochs` if set, else about `target_steps` steps in all,
        between 10 and 500 epochs (a tiny catalog needs many passes, a large one few)."""
        if self.epochs is not None:
            return self.epochs
        steps_per_epoch = math.ceil(n / self.batch_size)
        return max(10, min(500, round(self.target_steps / steps_per_epoch)))

    def to_json(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: dict) -> RQVAEConfig:
        return cls(**{**d, "hidden": tuple(d["hidden"])})


@contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block.

    The RQ-VAE's operations are small (a batch of 256 through a few 256-wide layers): a second
    thread gains little on an idle machine and costs 10-25x on a busy one (each operation ends
    at a barrier where a descheduled thread keeps the others waiting; measured on 2 shared
    cores: 6 ms per step on one thread, 45-150 ms on two). One thread also makes float sums
    independent of the core count, so the codes do not depend on it.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(dims) - 1):
        layers.append(nn.Linear(dims[k], dims[k + 1]))
        if k < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k centroids of the rows of x (Lloyd's algorithm from k random rows).

    With fewer rows than k (a tiny catalog), the starting rows are drawn with replacement and
    jittered by a little noise, so duplicates separate; the surplus codewords then sit near real
    points and stay usable, where zeros or random vectors would stay dead.
    """
    n = x.shape[0]
    if n >= k:
        c = x[torch.randperm(n, generator=generator)[:k]].clone()
    else:
        idx = torch.randint(n, (k,), generator=generator)
        scale = x.std().clamp(min=1e-6) * 1e-2
        c = x[idx] + scale * torch.randn(k, x.shape[1], generator=generator)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        # An empty cluster keeps its centroid rather than collapsing to zero.
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


class RQVAE(nn.Module):
    def __init__(self, config: RQVAEConfig):
        super().__init__()
        self.config = config
        dims = [config.input_dim, *config.hidden, config.code_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.zeros(config.levels, config.codes, config.code_dim))
        # Inputs are centred and scaled to unit mean square per dimension with statistics of the
        # fitting set: a backbone's hidden states can have a few huge, nearly constant dimensions
        # that would otherwise dominate the distances; a single scale keeps the geometry.
        self.register_buffer("shift", torch.zeros(config.input_dim))
        self.register_buffer("scale", torch.ones(()))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Residual quantization of latents: (codes [n, levels], the residual each level quantized)."""
        residual = z
        codes, residuals = [], []
        for book in self.codebooks:
            idx = torch.cdist(residual, book).argmin(1)
            codes.append(idx)
            residuals.append(residual)
            residual = residual - book[idx]
        return torch.stack(codes, 1), residuals

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Of a batch of standardized x: (reconstruction loss, codebook + beta * commitment loss,
        the codes [n, levels], the residual each level quantized)."""
        z = self.encoder(x)
        codes, residuals = self.quantize(z.detach())
        residual, zq = z, torch.zeros_like(z)
        commit = z.new_zeros(())
        for level, book in enumerate(self.codebooks):
            e = book[codes[:, level]]
            # The codebook term moves codewords to their residuals; the commitment term (weight
            # beta) keeps the encoder's residuals near their codewords.
            commit = (
                commit
                + ((residual.detach() - e) ** 2).mean()
                + self.config.beta * ((residual - e.detach()) ** 2).mean()
            )
            zq = zq + e.detach()
            residual = residual - e.detach()
        # Straight-through: the decoder sees the quantized latent, the encoder gets its gradient.
        x_hat = self.decoder(z + (zq - z).detach())
        return ((x_hat - x) ** 2).mean(), commit, codes, residuals

    @torch.no_grad()
    def restart_dead_codes(self, usage: torch.Tensor, residuals: list[torch.Tensor], generator: torch.Generator) -> int:
        """Move every codeword no item chose during an epoch onto a residual of the last batch.

        As the encoder moves, latents leave some codewords behind; without this the first level
        ends up using a fraction of its codes (MovieLens: level-0 perplexity ~80 instead of ~210),
        which packs items into few prefixes and lengthens the collision chains below them.
        """
        restarted = 0
        for level in range(self.config.levels):
            dead = (usage[level] == 0).nonzero().squeeze(1)
            if len(dead):
                pick = torch.randint(len(residuals[level]), (len(dead),), generator=generator)
                self.codebooks[level, dead] = residuals[level][pick]
                restarted += len(dead)
        return restarted

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator) -> None:
        residual = self.encoder(x)
        for level in range(self.config.levels):
            self.codebooks[level] = kmeans(residual, self.config.codes, self.config.kmeans_iters, generator)
            residual = residual - self.codebooks[level][torch.cdist(residual, self.codebooks[level]).argmin(1)]

    @torch.no_grad()
    def encode(self, x: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Raw embeddings -> (codes int64 [n, levels], last-level residuals float32 [n, code_dim])."""
        codes, residuals = [], []
        with one_thread():
            for lo in range(0, len(x), batch_size):
                c, r = self.quantize(self.encoder(self.standardize(torch.from_numpy(x[lo : lo + batch_size]))))
                codes.append(c.numpy())
                residuals.append(r[-1].numpy())
        return np.concatenate(codes), np.concatenate(residuals)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict:
        recon, commit, _, _ = self.losses(x)
        return {"reconstruction": round(recon.item(), 6), "commitment": round(commit.item(), 6)}


def fit_rqvae(embeddings: np.ndarray, config: RQVAEConfig, progress: bool = True) -> tuple[RQVAE, dict]:
    """Train an RQ-VAE on the rows of `embeddings`; returns the model (eval mode) and a record of
    the training: epochs, steps, codewords restarted, and the losses on the whole set before
    training (after k-means) and after it."""
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    # Own RNG state: the caller's global torch seed stays untouched, and ours is the only input.
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        model = RQVAE(config)
        model.shift.copy_(x.mean(0))
        model.scale.copy_(((x - model.shift) ** 2).mean().sqrt().clamp(min=1e-12))
        xs = model.standardize(x)
        model.init_codebooks(xs, gen)
        start = model.evaluate(xs)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        epochs = config.epochs_for(len(x))
        model.train()
        restarts = 0
        for epoch in progress_bar(range(epochs), desc="rq-vae", unit="epoch", enabled=progress):
            usage = torch.zeros(config.levels, config.codes, dtype=torch.long)
            for idx in torch.randperm(len(xs), generator=gen).split(config.batch_size):
                recon, commit, codes, residuals = model.losses(xs[idx])
                opt.zero_grad(set_to_none=True)
                (recon + commit).backward()
                opt.step()
                usage += torch.nn.functional.one_hot(codes, config.codes).sum(0)
            if epoch < epochs - 1:  # after the last epoch a restarted codeword would stay unused
                restarts += model.restart_dead_codes(usage, residuals, gen)
        model.eval()
        end = model.evaluate(xs)
    return model, {
        "epochs": epochs,
        "steps": epochs * math.ceil(len(x) / config.batch_size),
        "codewords_restarted": restarts,
        "start": start,
        "end": end,
    }
