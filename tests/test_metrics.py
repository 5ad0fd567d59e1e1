"""Metrics: hand-computed cases, an independent slow reference, sklearn, edge cases, export."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from sklearn.metrics import roc_auc_score

from cmad import metrics
from cmad.metrics import (
    METRIC_KEYS,
    aupro,
    bench_aupro,
    compute_metrics,
    image_auroc,
    pixel_auroc,
    pro_curve,
    write_anomaly_maps,
)

LIMITS = (0.3, 0.1, 0.05, 0.01)


# ---------------------------------------------------------------- independent reference


def _label8(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components by explicit flood fill (no scipy)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=int)
    n = 0
    for i, j in zip(*np.nonzero(mask)):
        if labels[i, j]:
            continue
        n += 1
        labels[i, j] = n
        stack = [(i, j)]
        while stack:
            a, b = stack.pop()
            for da in (-1, 0, 1):
                for db in (-1, 0, 1):
                    y, x = a + da, b + db
                    if 0 <= y < h and 0 <= x < w and mask[y, x] and not labels[y, x]:
                        labels[y, x] = n
                        stack.append((y, x))
    return labels, n


def _reference_curve(gts: list[np.ndarray], maps: list[np.ndarray]) -> tuple[list, list]:
    """Loop over the distinct scores, descending; count pixels with score >= t directly."""
    regions = []
    for k, gt in enumerate(gts):
        labels, n = _label8(gt > 0)
        regions += [(k, labels == r) for r in range(1, n + 1)]
    n_normal = sum(int((gt == 0).sum()) for gt in gts)
    thresholds = sorted({float(v) for m in maps for v in m.ravel()}, reverse=True)
    fpr, pro = [0.0], [0.0]
    for t in thresholds:
        fp = sum(int(((m >= t) & (gt == 0)).sum()) for gt, m in zip(gts, maps))
        overlaps = [float((maps[k][region] >= t).mean()) for k, region in regions]
        fpr.append(fp / n_normal)
        pro.append(sum(overlaps) / len(overlaps))
    return fpr, pro


def _reference_area(x: list, y: list, limit: float) -> float:
    """Trapezoids segment by segment, cutting the segment that crosses the limit."""
    area = 0.0
    for i in range(len(x) - 1):
        x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2
            break
    return area / limit


def _random_case(
    seed: int, quantise: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images of different sizes with random blobs (gt values 253-255), one good image."""
    rng = np.random.default_rng(seed)
    sizes = [(20, 24), (18, 30), (24, 22), (16, 16)]
    gts, maps = [], []
    for k, (h, w) in enumerate(sizes):
        gt = np.zeros((h, w), dtype=np.uint8)
        if k != 3:
            for _ in range(int(rng.integers(2, 4))):
                cy, cx = rng.integers(0, h), rng.integers(0, w)
                ry, rx = rng.integers(1, 5), rng.integers(1, 5)
                yy, xx = np.ogrid[:h, :w]
                blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
                gt[blob] = rng.choice([253, 254, 255])
            gt[0, 0] = gt[1, 1] = 255  # diagonal neighbours: one region only with 8-connectivity
        amap = rng.normal(size=(h, w)) + 1.5 * (gt > 0) * rng.random((h, w))
        if quantise:
            amap = np.round(amap * 2) / 2  # few distinct values: many ties
        maps.append(amap.astype(np.float32))
        gts.append(gt)
    return gts, maps


@pytest.mark.parametrize(("seed", "quantise"), [(0, False), (1, True), (2, True), (3, False)])
def test_matches_reference(seed: int, quantise: bool) -> None:
    gts, maps = _random_case(seed, quantise)
    ref_fpr, ref_pro = _reference_curve(gts, maps)
    fpr, pro = pro_curve(gts, maps)
    assert fpr.shape == pro.shape == (len(ref_fpr),)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    for limit in LIMITS:
        assert aupro(gts, maps, limit) == pytest.approx(
            _reference_area(ref_fpr, ref_pro, limit), abs=1e-6
        )
    result = compute_metrics([int(g.any()) for g in gts], [m.max() for m in maps], gts, maps)
    for key, limit in metrics.AUPRO_LIMITS.items():
        assert result[key] == pytest.approx(_reference_area(ref_fpr, ref_pro, limit), abs=1e-6)


