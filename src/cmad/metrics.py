"""Evaluation metrics of the MVTec 3D-AD protocol and the official anomaly-map export.

I-AUROC (one score per image), P-AUROC (all pixels of all images) and AUPRO at several
false-positive-rate limits, computed on the exact curves: every distinct score is a
threshold, never a fixed number of bins.

Curve convention (the one of MVTec's reference code): pixels are sorted by score,
descending, and each distinct score `s` gives one point, counting the pixels with
`score >= s` as positive; tied pixels therefore enter together and a tie between defect and
normal pixels is one diagonal segment. The curve starts at (0, 0) and ends at (1, 1). This is
the same set of points as "score > t" for t running over the distinct scores and -inf.

- Regions are the 8-connected components of each ground-truth mask binarised with `> 0`.
- FPR(s) = (normal pixels of all images with score >= s) / (normal pixels of all images).
- PRO(s) = mean over all regions of all images of the fraction of the region's pixels
  with score >= s.
- AUPRO@L = trapezoid area under PRO(FPR) from 0 to L, the curve linearly interpolated
  at L, divided by L (a perfect detector scores 1.0, a constant map L / 2).

Undefined values are returned as nan with a logged warning rather than raised, so one
degenerate category does not stop a whole evaluation: AUROCs when only one class is
present, AUPRO when there are no defect pixels (or no normal pixels). Invalid input
(NaN or inf scores, mismatched shapes or counts) raises ValueError naming the index.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from cmad.data.io import write_tiff_atomic

logger = logging.getLogger(__name__)

#: Keys and integration limits of the AUPRO entries returned by `compute_metrics`.
AUPRO_LIMITS: dict[str, float] = {
    "AUPRO@30%": 0.3,
    "AUPRO@10%": 0.1,
    "AUPRO@5%": 0.05,
    "AUPRO@1%": 0.01,
}
#: Keys of `compute_metrics`, in order.
METRIC_KEYS: tuple[str, ...] = ("I-AUROC", "P-AUROC", *AUPRO_LIMITS)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class _Curves:
    """Exact ROC and PRO curves over all pixels, one point per distinct score plus (0, 0)."""

    fpr: np.ndarray
    tpr: np.ndarray | None
    pro: np.ndarray | None
    n_normal: int
    n_defect: int
    n_regions: int


def _check_pairs(
    gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray], np.dtype]:
    """Validate masks and maps; return them as boolean masks, arrays and the common dtype."""
    if len(gt_masks) != len(maps):
        raise ValueError(f"got {len(gt_masks)} ground-truth masks but {len(maps)} anomaly maps")
    if len(maps) == 0:
        raise ValueError("no anomaly maps given")
    masks_out: list[np.ndarray] = []
    maps_out: list[np.ndarray] = []
    for i, (gt, amap) in enumerate(zip(gt_masks, maps)):
        gt = np.asarray(gt)
        amap = np.asarray(amap)
        if gt.ndim != 2 or amap.ndim != 2:
            raise ValueError(
                f"index {i}: masks and maps must be 2-D (H, W), got gt mask shape {gt.shape} "
                f"and map shape {amap.shape}"
            )
        if gt.shape != amap.shape:
            raise ValueError(
                f"index {i}: gt mask shape {gt.shape} differs from anomaly map shape {amap.shape}"
            )
        if amap.dtype == bool or not np.issubdtype(amap.dtype, np.number) or np.iscomplexobj(amap):
            raise ValueError(f"index {i}: anomaly map dtype {amap.dtype} is not a real number type")
        if not np.isfinite(amap).all():
            raise ValueError(f"index {i}: anomaly map contains NaN or inf")
        masks_out.append(gt > 0)
        maps_out.append(amap)
    dtype = np.result_type(*(m.dtype for m in maps_out))
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    return masks_out, maps_out, dtype


def _curves(
    gt_masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    with_pro: bool = True,
    with_roc: bool = True,
) -> _Curves:
    """Compute the exact curves with one value sort over all pixels.

    Only defect pixels carry a per-pixel payload (their region weight); normal pixels are
    counted from the sorted scores, so no argsort of all pixels is needed.
    """
    masks, amaps, dtype = _check_pairs(gt_masks, maps)
    n_total = sum(m.size for m in amaps)
    if n_total == 0:
        raise ValueError("the anomaly maps hold no pixels")
    scores = np.empty(n_total, dtype=dtype)
    defect_scores: list[np.ndarray] = []
    defect_weights: list[np.ndarray] = []
    n_regions = 0
    offset = 0
    for mask, amap in zip(masks, amaps):
        scores[offset : offset + amap.size] = amap.ravel()
        offset += amap.size
        if not mask.any():
            continue
        defect_scores.append(amap[mask].astype(dtype, copy=False))
        if with_pro:
            labeled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            region_sizes = np.bincount(labeled.ravel())
            defect_weights.append(1.0 / region_sizes[labeled[mask]])
            n_regions += n
    d_scores = np.concatenate(defect_scores) if defect_scores else np.empty(0, dtype)
    n_defect = int(d_scores.size)
    n_normal = n_total - n_defect

    scores.sort()
    is_first = np.empty(n_total, dtype=bool)
    is_first[0] = True
    np.not_equal(scores[1:], scores[:-1], out=is_first[1:])
    first = np.flatnonzero(is_first)
    del is_first
    distinct = scores[first]
    del scores
    # Descending thresholds: pixels with score >= distinct[k], for k from the top.
    n_ge = (n_total - first)[::-1]
    del first
    position = np.searchsorted(distinct, d_scores)
    n_levels = distinct.size
    del distinct
    defect_ge = np.cumsum(np.bincount(position, minlength=n_levels)[::-1])
    normal_ge = n_ge - defect_ge

    def _rate(count: np.ndarray, total: float) -> np.ndarray:
        out = np.empty(count.size + 1, dtype=np.float64)
        out[0] = 0.0
        if total > 0:
            np.divide(count, total, out=out[1:])
        else:
            out[1:] = np.nan
        return out

    fpr = _rate(normal_ge, n_normal)
    tpr = _rate(defect_ge, n_defect) if with_roc else None
    pro = None
    if with_pro:
        weights = np.concatenate(defect_weights) if defect_weights else np.empty(0)
        pro_ge = np.cumsum(np.bincount(position, weights=weights, minlength=n_levels)[::-1])
        pro = _rate(pro_ge, n_regions)
        np.minimum(pro, 1.0, out=pro)
    return _Curves(fpr, tpr, pro, n_normal, n_defect, n_regions)


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) from x[0] to `limit`, interpolating y linearly at `limit`.

    x must be non-decreasing; vertical steps (equal x) add no area.
    """
    inside = int(np.searchsorted(x, limit, side="right"))
    xs = x[:inside]
    ys = y[:inside]
    area = 0.5 * float(np.dot(np.diff(xs), ys[1:] + ys[:-1]))
    if inside < x.size and xs[-1] < limit:
        x0, y0, x1, y1 = x[inside - 1], y[inside - 1], x[inside], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * float(y0 + y_limit) * float(limit - x0)
    return area


