"""Memory banks: greedy k-center coreset sub-sampling and exact nearest-neighbour search.

The bank is the intra-modal branch: a test patch far from every stored normal patch is
anomalous. The coreset keeps a small, well-spread subset of the training patches so that
the bank stays a fraction of a full PatchCore bank.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from numba import njit
from torch import nn

from cmad.progress import progress as progress_bar

log = logging.getLogger(__name__)


# Greedy k-center without a pass over every row per centre. Every row belongs to the
# cluster of its nearest centre; the clusters are stored contiguously in one pool (rows
# copied there, so that a scan reads memory in order; a row that moves leaves a gap, and
# the gaps are closed when the pool is full). A new centre c can only take over a row i of
# cluster j when |c - c_j| < 2 |i - c_j| (triangle inequality), so whole clusters, and most
# rows of the others, are skipped without a distance; a distance sum stops once it is past
# what could change anything (the rows are turned onto their principal axes, so that the
# first coordinates carry most of it). The selection is exactly that of the plain loop
# (argmax of the distance to the nearest centre, lowest index on ties): the skip tests are
# loosened by _SLACK, which covers the float32 rounding of the distances.
_SLACK = 1.0 - 1e-3


@njit(cache=True, nogil=True)
def _sqdist(a: np.ndarray, i: int, c: np.ndarray, scale: float, bound: float) -> float:
    """Squared distance of row i of `a` to `c`, given up early once `scale` times the
    partial sum reaches `bound` (the partial sum is returned then: never above the full).

    Eight fixed partial sums: vectorisable without reassociation, so the value is the same
    on every machine and thread count, and the partial sums only grow."""
    dim = a.shape[1]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    m = dim - dim % 8
    for u in range(0, m, 8):
        e0 = a[i, u] - c[u]
        e1 = a[i, u + 1] - c[u + 1]
        e2 = a[i, u + 2] - c[u + 2]
        e3 = a[i, u + 3] - c[u + 3]
        e4 = a[i, u + 4] - c[u + 4]
        e5 = a[i, u + 5] - c[u + 5]
        e6 = a[i, u + 6] - c[u + 6]
        e7 = a[i, u + 7] - c[u + 7]
        s0 += e0 * e0
        s1 += e1 * e1
        s2 += e2 * e2
        s3 += e3 * e3
        s4 += e4 * e4
        s5 += e5 * e5
        s6 += e6 * e6
        s7 += e7 * e7
        if u % 16 == 8:
            part = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            if part * scale >= bound:
                return part
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for u in range(m, dim):
        e = a[i, u] - c[u]
        s += e * e
    return s


@njit(cache=True, nogil=True)
def _kc_init(pool, pid, pdist, n, start, cen, sel, beg, end, cnt, rad, arg, apos):  # noqa: ANN001
    """Cluster 0: every row, around the row `start` (rows 0..n-1 of the pool, in order)."""
    sel[0] = start
    cen[0] = pool[start]
    best = np.float32(-1.0)
    bi = 0
    for i in range(n):
        d = _sqdist(pool, i, cen[0], 1.0, np.inf)
        pid[i] = i
        pdist[i] = d
        if d > best:
            best = d
            bi = i
    beg[0], end[0], cnt[0] = 0, n, n
    rad[0], arg[0], apos[0] = best, bi, bi


@njit(cache=True, nogil=True)
def _kc_compact(pool, pid, pdist, beg, end, apos, t):  # noqa: ANN001
    """Drop the rows that moved away (distance -1): clusters 0..t-1 packed from the start."""
    order = np.argsort(beg[:t], kind="mergesort")
    w = 0
    for j in order:
        b = beg[j]
        beg[j] = w
        for r in range(b, end[j]):   # w <= r: an ascending copy never overwrites
            if pdist[r] < 0.0:
                continue
            if r == apos[j]:
                apos[j] = w
            if w != r:
                pool[w] = pool[r]
                pid[w] = pid[r]
                pdist[w] = pdist[r]
            w += 1
        end[j] = w
    return w


@njit(cache=True, nogil=True)
def _kc_steps(pool, pid, pdist, cen, sel, beg, end, cnt, rad, arg, apos, todo, lims,  # noqa: ANN001
              skey, sord, st, t0, t1, slack):
    """Greedy k-center iterations t0..t1-1; st = [pool top, distances computed].

    Cluster j holds the pool rows beg[j]..end[j]-1 whose distance is not -1 (cnt[j] of
    them); rad, arg, apos: its largest squared distance, the lowest row index at it and
    that row's pool position. skey, sord: the centres' first coordinates, sorted, and their
    cluster ids (only centres whose first coordinate is near the new one's can be close)."""
    cap = pool.shape[0]
    top = st[0]
    for t in range(t0, t1):
        # next centre: the row farthest from its centre, lowest index on ties
        bj = 0
        for j in range(1, t):
            if rad[j] > rad[bj] or (rad[j] == rad[bj] and arg[j] < arg[bj]):
                bj = j
        sel[t] = arg[bj]
        cen[t] = pool[apos[bj]]
        c = cen[t]
        # the clusters that can lose rows to it: |c - c_j|^2 < 4 rad_j <= 4 rad_bj, and
        # |c - c_j|^2 >= (c[0] - c_j[0])^2
        h = np.sqrt(4.0 * rad[bj] / slack) * (1.0 + 1e-5)
        lo = np.searchsorted(skey[:t], c[0] - h, side="left")
        hi = np.searchsorted(skey[:t], c[0] + h, side="right")
        nt = 0
        total = 0
        for q in range(lo, hi):
            j = sord[q]
            if rad[j] > 0.0:
                lim = _sqdist(cen, j, c, slack, 4.0 * rad[j]) * slack
                if lim < 4.0 * rad[j]:
                    todo[nt] = j
                    lims[nt] = lim
                    nt += 1
                    total += cnt[j]
        if top + total > cap:
            top = _kc_compact(pool, pid, pdist, beg, end, apos, t)
        beg[t] = top
        tr = np.float32(-1.0)
        ta = -1
        tp = -1
        for q in range(nt):
            j = todo[q]
            lim = lims[q]
            jr = np.float32(-1.0)
            ja = -1
            jp = -1
            last = beg[j]
            for r in range(beg[j], end[j]):
                di = pdist[r]
                if di < 0.0:
                    continue
                i = pid[r]
                if lim < 4.0 * di:
                    st[1] += 1
                    d = _sqdist(pool, r, c, 1.0, di)
                    if d < di:   # row r moves to the new cluster, leaving a gap
                        if d > tr or (d == tr and i < ta):
                            tr, ta, tp = d, i, top
                        pool[top] = pool[r]
                        pid[top] = i
                        pdist[top] = d
                        top += 1
                        pdist[r] = -1.0
                        cnt[j] -= 1
                        continue
                if di > jr or (di == jr and i < ja):
                    jr, ja, jp = di, i, r
                last = r + 1
            end[j] = last
            # a cluster keeps its centre (distance 0), so it never empties
            rad[j], arg[j], apos[j] = jr, ja, jp
        q = np.searchsorted(skey[:t], c[0])
        skey[q + 1 : t + 1] = skey[q:t].copy()
        sord[q + 1 : t + 1] = sord[q:t].copy()
        skey[q] = c[0]
        sord[q] = t
        end[t] = top
        cnt[t] = top - beg[t]
        if tp < 0:   # nothing moved: the centre was already covered (duplicate rows)
            rad[t], arg[t], apos[t] = np.float32(0.0), sel[t], apos[bj]
        else:
            rad[t], arg[t], apos[t] = tr, ta, tp
    st[0] = top


def _kcenter(pool: np.ndarray, n_select: int, start: int, progress: bool
             ) -> tuple[np.ndarray, int]:
    """Exact greedy k-center on the float32 rows in the first half of `pool` (2N, C), from
    row `start` (the second half is room for the rows that move before the gaps they leave
    are closed); also returns the number of row distances computed."""
    n, dim = pool.shape[0] // 2, pool.shape[1]
    pid = np.empty(2 * n, np.int64)
    pdist = np.empty(2 * n, np.float32)
    cen = np.empty((n_select, dim), np.float32)
    sel = np.empty(n_select, np.int64)
    beg, end, cnt, arg, apos, todo, sord = (np.zeros(n_select, np.int64) for _ in range(7))
    rad = np.zeros(n_select, np.float32)
    skey = np.zeros(n_select, np.float32)
    lims = np.zeros(n_select, np.float64)
    st = np.array([n, n], np.int64)
    _kc_init(pool, pid, pdist, n, start, cen, sel, beg, end, cnt, rad, arg, apos)
    skey[0] = cen[0, 0]
    step = 512
    bar = progress_bar(total=n_select, desc="coreset", unit="entry", mininterval=1.0,
                       enabled=progress)
    bar.update(1)
    for t0 in range(1, n_select, step):
        t1 = min(t0 + step, n_select)
        _kc_steps(pool, pid, pdist, cen, sel, beg, end, cnt, rad, arg, apos, todo, lims,
                  skey, sord, st, t0, t1, _SLACK)
        bar.update(t1 - t0)
    bar.close()
    return sel, int(st[1])


@njit(cache=True, nogil=True)
def _covariance(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """Float64 covariance of (every `stride`-th row of x) @ w, in a fixed order."""
    p = w.shape[1]
    rows = range(0, x.shape[0], stride)
    y = np.zeros((len(rows), p))
    for r, i in enumerate(rows):
        for a in range(x.shape[1]):
            v = np.float64(x[i, a])
            for b in range(p):
                y[r, b] += v * w[a, b]
    y -= y.sum(0) / len(rows)
    c = np.zeros((p, p))
    for r in range(y.shape[0]):
        for a in range(p):
            v = y[r, a]
            for b in range(a, p):
                c[a, b] += v * y[r, b]
    for a in range(p):
        for b in range(a):
            c[a, b] = c[b, a]
    return c / max(len(rows) - 1, 1)


def _eigh(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh on one thread: LAPACK's result depends on its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(c)
    finally:
        torch.set_num_threads(threads)


def _principal_axes(x: torch.Tensor, w: torch.Tensor, rows: int = 20000) -> torch.Tensor:
    """Orthogonal (p, p) matrix turning the rows of x @ w onto their principal axes,
    largest variance first (estimated on at most about `rows` evenly spaced rows)."""
    stride = max(1, x.shape[0] // rows)
    c = _covariance(np.ascontiguousarray(x.numpy()), w.double().numpy(), stride)
    vecs = _eigh(torch.from_numpy(c)).eigenvectors
    return vecs.flip(1).float().contiguous()


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    seed: int = 0,
    projection_dim: int | None = 128,
    progress: bool = False,
    *,
    presample: float | None = None,
    rotate: bool = True,
) -> torch.Tensor:
    """Indices of `n_select` rows chosen by greedy k-center selection (PatchCore).

    Each step adds the row farthest from the rows chosen so far (Euclidean, lowest index on
    ties). Distances are computed in float32 on a seeded Gaussian random projection to
    `projection_dim` dimensions when the features are wider than that (the
    Johnson-Lindenstrauss trick PatchCore uses). The first centre is chosen with the seed.
    presample: when set, the greedy selection runs on a seeded uniform subset of
        `presample * n_select` rows (two-stage selection: faster, a slightly larger
        coverage radius); None runs it on every row.
    rotate: turn the (projected) rows onto their principal axes first. Distances do not
        change (up to float rounding), but most distance sums can then stop after a few
        coordinates, once they exceed what could change the selection.
    The result depends only on the inputs and the seed, not on the thread count.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n)
    if n_select <= 0:
        raise ValueError(f"n_select must be positive, got {n_select}")
    if presample is not None and presample < 1.0:
        raise ValueError(f"presample must be at least 1, got {presample}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    proj = None
    if projection_dim is not None and x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / np.sqrt(projection_dim)
    rows = None
    if presample is not None and int(np.ceil(presample * n_select)) < n:
        m = int(np.ceil(presample * n_select))
        rows = torch.randperm(n, generator=gen)[:m].sort().values
        x = x[rows]
    m = x.shape[0]
    w = proj
    if rotate:
        w = torch.eye(x.shape[1]) if w is None else w
        w = w @ _principal_axes(x, w)
    pool = torch.empty(2 * m, x.shape[1] if w is None else w.shape[1])
    if w is None:
        pool[:m] = x
    else:
        torch.matmul(x, w, out=pool[:m])
    del x
    start = int(torch.randint(m, (1,), generator=gen).item())
    sel, computed = _kcenter(pool.numpy(), n_select, start, progress)
    log.debug("coreset: %d of %d rows, %.1f distances per row", n_select, m, computed / m)
    out = torch.from_numpy(sel)
    return out if rows is None else rows[out]


def _search(queries: torch.Tensor, n_rows: int, rows, sq: torch.Tensor,  # noqa: ANN001
            chunk: int, bank_chunk: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-row distance of each query; `rows(a, b)` gives bank rows a..b-1 as float32
    and `sq` their squared norms. One matrix product per (query chunk, bank chunk) block.
    With `scale` (one per row), the distance is divided by its nearest row's scale (the
    first nearest row on ties).

    The default blocks (512 queries x 1024 entries, a 2 MB distance block that stays in
    cache) were measured on 2 cores against 1024 x 8192 (32 MB): 55 -> 34-37 ms per
    sample for a joint bank of 8,820 x 185, 15 -> 8-9 ms for an RGB bank of 2,205 x 152
    (RESULTS.md, round 5)."""
    if n_rows == 0:
        raise ValueError("the memory bank is empty")
    q = queries.float()
    best = torch.full((q.shape[0],), float("inf"))
    arg = None if scale is None else torch.zeros(q.shape[0], dtype=torch.long)
    for a in range(0, n_rows, bank_chunk):
        b = min(a + bank_chunk, n_rows)
        block = rows(a, b)
        for s in range(0, q.shape[0], chunk):
            # |q|^2 is the same for every bank row: added after the minimum. `amin`, not
            # `min(1).values`, where no index is needed: finding it made the search about
            # 20% slower
            d = torch.addmm(sq[None, a:b], q[s : s + chunk], block.T, alpha=-2.0)
            if arg is None:
                torch.minimum(best[s : s + chunk], d.amin(1), out=best[s : s + chunk])
                continue
            v, i = d.min(1)  # the first minimum of the block
            cur = best[s : s + chunk]
            better = v < cur  # an earlier block keeps a tie
            best[s : s + chunk] = torch.where(better, v, cur)
            arg[s : s + chunk] = torch.where(better, i + a, arg[s : s + chunk])
    dist = best.add_((q * q).sum(1)).clamp_min_(0.0).sqrt_()
    return dist if arg is None else dist / scale[arg]


def local_scale(rows, n_rows: int, sq: torch.Tensor, k: int,  # noqa: ANN001
                chunk: int = 256, bank_chunk: int = 1024) -> torch.Tensor:
    """(K,) how far apart the bank rows are around each row: the mean distance to its k
    nearest other rows, over the median of that mean across rows, at least SCALE_FLOOR.

    A bank row with no close neighbours (a normal pattern seen rarely) gets a large
    scale, and a query near it a smaller score: normal parts' rare details score lower,
    while a defect, far from every row, stays far. `rows`, `sq` as for `_search`."""
    if n_rows < 2:
        return torch.ones(n_rows)
    if n_rows > 50_000:
        log.warning("local scale of a bank of %d entries: %d x %d distances (minutes to hours "
                    "on a few cores); bank_density: null skips it", n_rows, n_rows, n_rows)
    k = min(k, n_rows - 1)
    near = torch.empty(n_rows)
    for s in range(0, n_rows, chunk):
        e = rows(s, min(s + chunk, n_rows))
        ee = (e * e).sum(1)
        top = None
        for a in range(0, n_rows, bank_chunk):
            b = min(a + bank_chunk, n_rows)
            d = torch.addmm(sq[None, a:b], e, rows(a, b).T, alpha=-2.0).add_(ee[:, None])
            own = torch.arange(s, s + e.shape[0])
            inside = (own >= a) & (own < b)
            d[inside.nonzero().squeeze(1), own[inside] - a] = float("inf")  # not itself
            d = torch.cat([top, d], 1) if top is not None else d
            top = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).values
        near[s : s + e.shape[0]] = top.clamp_min(0.0).sqrt().mean(1)
    mid = near.median()
    if not bool(mid > 0):
        return torch.ones(n_rows)
    return (near / mid).clamp_min(SCALE_FLOOR)


# the smallest local scale (`local_scale`): a row in a dense cluster divides its distances
# by at most 4
SCALE_FLOOR = 0.25


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, chunk: int = 512, bank_chunk: int = 1024
) -> torch.Tensor:
    """Exact Euclidean distance of each query row to its nearest bank row, in float32,
    computed in (chunk x bank_chunk) blocks so that memory stays bounded."""
    bank = bank.float()
    return _search(queries, bank.shape[0], lambda a, b: bank[a:b], (bank * bank).sum(1),
                   chunk, bank_chunk)


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
        affine codes: a quarter or an eighth of float32). Only the stored form is kept in
        memory (plus a float32 squared norm per entry): the search decodes `bank_chunk`
        entries at a time to float32, so distances are always computed in float32 on the
        stored values and a saved and reloaded bank scores exactly as the fitted one.
    projection_dim, presample: options of `greedy_coreset` (the coreset selection only).
    density_k: score a query by its distance to the nearest entry over that entry's
        `local_scale` (its k nearest other entries); None: the plain distance.
    """

    def __init__(
        self,
        fraction: float = 0.01,
        max_entries: int | None = 20000,
        seed: int = 0,
        min_entries: int = 64,
        pca_dim: int | None = None,
        dtype: str = "float32",
        *,
        projection_dim: int | None = 128,
        presample: float | None = None,
        chunk: int = 512,
        bank_chunk: int = 1024,
        density_k: int | None = None,
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
        self.projection_dim = projection_dim
        self.presample = presample
        self.chunk = chunk
        self.bank_chunk = bank_chunk
        if density_k is not None and (isinstance(density_k, bool) or density_k < 1):
            raise ValueError(f"density_k must be >= 1 or None, got {density_k!r}")
        self.density_k = density_k
        self.stored: dict[str, torch.Tensor] = {}
        self._sq: torch.Tensor | None = None  # squared norms of the decoded entries
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
            _, vecs = _eigh(centred.T @ centred / max(n - 1, 1))
            comps = vecs[:, -self.pca_dim :].flip(1)
            # fix each component's sign so the projection is deterministic
            comps = comps * torch.sign(comps[comps.abs().argmax(0), torch.arange(comps.shape[1])])
            self.proj = comps.float().contiguous()
        x = self._project(features)
        k = max(int(round(self.fraction * n)), min(self.min_entries, n))
        if self.max_entries is not None:
            k = min(k, self.max_entries)
        idx = greedy_coreset(x, k, seed=self.seed, projection_dim=self.projection_dim,
                             progress=progress, presample=self.presample)
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
        if self.density_k is not None:
            # on the stored (decoded) entries: a reloaded bank scores as the fitted one
            self.stored["scale"] = local_scale(self._rows, self.size, self._sq, self.density_k)

    def _decode(self) -> None:
        """Check the stored tensors and cache the squared norms of the decoded entries."""
        sq = [(r * r).sum(1) for r in self._blocks()]
        self._sq = torch.cat(sq) if sq else torch.zeros(0)

    @property
    def size(self) -> int:
        st = self.stored
        if not st:
            return 0
        return int(st["bank"].shape[0] if "bank" in st else st[CODES[self.dtype][0]].shape[0])

    def _rows(self, a: int, b: int) -> torch.Tensor:
        """Entries a..b-1 as float32 (decoded from the stored form)."""
        st = self.stored
        if self.dtype in CODES:
            key, bits = CODES[self.dtype]
            return dequantise(st[key][a:b], st["low"], st["step"], bits)
        return st["bank"][a:b].float()

    def _blocks(self):  # noqa: ANN202
        for a in range(0, self.size, self.bank_chunk):
            yield self._rows(a, min(a + self.bank_chunk, self.size))

    @property
    def bank(self) -> torch.Tensor | None:
        """The entries as float32 (decoded anew on each access; the search does not use it)."""
        return None if self._sq is None else self._rows(0, self.size)

    def score(self, queries: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour distance of each (M, C) query to the bank (over the nearest
        entry's local scale with `density_k`)."""
        if self._sq is None:
            raise RuntimeError("MemoryBank.score called before fit")
        return _search(self._project(queries), self.size, self._rows, self._sq,
                       self.chunk, self.bank_chunk, self.stored.get("scale"))

    def export_module(self) -> BankSearch:
        """The search as a module that exports to ONNX (`BankSearch`)."""
        if self._sq is None:
            raise RuntimeError("MemoryBank has not been fitted")
        return BankSearch(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._sq is None:
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
        if "scale" in sd:
            scale = sd["scale"]
            if scale.dim() != 1 or scale.shape[0] != self.size:
                raise KeyError(f"bank scale of shape {tuple(scale.shape)} for {self.size} entries")
            self.stored["scale"] = scale.float()
        self.proj = sd.get("proj")
        self.proj_mean = sd.get("proj_mean")

    @property
    def entries(self) -> int:
        return 0 if self._sq is None else self.size

    @property
    def nbytes(self) -> int:
        """Bytes stored (for int8 / int4: the codes plus a low and a step per dimension;
        with `density_k`, one float32 scale per entry)."""
        return int(sum(v.numel() * v.element_size() for v in self.stored.values()))


class BankSearch(nn.Module):
    """`MemoryBank.score` as torch operations for ONNX export: (M, C) queries -> (M,),
    divided by the nearest entry's local scale where the bank has one.

    The bank keeps its stored form as constants: 4- and 8-bit codes stay packed (uint8, the
    file is as small as the model's) and are decoded in the graph with the same float32
    operations as `dequantise`; float16 entries are widened to float32. The distance is the
    same expansion as the torch search (|e|^2 - 2 q.e, minimum, + |q|^2, clamp, sqrt).
    """

    def __init__(self, bank: MemoryBank, block: int = 1024) -> None:
        super().__init__()
        self.block = int(block)
        st = bank.stored
        self.dtype = bank.dtype
        self.dim = None
        if bank.dtype in CODES:
            key, bits = CODES[bank.dtype]
            self.bits = bits
            self.register_buffer("codes", st[key].contiguous())
            self.register_buffer("low", st["low"].float().contiguous())
            self.register_buffer("step", st["step"].float().contiguous())
            self.dim = int(st["low"].shape[0])
        else:
            self.bits = 0
            self.register_buffer("entries", st["bank"].contiguous())
        self.register_buffer("sq", bank._sq.float().contiguous())
        self.scaled = "scale" in st
        if self.scaled:
            self.register_buffer("scale", st["scale"].float().contiguous())
        self.project = bank.proj is not None and bank.proj_mean is not None
        if self.project:
            self.register_buffer("proj", bank.proj.float().contiguous())
            self.register_buffer("proj_mean", bank.proj_mean.float().contiguous())

    def decoded(self) -> torch.Tensor:
        """(K, C) float32 entries, as `MemoryBank._rows` gives them."""
        if not self.bits:
            return self.entries.float()
        # codes as float32 (exact for 0..255); a byte's two 4-bit codes split by a floor
        q = self.codes.to(torch.float32)
        if self.bits == 4:
            hi = torch.floor(q * 0.0625)
            q = torch.stack([q - hi * 16.0, hi], 2).reshape(q.shape[0], -1)[:, : self.dim]
        return self.low[None, :] + q * self.step[None, :]

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        q = queries.float()
        if self.project:
            q = (q - self.proj_mean) @ self.proj
        # the bank in blocks of `block` entries (unrolled at export: the bank's size is
        # fixed), so that the distance matrix of a batch stays small instead of
        # queries x entries (8 x 784 x 8,820 floats were 221 MB)
        entries = self.decoded()
        k = int(entries.shape[0])
        best = arg = None
        for a in range(0, k, self.block):
            b = min(a + self.block, k)
            d = torch.addmm(self.sq[None, a:b], q, entries[a:b].T, alpha=-2.0)
            if not self.scaled:
                d = d.amin(1)
                best = d if best is None else torch.minimum(best, d)
                continue
            v, i = d.min(1)
            i = i + a
            if best is None:
                best, arg = v, i
            else:  # an earlier block keeps a tie, as in the torch search
                better = v < best
                best, arg = torch.where(better, v, best), torch.where(better, i, arg)
        dist = (best + (q * q).sum(1)).clamp_min(0.0).sqrt()
        return dist if arg is None else dist / self.scale[arg]