def test_reference_labelling_agrees_with_scipy_on_random_masks() -> None:
    from scipy import ndimage

    gts, _ = _random_case(5, False)
    for gt in gts:
        ours, n_ours = _label8(gt > 0)
        theirs, n_theirs = ndimage.label(gt > 0, structure=np.ones((3, 3)))
        assert n_ours == n_theirs
        assert np.array_equal(ours > 0, theirs > 0)


# ---------------------------------------------------------------- hand-computed cases


def test_hand_computed_single_region() -> None:
    # gt: one region of 2 pixels (top-left), 4 normal pixels.
    # Scores descending: 0.9 D, 0.7 N, 0.5 D + 0.5 N (tie), 0.3 N, 0.1 N.
    # Curve points (FPR, PRO): (0,0) (0,.5) (.25,.5) (.5,1) (.75,1) (1,1); the tie is one
    # diagonal point. Area to 0.3: 0 + .25*.5 = .125; then PRO at 0.3 interpolates between
    # (.25,.5) and (.5,1): .5 + .5*(.05/.25) = .6, area .05*(.5+.6)/2 = .0275.
    # AUPRO@30% = (.125 + .0275) / .3 = 61/120. Full area: .125 + .1875 + .25 + .25 = .8125.
    gt = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8)
    amap = np.array([[0.9, 0.5, 0.7], [0.3, 0.5, 0.1]], dtype=np.float32)
    fpr, pro = pro_curve([gt], [amap])
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1])
    assert aupro([gt], [amap], 0.3) == pytest.approx(61 / 120, abs=1e-12)
    assert aupro([gt], [amap], 1.0) == pytest.approx(0.8125, abs=1e-12)
    # AUPRO@10%: PRO is 0.5 from FPR 0 to 0.25.
    assert aupro([gt], [amap], 0.1) == pytest.approx(0.5, abs=1e-12)


def test_regions_are_eight_connected() -> None:
    # Defect pixels (0,0), (1,1), (1,2): one 8-connected region of 3 pixels. Only (0,0) is
    # detected at the top threshold: PRO = 1/3 (4-connectivity would give mean(1, 0) = 0.5).
    gt = np.zeros((3, 4), dtype=np.uint8)
    gt[0, 0] = gt[1, 1] = gt[1, 2] = 255
    amap = np.zeros((3, 4), dtype=np.float32)
    amap[0, 0] = 1.0
    _, pro = pro_curve([gt], [amap])
    assert pro[1] == pytest.approx(1 / 3)


def test_pro_weights_regions_equally_not_pixels() -> None:
    # A 1-pixel region fully detected and a 9-pixel region missed: PRO = 0.5, not 0.1.
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[0, 0] = 1
    gt[3:6, 3:6] = 1
    amap = np.zeros((6, 6))
    amap[0, 0] = 2.0
    fpr, pro = pro_curve([gt], [amap])
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(0.5))


def _three_images() -> list[np.ndarray]:
    gts = [np.zeros((8, 10), dtype=np.uint8) for _ in range(3)]
    gts[0][1:3, 1:4] = 255
    gts[0][6, 8] = 254
    gts[1][4:8, 0:2] = 253
    return gts


def test_perfect_detector_scores_one() -> None:
    gts = _three_images()
    maps = [(g > 0).astype(np.float32) for g in gts]
    for limit in LIMITS:
        assert aupro(gts, maps, limit) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(gts, maps) == pytest.approx(1.0)


def test_constant_map_scores_half_the_limit() -> None:
    # One point (1, 1) after (0, 0): PRO = FPR, area L^2 / 2, divided by L.
    gts = _three_images()
    maps = [np.full(g.shape, 0.25, dtype=np.float32) for g in gts]
    for limit in LIMITS:
        assert aupro(gts, maps, limit) == pytest.approx(limit / 2, abs=1e-12)
    assert pixel_auroc(gts, maps) == pytest.approx(0.5)


def test_inverted_map_scores_zero() -> None:
    gts = _three_images()
    maps = [1.0 - (g > 0).astype(np.float32) for g in gts]
    for limit in LIMITS:
        assert aupro(gts, maps, limit) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(gts, maps) == pytest.approx(0.0)


# ---------------------------------------------------------------- AUROCs