def _check_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return limit


def _aupro_from(curves: _Curves, limit: float) -> float:
    if curves.n_regions == 0 or curves.n_normal == 0 or curves.pro is None:
        return float("nan")
    return _area_to(curves.fpr, curves.pro, limit) / limit


def _pixel_auroc_from(curves: _Curves) -> float:
    if curves.n_defect == 0 or curves.n_normal == 0 or curves.tpr is None:
        return float("nan")
    return _area_to(curves.fpr, curves.tpr, 1.0)


def _warn_degenerate(curves: _Curves, what: str) -> None:
    if curves.n_defect == 0:
        logger.warning("%s is undefined (nan): no defect pixels in the ground truth", what)
    elif curves.n_normal == 0:
        logger.warning("%s is undefined (nan): every pixel is a defect pixel", what)


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of one score per image; labels are binarised with `> 0` (1 = anomalous).

    Returns nan with a logged warning when only one class is present.
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"got {y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError("no image scores given")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"index {int(bad[0])}: image score {s[bad[0]]} is NaN or inf")
    positive = y > 0
    if positive.all() or not positive.any():
        logger.warning("I-AUROC is undefined (nan): all %d images have the same label", y.size)
        return float("nan")
    return float(roc_auc_score(positive, s))


def _wins(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(defective, good) matrix: 1 where the defective part scores above the good one, 0.5
    on a tie, else 0; its mean is the I-AUROC."""
    pos, neg = s[y > 0], s[y <= 0]
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def image_auroc_difference(
    labels: Sequence[Sequence[int] | np.ndarray],
    scores_a: Sequence[Sequence[float] | np.ndarray],
    scores_b: Sequence[Sequence[float] | np.ndarray],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """How far method a's mean I-AUROC over categories lies above method b's, on the same
    test parts, and how sure that is.

    One entry per category in each argument (labels, and the two methods' scores of the
    same parts in the same order). `mean`: the mean over categories of I-AUROC(a) -
    I-AUROC(b). `low` / `high`: the paired percentile bootstrap interval at `level`: each of
    `n_boot` replicates redraws every category's good parts and its defective parts with
    replacement (separately, so that each replicate keeps both), scores both methods on
    that same draw and averages the differences over categories. `p_not_above`: the share
    of replicates in which a is not above b; `categories`: how many were used (those with
    one class only are left out; nan when none is left). The same seed gives the same
    interval.
    """
    if not len(labels) == len(scores_a) == len(scores_b):
        raise ValueError(f"got {len(labels)} label lists but {len(scores_a)} and "
                         f"{len(scores_b)} score lists")
    _check_bootstrap(n_boot, level)
    rng = np.random.default_rng(seed)
    point, reps = [], []
    for i, (y, a, b) in enumerate(zip(labels, scores_a, scores_b)):
        y = np.asarray(y).ravel()
        a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        if not y.size == a.size == b.size:
            raise ValueError(f"category {i}: {y.size} labels, {a.size} and {b.size} scores")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"category {i}: an image score is NaN or inf")
        n1, n0 = int((y > 0).sum()), int((y <= 0).sum())
        if n1 == 0 or n0 == 0:
            continue
        d = _wins(y, a) - _wins(y, b)
        point.append(float(d.mean()))
        # counts of each part in each replicate: the mean of d over the drawn pairs
        w = resample_weights(y > 0, n_boot, rng)
        reps.append(((w[:, y > 0] @ d) * w[:, y <= 0]).sum(axis=1) / (n1 * n0))
    return _interval(point, reps, level)


def _check_bootstrap(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")


def _interval(point: list[float], reps: list[np.ndarray], level: float) -> dict[str, float]:
    """Mean of the per-category differences, the percentile interval of the replicates'
    means over the categories, the share of replicates at or below 0, and the number of
    categories used."""
    if not point:
        nan = float("nan")
        return {"mean": nan, "low": nan, "high": nan, "p_not_above": nan, "categories": 0}
    boot = np.mean(reps, axis=0)
    tail = (1.0 - level) / 2.0
    return {"mean": float(np.mean(point)), "low": float(np.quantile(boot, tail)),
            "high": float(np.quantile(boot, 1.0 - tail)),
            "p_not_above": float(np.mean(boot <= 0.0)), "categories": len(point)}


@dataclass(frozen=True)
class ProSummary:
    """One method's maps of one category reduced to what AUPRO needs at fixed thresholds,
    per image, so that AUPRO can be recomputed for any resample of the images
    (`aupro_replicates`). thresholds: (K,) descending; normal_above / region_above: (n, K)
    the image's normal pixels at or above each threshold, and the sum over its defect
    regions of the fraction of each region at or above it; normal / regions: (n,) totals."""

    thresholds: np.ndarray
    normal_above: np.ndarray
    normal: np.ndarray
    region_above: np.ndarray
    regions: np.ndarray


def pro_summary(gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], limit: float = 0.3,
                levels: int = 500, sample: int = 1_000_000, per_image: int = 65_536
                ) -> ProSummary:
    """`ProSummary` at `levels` + 1 thresholds: one just above the highest normal pixel,
    then the normal pixels' quantiles (of an even sample of at most `sample` of them) at
    false-positive rates spread evenly from 0 to 1.5 x `limit`, so that a resample's curve
    still reaches `limit`. Each image's normal pixels
    are counted on an even sample of at most `per_image` of them (every defect pixel
    counts). The AUPRO read off the summary of all images differs from the exact one by
    the trapezoids between thresholds (1e-5 in the tests) and the sampling (1e-3 with
    24,000 normal pixels sampled in all, 2e-5 with 6.5 million)."""
    masks, amaps, dtype = _check_pairs(gt_masks, maps)
    limit = _check_limit(limit)
    total = sum(int((~m).sum()) for m in masks)
    if total == 0:
        raise ValueError("the ground truth has no normal pixels")
    step = max(1, total // sample)
    pool = np.concatenate([a.ravel()[::step][~m.ravel()[::step]]
                           for m, a in zip(masks, amaps)]).astype(np.float64)
    rates = np.linspace(0.0, min(1.0, 1.5 * limit), levels + 1)[1:]
    # descending as the rates rise; in the maps' own type, so that no map is converted.
    # First, a threshold just above every normal pixel (not only the sampled ones): the
    # exact curve's point at no false positive, the part of each region that scores above
    # every normal pixel (large where the maps' top values are tied or saturated)
    top = max(float(a[~m].max()) for m, a in zip(masks, amaps) if (~m).any())
    above_all = np.nextafter(np.asarray(top, dtype=dtype), np.asarray(np.inf, dtype=dtype))
    thresholds = np.concatenate([[above_all], np.quantile(pool, 1.0 - rates).astype(dtype)])
    n_thr = thresholds.size
    ascending = np.ascontiguousarray(thresholds[::-1])

    def above(values: np.ndarray) -> np.ndarray:
        """(K,) how many values are at or above each (descending) threshold."""
        reached = np.searchsorted(ascending, values, side="right")  # thresholds <= value
        ge = np.cumsum(np.bincount(reached, minlength=n_thr + 1)[::-1])[::-1][1:]
        return ge[::-1].astype(np.float64)

    n = len(masks)
    normal_above, region_above = np.zeros((n, n_thr)), np.zeros((n, n_thr))
    normal, regions = np.zeros(n), np.zeros(n)
    for i, (mask, amap) in enumerate(zip(masks, amaps)):
        # an even sample of at most `per_image` normal pixels, counted at the image's weight
        values = amap[~mask] if mask.any() else amap.ravel()
        sub = values[::max(1, values.size // per_image)]
        normal[i] = float(values.size)
        normal_above[i] = above(sub) * (values.size / max(1, sub.size))
        if mask.any():
            labeled, k = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            lab = labeled[mask] - 1
            reached = np.searchsorted(ascending, amap[mask], side="right")
            # per region and level: pixels that reach exactly that many thresholds
            cnt = np.bincount(lab * (n_thr + 1) + reached,
                              minlength=k * (n_thr + 1)).reshape(k, n_thr + 1)
            ge = np.cumsum(cnt[:, ::-1], axis=1)[:, ::-1][:, 1:]  # at or above, ascending
            region_above[i] = (ge[:, ::-1] / cnt.sum(axis=1, keepdims=True)).sum(axis=0)
            regions[i] = float(k)
    return ProSummary(thresholds, normal_above, normal, region_above, regions)


def has_regions(summary: ProSummary) -> bool:
    """Whether the summarised images hold a defect region (else no AUPRO to compare)."""
    return bool((summary.regions > 0).any())


def aupro_replicates(summary: ProSummary, weights: np.ndarray, limit: float = 0.3) -> np.ndarray:
    """AUPRO@`limit` of each resample of the images: `weights` (B, n) how many times each
    image is drawn (a row of ones: all images once). Curves from (0, 0) through the
    summary's thresholds to (1, 1)."""
    limit = _check_limit(limit)
    w = np.asarray(weights, dtype=np.float64)
    fpr = (w @ summary.normal_above) / (w @ summary.normal)[:, None]
    pro = np.minimum((w @ summary.region_above) / (w @ summary.regions)[:, None], 1.0)
    zero, one = np.zeros((w.shape[0], 1)), np.ones((w.shape[0], 1))
    fpr, pro = np.hstack([zero, fpr, one]), np.hstack([zero, pro, one])
    return np.array([_area_to(x, y, limit) / limit for x, y in zip(fpr, pro)])


def resample_weights(defective: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) counts of each image in each replicate: the defective images and the
    good ones redrawn with replacement separately, so that every replicate keeps both."""
    defective = np.asarray(defective, dtype=bool)
    w = np.zeros((n_boot, defective.size))
    for group in (np.flatnonzero(defective), np.flatnonzero(~defective)):
        if group.size:
            w[:, group] = rng.multinomial(group.size, np.full(group.size, 1.0 / group.size),
                                          size=n_boot)
    return w


def aupro_difference(summaries_a: Sequence[ProSummary], summaries_b: Sequence[ProSummary],
                     limit: float = 0.3, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """The AUPRO@`limit` counterpart of `image_auroc_difference`: one `ProSummary` per
    category for each method, of the same images in the same order. Each replicate redraws
    every category's defective and good images with replacement (`resample_weights`),
    recomputes both methods' AUPRO on that draw from the summaries and averages the
    differences over the categories. `mean` is read off the summaries of all images (within
    about 1e-3 of the exact metric). Categories without defect regions are left out."""
    if len(summaries_a) != len(summaries_b):
        raise ValueError(f"got {len(summaries_a)} and {len(summaries_b)} summaries")
    _check_bootstrap(n_boot, level)
    rng = np.random.default_rng(seed)
    point, reps = [], []
    for i, (a, b) in enumerate(zip(summaries_a, summaries_b)):
        if a.regions.size != b.regions.size or not np.array_equal(a.regions > 0, b.regions > 0):
            raise ValueError(f"category {i}: the two summaries are not of the same images")
        if not has_regions(a):
            continue
        once = np.ones((1, a.regions.size))
        point.append(float(aupro_replicates(a, once, limit)[0] - aupro_replicates(b, once, limit)[0]))
        w = resample_weights(a.regions > 0, n_boot, rng)
        reps.append(aupro_replicates(a, w, limit) - aupro_replicates(b, w, limit))
    return _interval(point, reps, level)


def pixel_auroc(gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """ROC AUC over all pixels of all images (masks binarised with `> 0`; sizes may differ).

    Equal to sklearn's roc_auc_score on the flattened concatenation, computed from one value
    sort. Returns nan with a logged warning when only one class is present.
    """
    curves = _curves(gt_masks, maps, with_pro=False)
    _warn_degenerate(curves, "P-AUROC")
    return _pixel_auroc_from(curves)


def pro_curve(
    gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: (fpr, pro), float64, from (0, 0) to (1, 1), FPR non-decreasing.

    One point per distinct score (see the module docstring). With no defect pixels, pro is
    all nan (warning logged); with no normal pixels, fpr is nan after the first point.
    """
    curves = _curves(gt_masks, maps, with_roc=False)
    _warn_degenerate(curves, "PRO curve")
    if curves.pro is None:
        raise RuntimeError("PRO curve was not computed")
    return curves.fpr, curves.pro


def image_box(area: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns of the rectangle a bool `area` covers."""
    area = np.asarray(area, dtype=bool)
    rows, cols = np.flatnonzero(area.any(1)), np.flatnonzero(area.any(0))
    if rows.size == 0:
        raise ValueError("an image area covers no pixel")
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def crop_to_images(gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                   areas: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each mask and map cropped to the rectangle its bool area covers (the padding of a
    non-square image left out)."""
    if not len(gt_masks) == len(maps) == len(areas):
        raise ValueError(f"got {len(gt_masks)} masks, {len(maps)} maps and {len(areas)} areas")
    boxes = [image_box(a) for a in areas]
    return ([np.asarray(g)[b] for g, b in zip(gt_masks, boxes)],
            [np.asarray(m)[b] for m, b in zip(maps, boxes)])


def aupro_inside(gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                 areas: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """`aupro` of the masks and maps cropped to their images (`crop_to_images`)."""
    return aupro(*crop_to_images(gt_masks, maps, areas), fpr_limit)


def aupro(
    gt_masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3
) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by it (perfect detector: 1.0).

    Returns nan with a logged warning when there are no defect pixels (or no normal ones).
    """
    limit = _check_limit(fpr_limit)
    curves = _curves(gt_masks, maps, with_roc=False)
    _warn_degenerate(curves, f"AUPRO@{limit:g}")
    return _aupro_from(curves, limit)


def compute_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    gt_masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
) -> dict[str, float]:
    """The full metric set of one category, keys as in `METRIC_KEYS`.

    labels/scores: one per image (I-AUROC); gt_masks/maps: (H, W) per image, the same images
    in the same order. The curves are computed once and integrated to each limit.
    """
    if len(labels) != len(gt_masks):
        raise ValueError(f"got {len(labels)} image labels but {len(gt_masks)} ground-truth masks")
    curves = _curves(gt_masks, maps)
    _warn_degenerate(curves, "P-AUROC and AUPRO")
    mask_labels = np.array([bool(np.any(np.asarray(g) > 0)) for g in gt_masks])
    disagree = np.flatnonzero(mask_labels != (np.asarray(labels).ravel() > 0))
    if disagree.size:
        logger.warning(
            "%d image labels disagree with their gt masks (first at index %d)",
            disagree.size,
            int(disagree[0]),
        )
    result = {"I-AUROC": image_auroc(labels, scores), "P-AUROC": _pixel_auroc_from(curves)}
    for key, limit in AUPRO_LIMITS.items():
        result[key] = _aupro_from(curves, limit)
    return result


def _check_name(value: str, what: str) -> str:
    name = str(value)
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or (os.altsep is not None and os.altsep in name)
    ):
        raise ValueError(f"{what} {value!r} is not a valid file or folder name")
    return name


def write_anomaly_maps(
    out_dir: str | Path,
    category: str,
    items: Iterable[tuple[str, str, np.ndarray]],
) -> list[Path]:
    """Write float32 TIFF maps in the official layout `<out>/<category>/test/<defect>/<stem>.tiff`.

    items: (defect_type, stem, map (H, W)), maps at the ORIGINAL image size. Each file is
    written to a temporary file and renamed into place. Returns the written paths in order.
    """
    return write_category_maps(Path(out_dir) / _check_name(category, "category"), items)


def write_category_maps(cat_dir: str | Path,
                        items: Iterable[tuple[str, str, np.ndarray]]) -> list[Path]:
    """`write_anomaly_maps` into one category's folder: `<cat_dir>/test/<defect>/<stem>.tiff`."""
    root = Path(cat_dir) / "test"
    written: list[Path] = []
    seen: set[Path] = set()
    for defect_type, stem, amap in items:
        path = root / _check_name(defect_type, "defect type") / f"{_check_name(stem, 'stem')}.tiff"
        arr = np.asarray(amap)
        if arr.ndim != 2:
            raise ValueError(f"{defect_type}/{stem}: anomaly map must be (H, W), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{defect_type}/{stem}: anomaly map contains NaN or inf")
        if path in seen:
            raise ValueError(f"{defect_type}/{stem}: given twice")
        seen.add(path)
        write_tiff_atomic(path, np.ascontiguousarray(arr, dtype=np.float32))
        written.append(path)
    return written


def _bench_data(
    n: int, h: int, w: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random float32 maps with random disk-shaped defects (about 80% of images defective)."""
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    for _ in range(n):
        mask = np.zeros((h, w), dtype=np.uint8)
        if rng.random() < 0.8:
            for _ in range(int(rng.integers(1, 4))):
                r = int(rng.integers(4, max(5, min(h, w) // 10)))
                cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
                y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
                yy, xx = np.ogrid[y0:y1, x0:x1]
                mask[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
        amap = rng.random((h, w), dtype=np.float32)
        amap += 0.5 * (mask > 0)
        masks.append(mask)
        maps.append(amap)
    return masks, maps


def bench_aupro(n: int = 100, h: int = 600, w: int = 800, seed: int = 0) -> float:
    """Seconds taken by one `aupro` call on n random h x w float32 maps (data not timed)."""
    masks, maps = _bench_data(n, h, w, seed)
    start = time.perf_counter()
    value = aupro(masks, maps, 0.3)
    seconds = time.perf_counter() - start
    logger.info("AUPRO@30%% over %d maps of %d x %d: %.4f in %.2f s", n, h, w, value, seconds)
    return seconds
