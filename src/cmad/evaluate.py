"""Evaluate a fitted detector on a category's test split with the MVTec 3D-AD protocol."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmad.data.io import atomic_folder, recover_folder
from cmad.errors import OutputError
from cmad.metrics import compute_metrics, crop_to_images, write_category_maps
from cmad.model.decision import Decision
from cmad.types import Prediction

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Metrics of one category plus what they were computed from."""

    category: str
    metrics: dict[str, float]
    n_test: int
    resolution: str
    per_defect: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"category": self.category, "n_test": self.n_test, "resolution": self.resolution,
                **self.metrics, "per_defect": self.per_defect}


def evaluate_predictions(
    category: str,
    preds: Sequence[Prediction],
    gts: Sequence[np.ndarray],
    resolution: str = "original",
    per_defect: bool = True,
    areas: Sequence[np.ndarray] | None = None,
) -> Evaluation:
    """Metrics from predictions and their gt masks (at the same resolution as the maps).

    resolution "original" uses `anomaly_map` (the official harness); "working" uses
    `anomaly_map_work` (the square working resolution most papers report). `areas`: per
    sample, a bool mask of the pixels that belong to the image (`Geometry.image_mask` at
    working resolution): the maps and masks are cropped to it, so that the padding of a
    non-square image does not count as easy normal pixels. Image labels are the samples'
    own (`Prediction.label`), a mask's content only where a prediction carries none: a
    small defect can vanish from a mask resized to the working resolution.
    """
    maps = [p.anomaly_map if resolution == "original" else p.anomaly_map_work for p in preds]
    gts = list(gts)
    if areas is not None:
        if len(areas) != len(preds):
            raise ValueError(f"got {len(areas)} image areas for {len(preds)} predictions")
        gts, maps = crop_to_images(gts, maps, areas)
    labels = image_labels(preds, gts)
    scores = np.array([p.score for p in preds])
    metrics = compute_metrics(labels, scores, gts, maps)
    out = Evaluation(category, metrics, len(preds), resolution)
    if per_defect:
        types = sorted({p.defect_type for p in preds if p.defect_type not in (None, "good")})
        for t in types:
            idx = [i for i, p in enumerate(preds) if p.defect_type in (t, "good")]
            sub = compute_metrics(labels[idx], scores[idx], [gts[i] for i in idx],
                                  [maps[i] for i in idx])
            out.per_defect[t] = sub
    return out


def image_labels(preds: Sequence[Prediction], gts: Sequence[np.ndarray]) -> np.ndarray:
    """int (N,): 1 for a defective part. The sample's own label; where a prediction has
    none, whether its mask marks any pixel."""
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions but {len(gts)} ground-truth masks")
    return np.array([int(p.label) if p.label is not None else int(np.any(g))
                     for p, g in zip(preds, gts)], dtype=np.int64)


# the false-positive rate at which `decision_rates` reads the detector's ceiling
CEILING_FPR = 0.10
# target rates at which `decision_rates` also applies the model's rule (`Decision.with_fpr`)
TARGET_RATES = (0.01, 0.05, 0.10)


def target_key(rate: float, what: str) -> str:
    """The key of the test split's `what` ("fpr" or "tpr") at target rate `rate`."""
    return f"target_{rate:g}_{what}"


