"""The pass/fail decision: thresholds for a target false-positive rate, overrides,
`cmad calibrate`, predicted masks, scores.json, overlays and the bench's error rates."""
import hashlib
import json
import logging
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.stats import norm
from typer.testing import CliRunner

from cmad.cli import app
from cmad.errors import ConfigError
from cmad.model.decision import (
    MAX_ALPHA,
    Decision,
    fit_scores,
    fit_scores_n,
    heat,
    pixel_quantiles,
    pixel_value,
    score_quantile,
)

runner = CliRunner()
# one cheap branch: the decision does not depend on which branches make the map
FAST = "size: 64\nbranches: [rgb_bank]\nbank_min_entries: 16\n"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _maps(n=10, s=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.2, (n, s, s)).astype(np.float32), np.ones((n, s, s), bool)


# ------------------------------------------------------------------ the rule itself
def test_lognormal_threshold_matches_the_true_quantile():
    rng = np.random.default_rng(0)
    scores = np.exp(rng.normal(-0.3, 0.2, 4000))
    shift, loc, scale = fit_scores(scores)
    assert shift == 0.0 and abs(loc + 0.3) < 0.02 and abs(scale - 0.2) < 0.02
    true = math.exp(-0.3 + 2.3263 * 0.2)
    assert abs(score_quantile(shift, loc, scale, 0.01) / true - 1) < 0.03
    # on fresh normals from the same law about 1% exceed it
    fresh = np.exp(rng.normal(-0.3, 0.2, 200000))
    assert 0.007 < (fresh > score_quantile(shift, loc, scale, 0.01)).mean() < 0.013


def test_threshold_from_ten_normals_keeps_its_false_positive_rate():
    """With 10 normals the estimated spread is uncertain: the predictive (Student-t) rule
    keeps the target rate on average over draws of the normals; the normal quantile, which
    takes the spread as known, exceeds it (by about 2x at 1%)."""
    rng = np.random.default_rng(3)
    rates = {"t": [], "known": []}
    for _ in range(3000):
        ls = rng.normal(0.0, 1.0, 10)
        shift, loc, scale, n = fit_scores_n(np.exp(ls))
        assert shift == 0.0
        for key, k in (("t", n), ("known", 0)):
            t = score_quantile(shift, loc, scale, 0.01, k)
            rates[key].append(float(norm.sf(math.log(t))))   # true exceedance of N(0, 1)
    assert 0.008 < np.mean(rates["t"]) < 0.0125
    assert np.mean(rates["known"]) > 0.018


def test_threshold_is_robust_to_a_defective_part_among_the_normals():
    rng = np.random.default_rng(1)
    normals = np.exp(rng.normal(0.0, 0.15, 12))
    maps, areas = _maps(13)
    clean = Decision.from_normals(normals, maps[:12], areas[:12])
    dirty = Decision.from_normals(np.r_[normals, 25.0], maps, areas)
    assert abs(dirty.threshold / clean.threshold - 1) < 0.1  # the max would jump to 25
    assert clean.threshold > np.median(normals)
    assert (clean.n_fit, dirty.n_fit) == (12, 12)


@pytest.mark.parametrize("extra", [(25.0, 25.0), (25.0, 20.0), (3.0, 3.0), (25.0, 20.0, 15.0)])
def test_defective_parts_among_the_normals_do_not_hide_each_other(extra):
    """Two or three defective parts: tested one at a time with the others still in, each
    widened the spread enough to hide the first (round 10's rule: 1% thresholds of 39.3,
    34.7, 3.57 and 51.4 here, 1.34 without them)."""
    rng = np.random.default_rng(1)
    normals = np.exp(rng.normal(0.0, 0.15, 12))
    maps, areas = _maps(12 + len(extra))
    clean = Decision.from_normals(normals, maps[:12], areas[:12])
    dirty = Decision.from_normals(np.r_[normals, extra], maps, areas)
    assert abs(dirty.threshold / clean.threshold - 1) < 0.1
    assert dirty.n_fit == 12


