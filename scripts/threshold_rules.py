"""How well the image-threshold rule keeps a target false-positive rate.

    python scripts/threshold_rules.py --data DATA [--data DATA2 ...] [--method cmad]
        [--rates 0.01,0.02,0.05,0.1]

For each category of each DATA the method is fitted as the bench fits it (training split,
validation normals), and the fused image scores of the validation normals and of the test
split are kept. Each threshold rule is then applied to the validation normals alone, for
each target rate, and the test split says how it did: the share of good test parts flagged
(to compare with the target) and of defective ones. Rules:

- "t": cmad's rule (`cmad.model.decision`): the predictive Student-t quantile of the log
  scores, with the estimated spread's uncertainty;
- "known spread": the normal quantile of the same fit, the spread taken as known (the rule
  before round 10).

Prints one line per rule and rate: the mean FPR and TPR over the categories and the largest
FPR of any category. The test split is only read here to report; nothing is chosen on it.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from cmad.bench import load_category, method_config
from cmad.cache import default_cache_dir
from cmad.configs import DEFAULT_SIZE
from cmad.data import open_dataset
from cmad.model.decision import fit_scores_n, score_quantile
from cmad.model.fusion import normalise
from cmad.pipeline import Detector, pixel_area
from cmad.runtime import set_threads

RULES = ("t", "known spread")


def category_scores(data: Path, category: str, method: str, size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(validation normal scores, good test scores, defective test scores) of one category."""
    cd, ext = load_category(data, category, size, 0, default_cache_dir(), False, [method])
    det = Detector(method_config(method, 0, size), extractor=ext)
    det.fit_features(cd.train_fm, cd.calib_fm, cd.calib, cd.modalities, category=category)
    core = det.core

    def scores(fm, samples) -> np.ndarray:
        raw, _ = core.branch_scores(fm)
        maps = {n: normalise(s, v, *core.norm[n]) for n, (s, v) in raw.items()}
        return np.asarray(core.fuse(maps, pixel_area(samples))[0], dtype=np.float64)

    val = scores(cd.calib_fm, cd.calib)[np.array([p.label for p in cd.calib]) == 0]
    test = scores(cd.test_fm, cd.test)
    label = np.array([p.label for p in cd.test])
    return val, test[label == 0], test[label == 1]


def threshold(rule: str, normals: np.ndarray, rate: float) -> float:
    shift, loc, scale, n = fit_scores_n(normals)
    return score_quantile(shift, loc, scale, rate, n if rule == "t" else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, action="append", required=True)
    ap.add_argument("--method", default="cmad")
    ap.add_argument("--rates", default="0.01,0.02,0.05,0.1")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    set_threads(2)
    rates = [float(x) for x in args.rates.split(",")]
    cats = [(d, c) for d in args.data for c in open_dataset(d).categories]
    parts = [category_scores(d, c, args.method, args.size) for d, c in cats]
    print(f"{len(parts)} categories ({', '.join(str(d) for d in args.data)}), {args.method}")
    for rule in RULES:
        for rate in rates:
            fpr, tpr = [], []
            for val, good, bad in parts:
                t = threshold(rule, val, rate)
                fpr.append(float((good > t).mean()))
                tpr.append(float((bad > t).mean()))
            print(f"{rule:13s} target {rate:5.0%}: FPR {np.mean(fpr):6.1%}  TPR {np.mean(tpr):6.1%}"
                  f"  largest FPR {max(fpr):4.0%}")


if __name__ == "__main__":
    main()
