"""`evaluate_predictions`: what its metrics are computed on."""
from __future__ import annotations

import numpy as np
import pytest

from cmad.evaluate import evaluate_predictions, image_labels
from cmad.metrics import compute_metrics, image_auroc
from cmad.types import Geometry, Prediction


def _preds(n: int = 8, seed: int = 0) -> tuple[list[Prediction], list[np.ndarray], Geometry]:
    """Predictions at a 16 px working square over a 16 x 8 image (4 px of padding on each
    side, where the maps hold their lowest value)."""
    rng = np.random.default_rng(seed)
    geo = Geometry(orig_h=8, orig_w=16, pad_top=4, pad_left=0, size=16)
    inside = geo.image_mask(16, 16)
    preds, gts = [], []
    for i in range(n):
        gt = np.zeros((16, 16), bool)
        if i % 2:
            gt[6:9, 3 + i : 6 + i] = True
        m = (rng.random((16, 16)) + 0.7 * gt).astype(np.float32)
        m[~inside] = 0.0
        preds.append(Prediction(score=float(m.max()), anomaly_map=m[inside].reshape(8, 16),
                                anomaly_map_work=m, label=int(i % 2)))
        gts.append(gt)
    return preds, gts, geo


def test_working_resolution_leaves_the_padding_out() -> None:
    preds, gts, geo = _preds()
    areas = [geo.image_mask(16, 16)] * len(preds)
    ev = evaluate_predictions("c", preds, gts, resolution="working", per_defect=False, areas=areas)
    rows = slice(4, 12)
    ref = compute_metrics(np.array([p.label for p in preds]), np.array([p.score for p in preds]),
                          [g[rows] for g in gts], [p.anomaly_map_work[rows] for p in preds])
    assert ev.metrics == pytest.approx(ref)
    # counted, the padding's easy normal pixels raise every pixel metric
    padded = evaluate_predictions("c", preds, gts, resolution="working", per_defect=False)
    assert padded.metrics["P-AUROC"] > ev.metrics["P-AUROC"] + 0.01
    with pytest.raises(ValueError, match="areas"):
        evaluate_predictions("c", preds, gts, resolution="working", areas=areas[:-1])


def test_image_labels_are_the_samples_own() -> None:
    preds, gts, _ = _preds()
    # a defective part whose mask lost its defect (a small one, resized): still defective
    gts[1] = np.zeros_like(gts[1])
    labels = image_labels(preds, gts)
    assert labels.tolist() == [i % 2 for i in range(len(preds))]
    ev = evaluate_predictions("c", preds, gts, resolution="working", per_defect=False)
    assert ev.metrics["I-AUROC"] == pytest.approx(image_auroc(labels, [p.score for p in preds]))
    # without a label, the mask decides
    unlabelled = [Prediction(p.score, p.anomaly_map, p.anomaly_map_work) for p in preds]
    assert image_labels(unlabelled, gts).tolist() == [int(g.any()) for g in gts]
