"""Normalise branch maps with normal-data statistics, combine them, post-process.

Every statistic here comes from normal validation data (never test data): each branch's
patch scores are shifted by their median and divided by the spread up to the 99th
percentile, so a normal patch sits near 0 and the rare normal extreme near 1 in every branch.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

log = logging.getLogger(__name__)


def robust_stats(scores: torch.Tensor, valid: torch.Tensor, q: float = 0.99) -> tuple[float, float]:
    """(location, scale) of valid patch scores: median and (q-quantile - median)."""
    v = scores[valid].float()
    if v.numel() == 0:
        return 0.0, 1.0
    loc = float(v.median())
    scale = float(torch.quantile(v, q)) - loc
    if not np.isfinite(scale) or scale <= 1e-12:
        scale = float(v.std()) if v.numel() > 1 else 1.0
        scale = scale if scale > 1e-12 else 1.0
    return loc, scale


def normalise(scores: torch.Tensor, valid: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """Standardise a (B, h, w) branch map. A patch the branch cannot score (no 3D there, say)
    gets the lowest standardised score of the valid patches of its own sample, and never more
    than 0 (the normal median); a sample with no valid patch gets 0 everywhere.

    Not the normal median: with a tight foreground most of an image has no 3D, and a flat 0
    there sat above half of the part's own normal patches and, blurred, around every defect;
    an FPFH bank on real-format data (Eyecandies CandyCane with the largest-component
    foreground, 7% of the patches valid) fell to P-AUROC 0.56 that way, against 0.94 with
    the lowest valid score (RESULTS.md, round 4).
    """
    z = (scores - loc) / scale
    big = torch.finfo(z.dtype).max
    low = torch.where(valid, z, torch.full_like(z, big)).flatten(1).min(1).values
    low = torch.where(valid.flatten(1).any(1), low.clamp(max=0.0), torch.zeros_like(low))
    return torch.where(valid, z, low[:, None, None].expand_as(z))


def combine(maps: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of normalised branch maps (branches with weight 0 are skipped)."""
    out = None
    for name, w in weights.items():
        if w == 0.0 or name not in maps:
            continue
        out = maps[name] * w if out is None else out + maps[name] * w
    if out is None:
        raise ValueError(f"no branch with non-zero weight among {sorted(maps)}")
    return out


def upsample(patch_maps: torch.Tensor, size: int, sigma: float = 4.0) -> np.ndarray:
    """(B, h, w) patch maps -> (B, size, size) pixel maps: bilinear, then Gaussian blur."""
    up = torch.nn.functional.interpolate(
        patch_maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    if sigma > 0:
        up = np.stack([gaussian_filter(m, sigma=sigma, mode="nearest") for m in up])
    return up.astype(np.float32)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The 1-D kernel `scipy.ndimage.gaussian_filter` uses: radius int(truncate * sigma +
    0.5), exp(-x^2 / (2 sigma^2)) normalised to sum 1 (float64)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x ** 2)
    return phi / phi.sum()


class PixelMaps(torch.nn.Module):
    """`upsample` as torch operations for ONNX export: bilinear resize, then the Gaussian
    blur as two 1-D convolutions (rows, then columns, as scipy filters axis 0 first) over
    edge-replicated padding (scipy's mode="nearest"), with scipy's kernel."""

    def __init__(self, size: int, sigma: float = 4.0) -> None:
        super().__init__()
        self.size = int(size)
        self.sigma = float(sigma)
        k = torch.from_numpy(gaussian_kernel(sigma).astype(np.float32)) if sigma > 0 else None
        self.radius = 0 if k is None else (k.numel() - 1) // 2
        if k is not None:
            self.register_buffer("k_rows", k.reshape(1, 1, -1, 1).clone())
            self.register_buffer("k_cols", k.reshape(1, 1, 1, -1).clone())

    def forward(self, patch_maps: torch.Tensor) -> torch.Tensor:
        up = torch.nn.functional.interpolate(
            patch_maps[:, None].float(), size=(self.size, self.size), mode="bilinear",
            align_corners=False)
        if self.sigma > 0:
            r = self.radius
            pad = torch.nn.functional.pad
            up = torch.nn.functional.conv2d(pad(up, (0, 0, r, r), mode="replicate"), self.k_rows)
            up = torch.nn.functional.conv2d(pad(up, (r, r, 0, 0), mode="replicate"), self.k_cols)
        return up[:, 0]


def image_scores(pixel_maps: np.ndarray, area: np.ndarray, mode: str = "max", topk: int = 10) -> np.ndarray:
    """One score per map over its image area: the maximum, or the mean of the top-k pixels."""
    out = np.empty(len(pixel_maps), dtype=np.float64)
    for i, (m, a) in enumerate(zip(pixel_maps, area)):
        v = m[a] if a.any() else m.ravel()
        if mode == "max":
            out[i] = float(v.max())
        elif mode == "topk":
            k = min(topk, v.size)
            out[i] = float(np.partition(v, v.size - k)[-k:].mean())
        else:
            raise ValueError(f"unknown image score mode {mode!r} (max or topk)")
    return out


def rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic with mid-ranks (equal to the trapezoidal ROC
    area, ties included), without scikit-learn's per-call validation: the weight search calls
    it hundreds of times."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return 0.5
    r = rankdata(np.asarray(s, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def choose_weights(
    maps: dict[str, torch.Tensor],
    gt_patch: torch.Tensor,
    area: torch.Tensor,
    labels: np.ndarray,
    grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0),
) -> tuple[dict[str, float], dict[str, float]]:
    """Pick branch weights on calibration data (normal validation samples, some with pasted
    synthetic defects): maximise the mean of the image AUROC (max over patches) and the
    patch AUROC. Returns (weights normalised to sum 1, criterion of each single branch).

    Ties go to the combination found first in a fixed order that starts with equal weights,
    so the choice is deterministic.
    """
    names = sorted(maps)
    a = area.bool()
    y_pix = gt_patch[a].numpy().astype(np.int64)

    def criterion(fused: torch.Tensor) -> float:
        masked = torch.where(a, fused, torch.full_like(fused, -1e9))
        img = masked.flatten(1).max(1).values.numpy()
        return 0.5 * rank_auc(labels, img) + 0.5 * rank_auc(y_pix, fused[a].numpy())

    single = {n: criterion(maps[n]) for n in names}
    combos = [tuple(1.0 for _ in names)]
    combos += [c for c in itertools.product(grid, repeat=len(names)) if any(c)]
    best, best_w = -1.0, combos[0]
    seen = set()
    for c in combos:
        total = sum(c)
        key = tuple(round(x / total, 6) for x in c)
        if key in seen:
            continue
        seen.add(key)
        val = criterion(combine(maps, dict(zip(names, key))))
        if val > best + 1e-9:
            best, best_w = val, key
    weights = dict(zip(names, best_w))
    log.info("fusion weights %s (criterion %.4f; single branches %s)", weights, best,
             {k: round(v, 4) for k, v in single.items()})
    return weights, single
