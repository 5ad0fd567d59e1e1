"""Design tries on the tuning seeds: methods under config overrides, on shared features.

    python scripts/variants.py --data DATA [--label NAME] [--set JSON] [--methods cmad,mapping]
        [--ensemble K] [--size S]

For each category of DATA: the features are extracted once (through the cache) for the
config `--set` gives (a JSON mapping of `DetectorConfig` overrides, e.g.
'{"geometry": {"smooth": 4}}'), each method is fitted on the training split and
normalised on the validation normals, and the test split is scored. Metrics are at the
working resolution (faster than the bench's original-size maps, for comparing variants
with each other only; the padding of a non-square image left out, from round 16 on):
I-AUROC, AUPRO@30%, and the I-AUROC of the good parts against
the dents alone and the stains alone.

`--ensemble K` (K >= 2; the default 1 adds nothing) adds rows for K mappings trained with
seeds 0..K-1 whose raw patch scores (and, with `mapping.loss: nll`, their localisation
maps) are averaged, then normalised on the validation normals like any branch, alone
("mapping xK") and in place of cmad's own mapping ("cmad xK", cmad's weights).

Prints one line per method with the means over the categories and the per-category
I-AUROC / AUPRO@30%, then the first method's mean I-AUROC against each other method's with
a 95% paired bootstrap interval over the test parts (`cmad.metrics.image_auroc_difference`):
with 10 good test parts per category most gaps between variants lie inside it. Use tuning
data only (seeds 0 and 1): never a held-out seed.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch


def _metrics(y: np.ndarray, types: np.ndarray, gts: list, scores: np.ndarray,
             maps: np.ndarray, boxes: list) -> dict[str, float]:
    from cmad.metrics import aupro, image_auroc

    # maps and masks cropped to the image (the padding of a non-square image left out)
    out = {"I": image_auroc(y, scores),
           "PRO": aupro([g[b] for g, b in zip(gts, boxes)], [m[b] for m, b in zip(maps, boxes)], 0.3)}
    for t in ("dent", "stain"):
        k = (types == t) | (y == 0)
        out[t] = image_auroc(y[k], scores[k]) if (types == t).any() else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--label", default="variant")
    ap.add_argument("--set", default="{}", help="JSON mapping of config overrides")
    ap.add_argument("--methods", default="cmad,mapping")
    ap.add_argument("--ensemble", type=int, default=1)
    ap.add_argument("--size", type=int, default=None)
    args = ap.parse_args()
    if args.ensemble < 1:
        ap.error("--ensemble must be at least 1")

    from cmad.bench import load_category, method_config
    from cmad.cache import default_cache_dir
    from cmad.configs import DEFAULT_SIZE
    from cmad.data import open_dataset
    from cmad.metrics import image_auroc_difference, image_box
    from cmad.model.config import DetectorConfig
    from cmad.model.fusion import normalise, robust_stats
    from cmad.pipeline import Detector, pixel_area
    from cmad.runtime import set_threads

    logging.basicConfig(level=logging.ERROR)
    set_threads(2)
    size = args.size or DEFAULT_SIZE
    over = json.loads(args.set)
    base = DetectorConfig().with_overrides(over) if over else None
    methods = args.methods.split(",")
    res: dict[str, dict[str, dict[str, float]]] = {}
    scored: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # method -> cat -> (y, s)

    for c in open_dataset(args.data).categories:
        # the ensemble rows need cmad's features (its banks) whatever --methods says
        need = [*methods, "cmad"] if args.ensemble > 1 else methods
        cd, ext = load_category(args.data, c, size, 0, default_cache_dir(), False, need, base)
        y = np.array([p.label for p in cd.test])
        types = np.array([p.defect_type for p in cd.test])
        gts = [p.gt > 0 for p in cd.test]
        boxes = [image_box(p.geometry.image_mask(*p.gt.shape)) for p in cd.test]
        area = pixel_area(cd.test)

        fitted = {}
        for m in methods:
            det = Detector(method_config(m, 0, size, base), extractor=ext)
            det.fit_features(cd.train_fm, cd.calib_fm, cd.calib, cd.modalities, category=c)
            fitted[m] = det
            r = det.core.score(cd.test_fm, area, branch_maps=False)
            res.setdefault(m, {})[c] = _metrics(y, types, gts, r.scores, r.maps, boxes)
            scored.setdefault(m, {})[c] = (y, np.asarray(r.scores))
        if args.ensemble > 1:
            ref = fitted.get("cmad") or Detector(method_config("cmad", 0, size, base), extractor=ext)
            if "cmad" not in fitted:
                ref.fit_features(cd.train_fm, cd.calib_fm, cd.calib, cd.modalities, category=c)
            raw_v, _ = ref.core.branch_scores(cd.calib_fm)
            raw_t, _ = ref.core.branch_scores(cd.test_fm)
            # the mapping's scores and, with loss nll, its localisation map ("mapping@map")
            keys = [k for k in raw_v if k.startswith("mapping")]
            sv = {k: [raw_v[k][0]] for k in keys}
            st = {k: [raw_t[k][0]] for k in keys}
            for k in range(1, args.ensemble):
                dm = Detector(method_config("mapping", k, size, base), extractor=ext)
                dm.fit_features(cd.train_fm, cd.calib_fm, cd.calib, cd.modalities, category=c)
                rv, rt = dm.core.branch_scores(cd.calib_fm)[0], dm.core.branch_scores(cd.test_fm)[0]
                for key in keys:
                    sv[key].append(rv[key][0])
                    st[key].append(rt[key][0])
            normal = torch.from_numpy(np.array([p.label for p in cd.calib]) == 0)
            maps = {n: normalise(*raw_t[n], *ref.core.norm[n]) for n in raw_t}
            for key in keys:
                v = raw_v[key][1]
                stats = robust_stats((sum(sv[key]) / len(sv[key]))[normal], v[normal])
                maps[key] = normalise(sum(st[key]) / len(st[key]), raw_t[key][1], *stats)
            for name, w in ((f"mapping x{args.ensemble}", {"mapping": 1.0}),
                            (f"cmad x{args.ensemble}", ref.core.weights)):
                scores, pix = ref.core.fuse(maps, area, w)
                res.setdefault(name, {})[c] = _metrics(y, types, gts, scores, pix, boxes)
                scored.setdefault(name, {})[c] = (y, np.asarray(scores))

    for m, per in res.items():
        mean = {k: float(np.nanmean([v[k] for v in per.values()])) for k in ("I", "PRO", "dent", "stain")}
        cats = " ".join(f"{c} {v['I']:.3f}/{v['PRO']:.3f}" for c, v in per.items())
        print(f"{args.data.name} {args.label} {m}: " + " ".join(f"{k} {v:.4f}" for k, v in mean.items())
              + f" | {cats}", flush=True)
    ref, *others = list(scored) or [None]
    for m in others:
        cats = [c for c in scored[ref] if c in scored[m]]
        d = image_auroc_difference([scored[ref][c][0] for c in cats],
                                   [scored[ref][c][1] for c in cats],
                                   [scored[m][c][1] for c in cats])
        print(f"{args.data.name} {args.label} {ref} - {m}: I-AUROC {d['mean']:+.4f} "
              f"[{d['low']:+.4f}, {d['high']:+.4f}]", flush=True)


if __name__ == "__main__":
    main()
