"""Memory banks: greedy k-center coreset sub-sampling and exact nearest-neighbour search.

The bank is the intra-modal branch: a test patch far from every stored normal patch is
anomalous. The coreset keeps a small, well-spread subset of the training patches so that
the bank stays a fraction of a full PatchCore bank.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    seed: int = 0,
    projection_dim: int | None = 128,
    progress: bool = False,
) -> torch.Tensor:
    """Indices of `n_select` rows chosen by greedy k-center selection (PatchCore).

    Distances are computed on a seeded Gaussian random projection to `projection_dim`
    dimensions when the features are wider than that (the Johnson-Lindenstrauss trick
    PatchCore uses for speed). The first centre is chosen with the seed.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n)
    if n_select <= 0:
        raise ValueError(f"n_select must be positive, got {n_select}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / np.sqrt(projection_dim)
        x = x @ proj
    start = int(torch.randint(n, (1,), generator=gen).item())
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = start
    min_d = torch.cdist(x, x[start : start + 1]).squeeze(1)
    iterator = range(1, n_select)
    if progress:
        iterator = tqdm(iterator, desc="coreset", leave=False, mininterval=1.0)
    for i in iterator:
        idx = int(torch.argmax(min_d).item())
        selected[i] = idx
        d = torch.cdist(x, x[idx : idx + 1]).squeeze(1)
        min_d = torch.minimum(min_d, d)
    return selected


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Exact Euclidean distance of each query row to its nearest bank row, in chunks."""
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    bank = bank.float()
    # keep the (chunk x bank) distance block near 256 MB however large the bank is
    chunk = max(1, min(chunk, (1 << 26) // max(bank.shape[0], 1)))
    bank_sq = (bank * bank).sum(1)
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk].float()
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq[None, :]
        out[s : s + chunk] = d2.min(dim=1).values.clamp_min_(0.0).sqrt_()
    return out


class MemoryBank:
    """A coreset of normal patch features with nearest-neighbour scoring.

    fraction: share of training patches kept (1.0 keeps all); max_entries caps the size.
    pca_dim: project features onto their top principal components (fitted on the training
        patches) before building the bank; None keeps all dimensions.
    half: store the bank in float16 (distances are still computed in float32).
    """

    def __init__(
        self,
        fraction: float = 0.01,
        max_entries: int | None = 20000,
        seed: int = 0,
        min_entries: int = 64,
        pca_dim: int | None = None,
        half: bool = False,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"bank fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.max_entries = max_entries
        self.min_entries = min_entries
        self.seed = seed
        self.pca_dim = pca_dim
        self.half = half
        self.bank: torch.Tensor | None = None
        self.proj_mean: torch.Tensor | None = None
        self.proj: torch.Tensor | None = None

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.proj is None or self.proj_mean is None:
            return x
        return (x - self.proj_mean) @ self.proj

    def fit(self, features: torch.Tensor, progress: bool = False) -> MemoryBank:
        """Select the coreset from (N, C) normal patch features."""
        n = features.shape[0]
        if n == 0:
            raise ValueError("no training patches to build a memory bank from")
        features = features.float()
        if self.pca_dim is not None and self.pca_dim < features.shape[1]:
            self.proj_mean = features.mean(0)
            centred = (features - self.proj_mean).double()
            _, vecs = torch.linalg.eigh(centred.T @ centred / max(n - 1, 1))
            comps = vecs[:, -self.pca_dim :].flip(1)
            # fix each component's sign so the projection is deterministic
            comps = comps * torch.sign(comps[comps.abs().argmax(0), torch.arange(comps.shape[1])])
            self.proj = comps.float().contiguous()
        x = self._project(features)
        k = max(int(round(self.fraction * n)), min(self.min_entries, n))
        if self.max_entries is not None:
            k = min(k, self.max_entries)
        idx = greedy_coreset(x, k, seed=self.seed, progress=progress)
        bank = x[idx].contiguous()
        self.bank = bank.half() if self.half else bank
        log.debug("memory bank: %d of %d patches (%d dims)", k, n, x.shape[1])
        return self

    def score(self, queries: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour distance of each (M, C) query to the bank."""
        if self.bank is None:
            raise RuntimeError("MemoryBank.score called before fit")
        return nearest_distance(self._project(queries), self.bank)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("MemoryBank has not been fitted")
        out = {"bank": self.bank}
        if self.proj is not None and self.proj_mean is not None:
            out.update(proj=self.proj, proj_mean=self.proj_mean)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.bank = sd["bank"]
        self.proj = sd.get("proj")
        self.proj_mean = sd.get("proj_mean")

    @property
    def entries(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[0])

    @property
    def nbytes(self) -> int:
        return 0 if self.bank is None else int(self.bank.numel() * self.bank.element_size())
