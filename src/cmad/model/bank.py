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


DTYPES = ("float32", "float16", "int8", "int4")
# quantised dtypes: (state-dict key of the codes, bits per value)
CODES = {"int8": ("codes", 8), "int4": ("codes4", 4)}


def quantise(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-dimension affine quantisation of (K, C) rows to `bits` (8 or 4) bits.

    Returns (codes uint8, low, step) with x ~= low + code * step, the error per value at
    most step / 2. With 4 bits two codes share a byte (the row is padded to an even width).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    levels = (1 << bits) - 1
    x = x.float()
    low = x.min(0).values
    step = (x.max(0).values - low) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((x - low) / step).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], 1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.contiguous(), low, step


def dequantise(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `quantise`."""
    c = low.shape[0]
    width = c if bits == 8 else (c + 1) // 2
    if codes.dim() != 2 or codes.shape[1] != width or step.shape != low.shape:
        raise ValueError(f"{bits}-bit codes of shape {tuple(codes.shape)} do not match "
                         f"{c} dimensions")
    q = codes
    if bits == 4:
        q = torch.stack([codes & 0x0F, codes >> 4], 2).reshape(codes.shape[0], -1)[:, :c]
    return (low.float()[None, :] + q.float() * step.float()[None, :]).contiguous()


class MemoryBank:
    """A coreset of normal patch features with nearest-neighbour scoring.

    fraction: share of training patches kept (1.0 keeps all); max_entries caps the size.
    pca_dim: project features onto their top principal components (fitted on the training
        patches) before building the bank; None keeps all dimensions.
    dtype: how the bank is stored: "float32", "float16", "int8" or "int4" (per-dimension
        affine codes: a quarter or an eighth of float32). Distances are always computed in
        float32 on the stored values, so a saved and reloaded bank scores exactly as the
        fitted one.
    """

    def __init__(
        self,
        fraction: float = 0.01,
        max_entries: int | None = 20000,
        seed: int = 0,
        min_entries: int = 64,
        pca_dim: int | None = None,
        dtype: str = "float32",
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"bank fraction must be in (0, 1], got {fraction}")
        if dtype not in DTYPES:
            raise ValueError(f"bank dtype must be one of {DTYPES}, got {dtype!r}")
        self.fraction = fraction
        self.max_entries = max_entries
        self.min_entries = min_entries
        self.seed = seed
        self.pca_dim = pca_dim
        self.dtype = dtype
        self.stored: dict[str, torch.Tensor] = {}
        self.bank: torch.Tensor | None = None  # float32 values used for search
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
        self._store(x[idx].contiguous())
        log.debug("memory bank: %d of %d patches (%d dims)", k, n, x.shape[1])
        return self

    def _store(self, bank: torch.Tensor) -> None:
        if self.dtype in CODES:
            key, bits = CODES[self.dtype]
            codes, low, step = quantise(bank, bits)
            self.stored = {key: codes, "low": low, "step": step}
        else:
            self.stored = {"bank": bank.half() if self.dtype == "float16" else bank.float()}
        self._decode()

    def _decode(self) -> None:
        """The float32 values the search runs on, from the stored tensors."""
        if self.dtype in CODES:
            key, bits = CODES[self.dtype]
            st = self.stored
            self.bank = dequantise(st[key], st["low"], st["step"], bits)
        else:
            self.bank = self.stored["bank"].float().contiguous()

    def score(self, queries: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour distance of each (M, C) query to the bank."""
        if self.bank is None:
            raise RuntimeError("MemoryBank.score called before fit")
        return nearest_distance(self._project(queries), self.bank)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("MemoryBank has not been fitted")
        out = dict(self.stored)
        if self.proj is not None and self.proj_mean is not None:
            out.update(proj=self.proj, proj_mean=self.proj_mean)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        quantised = [d for d, (key, _) in CODES.items() if key in sd]
        if quantised:
            self.dtype = quantised[0]
            key = CODES[self.dtype][0]
            missing = {"low", "step"} - set(sd)
            if missing:
                raise KeyError(f"quantised bank without {sorted(missing)}")
            self.stored = {k: sd[k] for k in (key, "low", "step")}
        else:
            self.stored = {"bank": sd["bank"]}
            self.dtype = "float16" if sd["bank"].dtype == torch.float16 else "float32"
        self._decode()
        self.proj = sd.get("proj")
        self.proj_mean = sd.get("proj_mean")

    @property
    def entries(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes stored (for int8 / int4: the codes plus a low and a step per dimension)."""
        return int(sum(v.numel() * v.element_size() for v in self.stored.values()))