@pytest.mark.parametrize("quantise", [False, True])
def test_pixel_auroc_matches_sklearn(quantise: bool) -> None:
    gts, maps = _random_case(7, quantise)
    labels = np.concatenate([(g > 0).ravel() for g in gts])
    scores = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(gts, maps) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_image_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=40)
    scores = np.round(rng.normal(size=40) + labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_single_class_is_nan_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cmad.metrics"):
        assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.5, 0.2]))
    assert "I-AUROC is undefined" in caplog.text


def test_image_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="index 1"):
        image_auroc([0, 1, 1], [0.1, float("nan"), 0.3])


def test_compute_metrics_keys_and_values() -> None:
    gts, maps = _random_case(11, True)
    labels = [int(g.any()) for g in gts]
    scores = [float(m.max()) for m in maps]
    result = compute_metrics(labels, scores, gts, maps)
    assert tuple(result) == METRIC_KEYS == (
        "I-AUROC", "P-AUROC", "AUPRO@30%", "AUPRO@10%", "AUPRO@5%", "AUPRO@1%",
    )
    assert result["I-AUROC"] == pytest.approx(image_auroc(labels, scores))
    assert result["P-AUROC"] == pytest.approx(pixel_auroc(gts, maps))
    assert result["AUPRO@5%"] == pytest.approx(aupro(gts, maps, 0.05))


# ---------------------------------------------------------------- edge cases


def test_no_defect_pixels_gives_nan_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    gts = [np.zeros((5, 6), dtype=np.uint8)] * 2
    maps = [np.random.default_rng(0).random((5, 6)) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="cmad.metrics"):
        assert math.isnan(aupro(gts, maps))
        result = compute_metrics([0, 0], [0.1, 0.2], gts, maps)
    assert "no defect pixels" in caplog.text
    assert all(math.isnan(v) for v in result.values())


def test_nan_map_is_rejected_naming_the_index() -> None:
    gts, maps = _random_case(0, False)
    maps[2] = maps[2].copy()
    maps[2][3, 4] = np.nan
    for fn in (aupro, pixel_auroc, pro_curve):
        with pytest.raises(ValueError, match="index 2: anomaly map contains NaN"):
            fn(gts, maps)


def test_mismatched_shapes_are_rejected_naming_index_and_shapes() -> None:
    gts, maps = _random_case(0, False)
    maps[1] = maps[1][:, :-1]
    with pytest.raises(ValueError, match=r"index 1: gt mask shape \(18, 30\) .* \(18, 29\)"):
        aupro(gts, maps)


def test_mismatched_counts_and_bad_limits_are_rejected() -> None:
    gts, maps = _random_case(0, False)
    with pytest.raises(ValueError, match="4 ground-truth masks but 3 anomaly maps"):
        pixel_auroc(gts, maps[:3])
    with pytest.raises(ValueError, match="3 image labels but 4"):
        compute_metrics([0, 1, 1], [0.0, 1.0, 1.0], gts, maps)
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(gts, maps, limit)


def test_integer_and_float64_maps_give_the_same_curve() -> None:
    gts, maps = _random_case(4, True)
    as_int = [np.round(m * 2).astype(np.int16) for m in maps]
    as_f64 = [m.astype(np.float64) * 2 for m in maps]
    np.testing.assert_allclose(pro_curve(gts, as_int)[1], pro_curve(gts, as_f64)[1])


def test_bench_runs_on_tiny_input() -> None:
    assert bench_aupro(n=3, h=30, w=40, seed=1) > 0.0


# ---------------------------------------------------------------- export


def test_write_anomaly_maps_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = [
        ("good", "000", rng.random((6, 8))),
        ("cut", "000", rng.random((6, 8)).astype(np.float32)),
        ("cut", "001", rng.random((7, 5)).astype(np.float32)),
    ]
    paths = write_anomaly_maps(tmp_path, "tire", items)
    assert paths == [
        tmp_path / "tire" / "test" / "good" / "000.tiff",
        tmp_path / "tire" / "test" / "cut" / "000.tiff",
        tmp_path / "tire" / "test" / "cut" / "001.tiff",
    ]
    for path, (_, _, amap) in zip(paths, items):
        back = tifffile.imread(path)
        assert back.dtype == np.float32 and back.shape == amap.shape
        np.testing.assert_array_equal(back, amap.astype(np.float32))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".tiff"]
    # Rewriting replaces the file in place.
    write_anomaly_maps(tmp_path, "tire", [("cut", "001", np.zeros((2, 3), np.float32))])
    assert tifffile.imread(paths[2]).shape == (2, 3)