def decision_rates(decision: Decision, preds: Sequence[Prediction],
                   gts: Sequence[np.ndarray]) -> dict:
    """How the stored decision does on labelled parts (the test split; reported, never used
    to pick it): the false-positive rate (good parts judged anomalous), the false-negative
    rate (defective parts judged normal), pixel rates of the predicted masks, and the image
    rates the model's rule gives at each of TARGET_RATES (whether a target is kept)."""
    labels = image_labels(preds, gts)
    flagged = np.array([decision.anomalous(p.score) for p in preds], dtype=bool)
    good, bad = labels == 0, labels == 1
    fp_px = tp_px = neg_px = pos_px = 0
    for p, g in zip(preds, gts):
        m = decision.mask(p.anomaly_map, p.score)
        g = np.asarray(g, dtype=bool)
        fp_px += int((m & ~g).sum())
        tp_px += int((m & g).sum())
        neg_px += int((~g).sum())
        pos_px += int(g.sum())
    scores = np.array([p.score for p in preds], dtype=np.float64)
    at_targets: dict[str, float] = {}
    if decision.has_distribution:
        for rate in TARGET_RATES:
            t = decision.with_fpr(rate).threshold
            at_targets[target_key(rate, "fpr")] = (float((scores[good] > t).mean())
                                                   if good.any() else float("nan"))
            at_targets[target_key(rate, "tpr")] = (float((scores[bad] > t).mean())
                                                   if bad.any() else float("nan"))
    return {
        "threshold": float(decision.threshold), "target_fpr": decision.target_fpr,
        "pixel_threshold": float(decision.pixel_threshold),
        "n_good": int(good.sum()), "n_defective": int(bad.sum()),
        "fpr": float(flagged[good].mean()) if good.any() else float("nan"),
        "fnr": float((~flagged[bad]).mean()) if bad.any() else float("nan"),
        "pixel_fpr": fp_px / neg_px if neg_px else float("nan"),
        "pixel_tpr": tp_px / pos_px if pos_px else float("nan"),
        "tpr_at_fpr10": best_tpr(scores[good], scores[bad], CEILING_FPR),
        **at_targets,
    }


def best_tpr(good: np.ndarray, bad: np.ndarray, max_fpr: float) -> float:
    """The largest share of `bad` scores that one threshold flags (score >= threshold)
    while it flags at most `max_fpr` of the `good` ones: a point of the ROC curve. On the
    test split it is the detector's ceiling for any threshold picked without test data,
    never a decision (NaN without both kinds of part)."""
    good, bad = np.asarray(good, np.float64), np.asarray(bad, np.float64)
    good, bad = -np.sort(-good[np.isfinite(good)]), bad[np.isfinite(bad)]  # highest first
    if good.size == 0 or bad.size == 0:
        return float("nan")
    allowed = int(np.floor(max_fpr * good.size + 1e-9))  # good parts that may be flagged
    if allowed >= good.size:
        return 1.0
    # the threshold must lie just above the (allowed + 1)-th highest good score
    return float((bad > good[allowed]).mean())


def is_maps_output(cat_dir: Path) -> bool:
    """True for a category folder written by `export_maps`: test/<defect>/<stem>.tiff only."""
    test = cat_dir / "test"
    if {p.name for p in cat_dir.iterdir()} != {"test"} or not test.is_dir():
        return False
    return all(d.is_dir() and all(f.suffix == ".tiff" and f.is_file() for f in d.iterdir())
               for d in test.iterdir())


def check_maps_dir(out_dir: Path, category: str) -> Path:
    """Refuse a maps folder that cannot take this category's maps, before any work."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "--maps path is a file, not a folder")
    cat_dir = out_dir / category
    recover_folder(cat_dir)
    if cat_dir.exists() and (not cat_dir.is_dir()
                             or (any(cat_dir.iterdir()) and not is_maps_output(cat_dir))):
        raise OutputError(cat_dir, "exists and holds other files than maps of an earlier "
                                   "`evaluate --maps`; choose a new or empty folder")
    return cat_dir


def export_maps(out_dir: Path, category: str, preds: Sequence[Prediction]) -> list[Path]:
    """Write float32 TIFF maps at original size in the official layout
    `<out>/<category>/test/<defect>/<stem>.tiff`. The category's folder is built whole in a
    hidden sibling and renamed into place (earlier maps of that category are replaced;
    other categories' folders are left alone)."""
    cat_dir = check_maps_dir(out_dir, category)
    items = []
    for p in preds:
        defect, stem = p.key.split("/")[-2:]
        items.append((defect, stem, p.anomaly_map.astype(np.float32)))
    with atomic_folder(cat_dir, is_maps_output) as tmp:
        written = write_category_maps(tmp, items)
    return [cat_dir / w.relative_to(tmp) for w in written]