def test_a_low_score_among_the_normals_stays_and_raises_the_threshold():
    normals = np.exp(np.random.default_rng(1).normal(0.0, 0.15, 12))
    maps, areas = _maps(13)
    clean = Decision.from_normals(normals, maps[:12], areas[:12])
    low = Decision.from_normals(np.r_[normals, 0.2], maps, areas)
    assert low.n_fit == 13 and low.threshold > clean.threshold


def test_at_most_a_quarter_of_the_normals_is_set_aside():
    normals = np.exp(np.random.default_rng(1).normal(0.0, 0.15, 12))
    assert fit_scores_n(np.r_[normals, [30.0] * 4])[3] == 12  # 4 of 16 go
    assert fit_scores_n(np.r_[normals, [30.0] * 5])[3] >= 17 - 17 // 4  # not 5 of 17
    assert fit_scores_n([1.0, 1.1, 50.0])[3] == 3  # a quarter of 3 is none


def test_a_model_saved_without_n_fit_keeps_the_normal_quantile():
    rng = np.random.default_rng(2)
    maps, areas = _maps()
    d = Decision.from_normals(np.exp(rng.normal(0, 0.2, 10)), maps, areas)
    old = {k: v for k, v in d.to_dict().items() if k != "n_fit"}
    loaded = Decision.from_dict(old)
    assert loaded.n_fit == 0
    z = score_quantile(loaded.shift, loaded.loc, loaded.scale, 0.05)
    assert loaded.with_fpr(0.05).threshold == pytest.approx(z)
    assert d.with_fpr(0.05).threshold > loaded.with_fpr(0.05).threshold  # t is wider


def test_overrides_round_trip_and_pixel_threshold():
    rng = np.random.default_rng(2)
    maps, areas = _maps()
    d = Decision.from_normals(np.exp(rng.normal(0, 0.2, 10)), maps, areas, fpr=0.01,
                              pixel_fpr=0.01)
    assert d.with_fpr(0.05).threshold < d.threshold < d.with_fpr(0.001).threshold
    assert d.with_fpr(0.01).threshold == pytest.approx(d.threshold)
    fixed = d.with_threshold(0.123)
    assert fixed.threshold == 0.123 and fixed.rule == "fixed" and fixed.target_fpr is None
    assert fixed.pixel_threshold <= 0.123  # never above the image threshold
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    # the pixel threshold leaves the target share of normal pixels above it
    frac = (maps[areas] > d.pixel_threshold).mean()
    assert 0.008 < frac < 0.012
    p5 = d.with_pixel_fpr(0.05)
    assert 0.045 < (maps[areas] > p5.pixel_threshold).mean() < 0.055
    for bad in (0.0, -1, 0.9, float("nan"), True):
        with pytest.raises(ConfigError, match="fpr"):
            d.with_fpr(bad)
    legacy = Decision.legacy(1.5)
    assert legacy.threshold == 1.5 and legacy.target_fpr is None
    with pytest.raises(ConfigError, match="calibrate"):
        legacy.with_fpr(0.05)


def test_pixel_quantiles_ignore_pixels_outside_the_image():
    maps, areas = _maps(4)
    areas[:, :, :8] = False
    maps[:, :, :8] = 100.0  # padding: must not count
    table = pixel_quantiles(maps, areas)
    inside = np.concatenate([m[a] for m, a in zip(maps, areas)])
    assert pixel_value(table, 0.01) == pytest.approx(np.quantile(inside, 0.99), rel=1e-6)
    values = [v for _, v in sorted(table)]
    assert values == sorted(values, reverse=True)  # lower rate, higher value


