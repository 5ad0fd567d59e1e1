"""`cmad bench --scale`: the cost curve's rows, files and errors (tiny data)."""
import json

import pytest

from cmad.costcurve import exponent, parse_counts, run_cost_curve, table_md
from cmad.errors import ConfigError


def test_parse_counts():
    assert parse_counts("50, 25,100,25") == [25, 50, 100]
    for bad in ("", "a,b", "0,5", "-3"):
        with pytest.raises(ConfigError, match="--scale"):
            parse_counts(bad)


def test_exponent_recovers_a_power_law():
    ns = [25, 50, 100, 200, 400]
    assert exponent(ns, [3.0 * n ** 1.3 for n in ns]) == pytest.approx(1.3)
    assert exponent([10], [1.0]) != exponent([10], [1.0])  # nan with one point


def test_one_size_shows_no_exponent_instead_of_nan():
    row = {"n_train": 250, "fit_s": 37.1, "method_fit_s": 19.8, "bank_entries": 10935,
           "model_bytes": 1_090_000, "peak_rss_mb": 3436.0, "fit_rss_growth_mb": 887.0,
           "infer_ms_per_sample": 87.1}
    one = {"category": "gland", "size": 288, "machine": {"threads": 2},
           "load_average": {"before": [0.7], "after": [1.3]},
           "methods": {"cmad": {"rows": [row], "fit_exponent": exponent([250], [37.1]),
                                "method_fit_exponent": exponent([250], [19.8])}}}
    text = table_md(one)
    assert "nan" not in text and "| cmad | n/a | n/a |" in text and "at least two" in text
    two = {**one, "methods": {"cmad": {"rows": [row, row], "fit_exponent": 0.91,
                                       "method_fit_exponent": 0.96}}}
    assert "| cmad | 0.91 | 0.96 |" in table_md(two) and "at least two" not in table_md(two)


def test_cost_curve_rows_and_files(tiny_root, tmp_path):
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    res = run_cost_curve(tiny_root, tmp_path / "cc", cat, ["rgb-bank"], [1, 2], threads=1,
                         n_test=2, progress=False)
    rows = res["methods"]["rgb-bank"]["rows"]
    assert [r["n_train"] for r in rows] == [1, 2]
    for r in rows:
        assert r["fit_s"] >= r["method_fit_s"] > 0
        assert r["bank_entries"] > 0 and r["model_bytes"] > 0 and r["infer_ms_per_sample"] > 0
    # the feature part of the fit grows with the number of samples
    assert rows[1]["feature_s"] == pytest.approx(2 * rows[0]["feature_s"])
    on_disk = json.loads((tmp_path / "cc" / "results.json").read_text())
    assert on_disk["methods"]["rgb-bank"]["rows"][1]["n_train"] == 2
    assert (tmp_path / "cc" / "cost_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rgb-bank | 2 |" in (tmp_path / "cc" / "cost_curve.md").read_text()
    with pytest.raises(ConfigError, match="not empty"):
        run_cost_curve(tiny_root, tmp_path / "cc", cat, ["rgb-bank"], [1], progress=False)
    with pytest.raises(ConfigError, match="training samples asked for"):
        run_cost_curve(tiny_root, tmp_path / "cc2", cat, ["rgb-bank"], [10_000], progress=False)


def test_cost_curve_takes_a_base_config_and_records_it(tiny_root, tmp_path):
    """`bench --scale --config/--precision`: the base reaches every method and results.json."""
    from cmad.model.config import DetectorConfig

    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    base = DetectorConfig().with_overrides({"rgb": {"precision": "bfloat16"}, "bank_fraction": 0.5})
    res = run_cost_curve(tiny_root, tmp_path / "cc", cat, ["rgb-bank"], [2], threads=1,
                         n_test=2, progress=False, base=base)
    assert res["config"]["rgb"]["precision"] == "bfloat16"
    plain = run_cost_curve(tiny_root, tmp_path / "cc2", cat, ["rgb-bank"], [2], threads=1,
                           n_test=2, progress=False)
    assert "precision" not in plain["config"]["rgb"]  # float32, the default, is not written
    # the base's bank fraction (50% against 1%) reached the fitted bank
    assert (res["methods"]["rgb-bank"]["rows"][0]["bank_entries"]
            > plain["methods"]["rgb-bank"]["rows"][0]["bank_entries"])