def test_write_anomaly_maps_rejects_bad_items(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cut/000"):
        write_anomaly_maps(tmp_path, "tire", [("cut", "000", np.zeros((2, 3, 1)))])
    with pytest.raises(ValueError, match="stem '../x'"):
        write_anomaly_maps(tmp_path, "tire", [("cut", "../x", np.zeros((2, 3)))])
    with pytest.raises(ValueError, match="given twice"):
        write_anomaly_maps(
            tmp_path, "tire", [("cut", "000", np.zeros((2, 3)))] * 2
        )
    with pytest.raises(ValueError, match="NaN"):
        write_anomaly_maps(tmp_path, "tire", [("cut", "002", np.full((2, 3), np.nan))])


def test_image_auroc_difference_is_a_paired_bootstrap_of_the_auroc_difference() -> None:
    from cmad.metrics import image_auroc_difference

    rng = np.random.default_rng(3)
    labels = [np.r_[np.zeros(8), np.ones(20)], np.r_[np.ones(12), np.zeros(6)]]
    a = [y + rng.normal(0, 1, y.size) for y in labels]
    b = [0.5 * y + rng.normal(0, 1, y.size) for y in labels]
    a[0][:3] = b[0][:3] = 0.25  # ties inside and across the methods
    out = image_auroc_difference(labels, a, b, n_boot=300, seed=7)
    point = np.mean([image_auroc(y, x) - image_auroc(y, z) for y, x, z in zip(labels, a, b)])
    assert out["mean"] == pytest.approx(point, abs=1e-12)
    # the same replicates drawn part by part: each category's defective then good parts,
    # every replicate scored by image_auroc on the redrawn parts
    check = np.random.default_rng(7)
    reps = []
    for y, x, z in zip(labels, a, b):
        pos, neg = np.flatnonzero(y > 0), np.flatnonzero(y <= 0)
        w1 = check.multinomial(pos.size, np.full(pos.size, 1 / pos.size), size=300)
        w0 = check.multinomial(neg.size, np.full(neg.size, 1 / neg.size), size=300)
        rows = []
        for c1, c0 in zip(w1, w0):
            idx = np.r_[np.repeat(pos, c1), np.repeat(neg, c0)]
            rows.append(image_auroc(y[idx], x[idx]) - image_auroc(y[idx], z[idx]))
        reps.append(rows)
    boot = np.mean(reps, axis=0)
    assert out["low"] == pytest.approx(np.quantile(boot, 0.025), abs=1e-12)
    assert out["high"] == pytest.approx(np.quantile(boot, 0.975), abs=1e-12)
    assert out["p_not_above"] == pytest.approx(np.mean(boot <= 0))
    assert out["low"] < out["mean"] < out["high"]
    assert image_auroc_difference(labels, a, b, n_boot=300, seed=7) == out  # deterministic


def test_image_auroc_difference_edge_cases() -> None:
    from cmad.metrics import image_auroc_difference

    y = [np.r_[np.zeros(5), np.ones(5)]]
    s = [np.arange(10.0)]
    same = image_auroc_difference(y, s, s, n_boot=50)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0, "p_not_above": 1.0, "categories": 1}
    # a perfect detector against a useless one: every replicate says so
    flat = image_auroc_difference(y, s, [np.zeros(10)], n_boot=50)
    assert flat["mean"] == 0.5 and flat["low"] == 0.5 and flat["p_not_above"] == 0.0
    # a one-class category is left out; none left gives nan
    both = image_auroc_difference([*y, np.ones(4)], [*s, np.ones(4)], [np.zeros(10), np.ones(4)],
                                  n_boot=50)
    assert both["mean"] == 0.5 and both["categories"] == 1
    with pytest.raises(ValueError, match="n_boot"):
        image_auroc_difference(y, s, s, n_boot=10.0)
    assert math.isnan(image_auroc_difference([np.ones(3)], [np.ones(3)], [np.ones(3)])["mean"])
    with pytest.raises(ValueError, match="label lists"):
        image_auroc_difference(y, s, [])
    with pytest.raises(ValueError, match="category 0"):
        image_auroc_difference(y, [np.arange(9.0)], s)
    with pytest.raises(ValueError, match="NaN or inf"):
        image_auroc_difference(y, [np.r_[np.nan, np.arange(9.0)]], s)