def test_mask_is_empty_for_a_part_judged_normal():
    d = Decision(threshold=1.0, pixel_threshold=0.6)
    amap = np.zeros((20, 20), np.float32)
    amap[5:9, 5:9] = 0.9
    assert not d.mask(amap, float(amap.max())).any()  # score 0.9 <= 1: normal
    amap[6, 6] = 1.2
    m = d.mask(amap, float(amap.max()))
    assert m.sum() == 16 and m[5:9, 5:9].all()
    # a map below the pixel threshold (another fusion than the score): the peak is kept
    low = np.full((20, 20), 0.1, np.float32)
    low[3, 4] = 0.5
    m = d.mask(low, 1.5)
    assert m.sum() == 1 and m[3, 4]


def test_heat_colours_nothing_below_half_the_threshold():
    amap = np.array([[0.1, 0.49, 0.75, 1.0, 2.0]])
    c, alpha = heat(amap, 1.0)
    assert alpha[0, 0] == 0 and alpha[0, 1] == 0
    assert 0 < alpha[0, 2] < MAX_ALPHA and alpha[0, 3] == pytest.approx(MAX_ALPHA)
    assert c[0, 3] == pytest.approx(0.5) and c[0, 4] == 1.0


# ------------------------------------------------------------------ overlays
def test_overlay_has_outline_legend_and_no_colour_on_a_good_part():
    from matplotlib import colormaps

    from cmad.predict_io import OUTLINE, outline, overlay, overlay_scale

    rng = np.random.default_rng(3)
    rgb = rng.integers(60, 200, (48, 64, 3)).astype(np.uint8)
    d = Decision(threshold=1.0, pixel_threshold=0.7, target_fpr=0.01)
    k = overlay_scale(64)
    assert k * 64 >= 480
    good = np.full((48, 64), 0.3, np.float32)
    img = overlay(rgb, good, d, 0.3)
    h = 48 * k
    assert img.shape[1] == 64 * k and img.shape[0] > h  # the legend strip under the image
    np.testing.assert_array_equal(img[:h], np.repeat(np.repeat(rgb, k, 0), k, 1))
    strip = img[h:].reshape(-1, 3).astype(int)
    # the colour bar: inferno's middle colour is in the strip; dark text is there too
    mid = (np.array(colormaps["inferno"](0.5)[:3]) * 255).astype(int)
    assert (np.abs(strip - mid).sum(1) < 30).any()
    assert (strip.sum(1) < 150).any()
    # a defect: its mask outlined in OUTLINE, the part far from it untouched
    bad = good.copy()
    bad[10:30, 20:40] = 1.4
    img = overlay(rgb, bad, d, 1.4)
    edge = outline(np.repeat(np.repeat(d.mask(bad, 1.4), k, 0), k, 1), width=k // 2 + 1)
    assert edge.any() and (img[:h][edge] == OUTLINE).all()
    np.testing.assert_array_equal(img[:h][-k:, :k], np.repeat(np.repeat(rgb, k, 0), k, 1)[-k:, :k])
    # the verdict line differs between the two (red ANOMALOUS vs green normal)
    red = np.array([0xC6, 0x28, 0x28])
    assert (np.abs(img[h:].reshape(-1, 3).astype(int) - red).sum(1) < 40).any()
    assert not (np.abs(strip - red).sum(1) < 40).any()


# ------------------------------------------------------------------ end to end on tiny data
@pytest.fixture(scope="module")
def fitted(tiny_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("decide")
    (d / "cfg.yaml").write_text(FAST)
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    r = _run("fit", "--data", tiny_root, "--category", cat, "--out", d / "m", "--config",
             d / "cfg.yaml", "--cache", d / "cache", "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    return SimpleNamespace(root=tiny_root, cat=cat, model=d / "m", dir=d)


def _meta(model):
    return json.loads((model / "config.json").read_text())


def _digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_the_stored_threshold_comes_from_validation_data_only(fitted, tmp_path):
    from cmad.data import open_dataset
    from cmad.model.config import DetectorConfig
    from cmad.pipeline import Detector

    meta = _meta(fitted.model)
    d = meta["decision"]
    assert meta["format_version"] == 4 and d["rule"] == "lognormal"
    assert d["target_fpr"] == 0.01 and d["threshold"] == meta["threshold"]
    assert d["pixel_threshold"] <= d["threshold"] and d["n_normals"] >= 2
    # the same fit on a copy whose test images are all replaced gives the same decision
    copy = tmp_path / "data"
    shutil.copytree(fitted.root / fitted.cat, copy / fitted.cat)
    other = next((copy / fitted.cat / "train" / "good" / "rgb").glob("*.png")).read_bytes()
    for f in (copy / fitted.cat / "test").glob("*/rgb/*.png"):
        f.write_bytes(other)
    cfg = DetectorConfig.from_file(fitted.dir / "cfg.yaml")
    det = Detector(cfg, cache_dir=tmp_path / "cache").fit(
        open_dataset(copy).category(fitted.cat), progress=False)
    assert det.decision.to_dict() == d


def test_predict_writes_masks_and_scores_and_overrides_change_verdicts(fitted, tmp_path):
    good = fitted.root / fitted.cat / "test" / "good"
    src = fitted.root / fitted.cat / "test"
    before = _digests(src)
    r = _run("predict", "--model", fitted.model, "--input", good, "--out", tmp_path / "a",
             "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "a" / "scores.json").read_text())
    t = _meta(fitted.model)["decision"]["threshold"]
    assert res["threshold"] == t and res["decision"]["target_fpr"] == 0.01
    for row in res["samples"]:
        for k in ("stem", "score", "verdict", "threshold", "pixel_threshold", "defect_area_px"):
            assert k in row
        assert row["verdict"] == ("anomalous" if row["score"] > t else "normal")
        assert row["anomalous"] == (row["score"] > t)
    # --threshold below every score: all anomalous, each mask the pixels above the pixel
    # threshold, at the original size, its area in scores.json
    r = _run("predict", "--model", fitted.model, "--input", good, "--out", tmp_path / "b",
             "--threshold", -100, "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert all(row["verdict"] == "anomalous" for row in res["samples"])
    for row in res["samples"]:
        amap = tifffile.imread(tmp_path / "b" / row["map"])
        mask = np.asarray(Image.open(tmp_path / "b" / row["mask"])) > 0
        w, h = Image.open(good / "rgb" / f"{row['stem']}.png").size
        assert mask.shape == amap.shape == (h, w)
        np.testing.assert_array_equal(mask, amap > row["pixel_threshold"])
        assert row["defect_area_px"] == int(mask.sum())
        assert row["pixel_threshold"] <= -100
    # --threshold above every score: none anomalous, empty masks
    r = _run("predict", "--model", fitted.model, "--input", good, "--out", tmp_path / "c",
             "--threshold", 1e6, "--threads", 1, "--quiet")
    res = json.loads((tmp_path / "c" / "scores.json").read_text())
    assert all(row["verdict"] == "normal" and row["defect_area_px"] == 0
               for row in res["samples"])
    assert not any(np.asarray(Image.open(p)).any() for p in (tmp_path / "c" / "masks").glob("*"))
    # --fpr: a higher target rate, a lower threshold
    ts = {}
    for f in (0.001, 0.3):
        r = _run("predict", "--model", fitted.model, "--input", good, "--out", tmp_path / f"f{f}",
                 "--fpr", f, "--threads", 1, "--quiet")
        assert r.exit_code == 0, r.output
        ts[f] = json.loads((tmp_path / f"f{f}" / "scores.json").read_text())["threshold"]
    assert ts[0.3] < t < ts[0.001]
    for bad in (("--fpr", 0), ("--fpr", 0.2, "--threshold", 1)):
        r = _run("predict", "--model", fitted.model, "--input", good, "--out", tmp_path / "x",
                 *bad, "--quiet")
        assert r.exit_code == 2 and "error: --" in r.output
    assert _digests(src) == before


def test_calibrate_rewrites_only_the_decision(fitted, tmp_path):
    from cmad.pipeline import Detector

    model = tmp_path / "m"
    shutil.copytree(fitted.model, model)
    data = fitted.root / fitted.cat / "test" / "good"
    before_data, before_model = _digests(fitted.root), _digests(fitted.model)
    r = _run("calibrate", "--model", model, "--data", data, "--fpr", 0.2, "--pixel-fpr", 0.05,
             "--out", tmp_path / "m2", "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    old, new = _meta(model), _meta(tmp_path / "m2")
    assert new["decision"]["target_fpr"] == 0.2 and new["decision"]["pixel_target_fpr"] == 0.05
    assert new["decision"]["threshold"] != old["decision"]["threshold"]
    assert new["decision"]["source"].startswith("calibrate")
    n = len(list((data / "rgb").glob("*.png")))
    assert new["decision"]["n_normals"] == n
    strip = ("decision", "threshold")
    assert {k: v for k, v in new.items() if k not in strip} == \
        {k: v for k, v in old.items() if k not in strip}  # same tensors, norm, weights
    a, b = Detector.load(model), Detector.load(tmp_path / "m2")
    from cmad.data import open_dataset

    test = open_dataset(fitted.root).category(fitted.cat).samples("test")
    np.testing.assert_array_equal([p.score for p in a.predict(test)],
                                  [p.score for p in b.predict(test)])
    # the threshold is the model's rule applied to these normals' scores
    scores = [p.score for p in a.predict([s for s in test if s.label == 0])]
    shift, loc, scale, n = fit_scores_n(scores)
    assert new["decision"]["n_fit"] == n
    assert new["decision"]["threshold"] == pytest.approx(
        score_quantile(shift, loc, scale, 0.2, n))
    # in place on a dataset root's validation split; user data untouched
    r = _run("calibrate", "--model", model, "--data", fitted.root, "--category", fitted.cat,
             "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert _meta(model)["decision"]["target_fpr"] == 0.01  # kept the model's target
    assert _digests(fitted.root) == before_data and _digests(fitted.model) == before_model
    r = _run("calibrate", "--model", model, "--data", fitted.root, "--quiet")
    assert r.exit_code == 2 and "--category" in r.output


def test_a_format_3_model_still_loads_and_calibrate_upgrades_it(fitted, tmp_path):
    from cmad.pipeline import Detector

    model = tmp_path / "m"
    shutil.copytree(fitted.model, model)
    meta = _meta(model)
    meta["format_version"] = 3
    meta.pop("decision")
    for k in ("fpr", "pixel_fpr"):
        meta["config"].pop(k)
    meta["threshold"] = 0.5
    (model / "config.json").write_text(json.dumps(meta))
    det = Detector.load(model)
    assert det.threshold == 0.5 and det.decision.rule == "max-validation"
    good = fitted.root / fitted.cat / "test" / "good"
    r = _run("predict", "--model", model, "--input", good, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["threshold"] == 0.5
    r = _run("predict", "--model", model, "--input", good, "--out", tmp_path / "o", "--fpr",
             0.05, "--quiet")
    assert r.exit_code == 2 and "calibrate" in r.output
    r = _run("calibrate", "--model", model, "--data", good, "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert _meta(model)["format_version"] == 4
    assert Detector.load(model).decision.rule == "lognormal"


# ------------------------------------------------------------------ the bench's error rates
def test_bench_decision_rates_and_table():
    from cmad.bench import _mean_decision
    from cmad.evaluate import decision_rates
    from cmad.report.tables import decision_table, headline_table, summary_text, targets_table

    d = Decision(threshold=1.0, pixel_threshold=0.5, target_fpr=0.01)
    amap = np.zeros((4, 4), np.float32)

    def pred(score, label):
        m = amap.copy()
        m[0, 0] = score
        return SimpleNamespace(score=score, label=label, anomaly_map=m)

    preds = [pred(0.5, 0), pred(1.5, 0), pred(0.2, 0), pred(0.9, 0),
             pred(2.0, 1), pred(0.8, 1), pred(3.0, 1)]
    gts = [np.zeros((4, 4), bool)] * 4 + [np.eye(4, dtype=bool)] * 3
    r = decision_rates(d, preds, gts)
    assert r["fpr"] == 0.25 and r["fnr"] == pytest.approx(1 / 3)
    assert r["n_good"] == 4 and r["n_defective"] == 3 and r["threshold"] == 1.0
    assert r["pixel_tpr"] == pytest.approx(2 / 12)  # two flagged parts, one gt pixel each hit
    # no good part of 4 may be flagged at 10%: above 1.5, two of the three defective parts
    assert r["tpr_at_fpr10"] == pytest.approx(2 / 3)
    results = {"methods": {"cmad": {"categories": {"a": {}}, "mean": {},
                                    "decision": {"a": r, "b": dict(r, fpr=0.75)}}}}
    results["methods"]["cmad"]["decision_mean"] = _mean_decision(
        results["methods"]["cmad"]["decision"])
    assert results["methods"]["cmad"]["decision_mean"]["fpr"] == 0.5
    t = decision_table(results)
    assert t.cells[0][:4] == ["cmad", "1%", "50%", "33%"] and t.cells[0][4] == "25% / 33%"
    assert t.header[-1].startswith("best TPR") and t.cells[0][-1] == "67%"
    assert "50% / 33%" in headline_table(results).cells[0]
    lines = summary_text(results).splitlines()
    assert lines[0].split()[-2:] == ["FPR@thr", "FNR@thr"] and lines[1].split()[-2:] == ["50%", "33%"]
    assert "target_0.01_fpr" not in r  # no stored distribution: no rates at other targets
    assert targets_table(results) is None


def test_bench_rates_at_target_rates_follow_the_rule():
    """The bench applies the model's rule at 1%, 5% and 10% and reports the test split's
    rates there; the report's targets table shows their means."""
    from cmad.bench import _mean_decision
    from cmad.evaluate import TARGET_RATES, decision_rates, target_key
    from cmad.report.tables import targets_table

    rng = np.random.default_rng(5)
    maps, areas = _maps()
    d = Decision.from_normals(np.exp(rng.normal(0.0, 0.3, 10)), maps, areas)
    good = np.exp(rng.normal(0.0, 0.3, 200))
    bad = np.exp(rng.normal(0.8, 0.3, 100))
    preds = [SimpleNamespace(score=float(x), label=int(i >= 200),
                             anomaly_map=np.full((4, 4), x, np.float32))
             for i, x in enumerate(np.r_[good, bad])]
    r = decision_rates(d, preds, [np.zeros((4, 4), bool)] * 300)
    for rate in TARGET_RATES:
        t = d.with_fpr(rate).threshold
        assert r[target_key(rate, "fpr")] == pytest.approx((good > t).mean())
        assert r[target_key(rate, "tpr")] == pytest.approx((bad > t).mean())
    # a higher target flags more of both
    fprs = [r[target_key(x, "fpr")] for x in TARGET_RATES]
    tprs = [r[target_key(x, "tpr")] for x in TARGET_RATES]
    assert fprs == sorted(fprs) and tprs == sorted(tprs) and tprs[-1] > tprs[0]
    results = {"methods": {"cmad": {"decision": {"a": r}, "decision_mean": _mean_decision({"a": r})}}}
    t = targets_table(results)
    assert t.header[1] == "target 1%: FPR / TPR" and len(t.cells[0]) == 1 + len(TARGET_RATES)
    assert t.cells[0][3] == (f"{100 * fprs[2]:.0f}% / {100 * tprs[2]:.0f}%")


def test_report_panel_shows_threshold_verdict_and_mask_outline():
    import io

    from cmad.report.figures import render_panel

    rng = np.random.default_rng(4)
    s = 64
    yy, xx = np.mgrid[0:s, 0:s]
    fused = (0.2 + 0.8 * np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 50)).astype(np.float32)
    panel = {"category": "c", "defect_type": "hole", "stem": "000", "score": float(fused.max()),
             "label": 1, "rgb": rng.integers(80, 160, (s, s, 3)).astype(np.uint8),
             "depth": rng.normal(0.5, 0.01, (s, s)), "gt": (yy - 20) ** 2 + (xx - 40) ** 2 < 16,
             "maps": {"cross-modal": fused, "rgb-bank": fused, "3d-bank": fused,
                      "fused": fused}}

    def pixels(p):
        return np.asarray(Image.open(io.BytesIO(render_panel(p))).convert("RGB")).astype(int)

    cyan = np.array([0x00, 0xE6, 0xFF])
    red = np.array([0xC6, 0x28, 0x28])
    plain = pixels(panel)
    decided = pixels(dict(panel, threshold=0.7, pixel_threshold=0.5))
    w = decided.shape[1]
    fused_part = decided[:, int(0.85 * w):]
    assert (np.abs(fused_part - cyan).sum(-1) < 60).sum() > 20  # the mask outline
    assert (np.abs(fused_part - red).sum(-1) < 40).sum() > 20  # ANOMALOUS in red
    assert (np.abs(plain[:, int(0.85 * w):] - cyan).sum(-1) < 60).sum() == 0


def test_best_tpr_is_a_point_of_the_roc():
    from cmad.evaluate import best_tpr

    good = np.arange(20, dtype=float)          # 0..19
    bad = np.array([17.0, 18.0, 18.5, 30.0])
    # 10% of 20 good parts: the two highest (18, 19) may be flagged, 17 may not
    assert best_tpr(good, bad, 0.10) == pytest.approx(3 / 4)   # 18, 18.5, 30 > 17
    assert best_tpr(good, bad, 0.0) == pytest.approx(1 / 4)    # only 30 > 19
    assert best_tpr(good, bad, 1.0) == 1.0
    assert np.isnan(best_tpr(good[:0], bad, 0.1)) and np.isnan(best_tpr(good, bad[:0], 0.1))
    # brute force over every threshold agrees
    rng = np.random.default_rng(0)
    g, b = rng.normal(0, 1, 37), rng.normal(1, 1, 23)
    brute = max((b >= t).mean() for t in np.r_[g, b, np.inf] if (g >= t).mean() <= 0.1)
    assert best_tpr(g, b, 0.1) == pytest.approx(brute)


def test_calibrate_checks_rates_first_and_warns_of_another_category(fitted, tmp_path, caplog):
    model = tmp_path / "m"
    shutil.copytree(fitted.model, model)
    before = _digests(model)
    for bad, says in ((("--fpr", 2), "--fpr must be a rate in (0, 0.5] (0.01 = 1% of normal parts)"),
                      (("--pixel-fpr", 0), "--pixel-fpr must be a rate in (0, 0.5] (0.01 = 1% of "
                                           "normal pixels)")):
        # refused before the model is even read: a folder that is not one would fail later
        r = _run("calibrate", "--model", tmp_path / "nonesuch", "--data", fitted.root,
                 "--category", fitted.cat, *bad)
        assert r.exit_code == 2 and says in r.output, r.output
    others = sorted(p.name for p in fitted.root.iterdir() if p.is_dir() and p.name != fitted.cat)
    assert others, "the tiny dataset has a second category"
    with caplog.at_level(logging.WARNING, logger="cmad"):
        r = _run("calibrate", "--model", model, "--data", fitted.root, "--category", others[0],
                 "--out", tmp_path / "m2", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert f"fitted on category '{fitted.cat}', not on '{others[0]}'" in caplog.text, caplog.text
    assert _digests(model) == before