def _region_maps(n: int = 24, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    gts, maps = [], []
    for i in range(n):
        g = np.zeros((60, 80), bool)
        if i % 3:
            y, x = rng.integers(5, 40), rng.integers(5, 60)
            g[y:y + rng.integers(2, 15), x:x + rng.integers(2, 15)] = True
            if i % 2:
                g[50:55, 3:9] = True  # a second region
        gts.append(g)
        maps.append(rng.normal(0, 1, g.shape).astype(np.float32) + g * rng.uniform(0.3, 2.0))
    return gts, maps


def test_pro_summary_gives_the_aupro_of_any_resample_of_the_images() -> None:
    from cmad.metrics import aupro_replicates, pro_summary, resample_weights

    gts, maps = _region_maps()
    summary = pro_summary(gts, maps, limit=0.3)
    once = np.ones((1, len(gts)))
    exact = aupro(gts, maps, 0.3)
    # 500 thresholds: the trapezoids between them cost almost nothing
    assert aupro_replicates(summary, once)[0] == pytest.approx(exact, abs=1e-4)
    # normal pixels counted on a sample of 1,000 per image (a fifth of these small maps)
    sampled = pro_summary(gts, maps, limit=0.3, per_image=1000)
    assert sampled.normal.tolist() == summary.normal.tolist()
    assert aupro_replicates(sampled, once)[0] == pytest.approx(exact, abs=3e-3)
    defective = np.array([g.any() for g in gts])
    w = resample_weights(defective, 6, np.random.default_rng(2))
    # each replicate keeps as many defective and good images as the set has
    assert (w[:, defective].sum(1) == defective.sum()).all()
    assert (w[:, ~defective].sum(1) == (~defective).sum()).all()
    got = aupro_replicates(summary, w)
    for row, value in zip(w.astype(int), got):
        idx = np.repeat(np.arange(len(gts)), row)
        assert value == pytest.approx(aupro([gts[i] for i in idx], [maps[i] for i in idx], 0.3),
                                      abs=1e-3)
    assert len(set(np.round(got, 6))) > 1  # the replicates differ


def test_pro_summary_keeps_the_point_at_no_false_positive() -> None:
    """Maps with few distinct values (tied tops): the exact curve rises at FPR 0 by the
    part of each region above every normal pixel; the summary must keep that point."""
    from cmad.metrics import aupro_replicates, pro_summary

    rng = np.random.default_rng(0)
    for levels, full in ((4, False), (20, True)):
        gts, maps = [], []
        for i in range(12):
            g = np.zeros((40, 40), bool)
            if i % 2:
                y, x = rng.integers(0, 30, 2)
                g[y : y + 8, x : x + 8] = True
            if full and i == 1:
                g[:] = True  # an image that is all defect
            m = rng.random((40, 40)) + 0.8 * g
            gts.append(g)
            maps.append((np.round(m * levels) / levels).astype(np.float32))
        once = np.ones((1, len(gts)))
        for limit in (0.05, 0.3):
            exact = aupro(gts, maps, limit)
            got = aupro_replicates(pro_summary(gts, maps, limit=limit), once, limit)[0]
            assert got == pytest.approx(exact, abs=1e-4), (levels, limit)


def test_aupro_difference_pairs_the_draws() -> None:
    from cmad.metrics import aupro_difference, pro_summary

    gts, maps = _region_maps(seed=1)
    worse = [m + np.random.default_rng(9).normal(0, 1.5, m.shape).astype(np.float32)
             for m in maps]
    sa, sb = pro_summary(gts, maps), pro_summary(gts, worse)
    d = aupro_difference([sa], [sb], n_boot=200, seed=4)
    assert d["mean"] == pytest.approx(aupro(gts, maps, 0.3) - aupro(gts, worse, 0.3), abs=2e-3)
    assert 0 < d["low"] < d["mean"] < d["high"] and d["p_not_above"] == 0.0
    assert aupro_difference([sa], [sb], n_boot=200, seed=4) == d
    same = aupro_difference([sa, sa], [sa, sa], n_boot=50)
    assert same["mean"] == same["low"] == same["high"] == 0.0
    good = pro_summary([np.zeros((4, 4), bool)], [np.zeros((4, 4), np.float32)])
    assert math.isnan(aupro_difference([good], [good])["mean"])
    with pytest.raises(ValueError, match="same images"):
        aupro_difference([sa], [pro_summary(gts[:-1], maps[:-1])])
