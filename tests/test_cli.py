"""The command line end to end on tiny data: info, synth, fit, evaluate, predict, bench."""
import json
import re

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from cmad.cli import app

runner = CliRunner()
FAST = "size: 64\nbank_min_entries: 16\nalign:\n  epochs: 3\n  hidden: 32\n"


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_info_json_on_mvtec_shaped_tree(mvtec_like_root):
    r = _run("info", "--data", mvtec_like_root, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    cat = info["categories"]["tire_like"]
    assert cat["splits"] == {"train": 2, "validation": 1, "test": 4}
    assert cat["modalities"] == ["rgb", "xyz"]
    assert cat["image_sizes"] == [[600, 800]]
    assert cat["problems"] == []


def test_info_reports_missing_folder_as_error(tmp_path):
    r = _run("info", "--data", tmp_path / "nope")
    assert r.exit_code == 2
    assert "nope" in r.output


def test_synth_then_info_has_no_problems(tmp_path):
    out = tmp_path / "syn"
    r = _run("synth", "--out", out, "--preset", "tiny", "--categories", "1", "--quiet")
    assert r.exit_code == 0, r.output
    info = json.loads(_run("info", "--data", out, "--json").stdout)
    assert len(info["categories"]) == 1
    assert all(not c["problems"] for c in info["categories"].values())


@pytest.fixture(scope="module")
def model_dir(tiny_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    cfg = d / "cfg.yaml"
    cfg.write_text(FAST)
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    r = _run("fit", "--data", tiny_root, "--category", cat, "--out", d / "m", "--config", cfg,
             "--quiet")
    assert r.exit_code == 0, r.output
    return d / "m", cat


def test_evaluate_json_and_official_maps(model_dir, tiny_root, tmp_path):
    m, cat = model_dir
    r = _run("evaluate", "--model", m, "--data", tiny_root, "--category", cat, "--json",
             "--maps", tmp_path / "maps")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    for k in ("category", "n_test", "I-AUROC", "P-AUROC", "AUPRO@30%", "AUPRO@10%",
              "AUPRO@5%", "AUPRO@1%"):
        assert k in res
    dec = res["decision"]  # the stored threshold on the test split
    assert dec["n_good"] + dec["n_defective"] == res["n_test"] and 0 <= dec["fpr"] <= 1
    tiffs = sorted((tmp_path / "maps" / cat / "test").glob("*/*.tiff"))
    assert len(tiffs) == res["n_test"]
    rgb = next((tiny_root / cat / "test").glob("*/rgb/000.png"))
    from PIL import Image

    w, h = Image.open(rgb).size
    arr = tifffile.imread(tiffs[0])
    assert arr.dtype == np.float32 and arr.shape == (h, w)


def test_predict_single_pair_and_folder(model_dir, tiny_root, tmp_path):
    m, cat = model_dir
    folder = tiny_root / cat / "test" / "good"
    r = _run("predict", "--model", m, "--rgb", folder / "rgb" / "000.png",
             "--xyz", folder / "xyz" / "000.tiff", "--out", tmp_path / "one", "--quiet")
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "one" / "scores.json").read_text())
    assert len(scores["samples"]) == 1
    assert (tmp_path / "one" / "overlays" / "000.png").exists()
    r = _run("predict", "--model", m, "--input", folder, "--out", tmp_path / "many", "--quiet")
    assert r.exit_code == 0, r.output
    n = len(list((folder / "rgb").glob("*.png")))
    assert len(list((tmp_path / "many" / "maps").glob("*.tiff"))) == n


def test_predict_mispaired_input_names_the_file(model_dir, tiny_root, tmp_path):
    m, cat = model_dir
    src = tiny_root / cat / "test" / "good"
    bad = tmp_path / "bad"
    (bad / "rgb").mkdir(parents=True)
    (bad / "xyz").mkdir()
    (bad / "rgb" / "000.png").write_bytes((src / "rgb" / "000.png").read_bytes())
    (bad / "xyz" / "001.tiff").write_bytes((src / "xyz" / "000.tiff").read_bytes())
    r = _run("predict", "--model", m, "--input", bad, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2
    assert "001" in r.output or "000" in r.output


def test_load_of_foreign_directory_is_clear_error(tmp_path, tiny_root):
    r = _run("evaluate", "--model", tmp_path, "--data", tiny_root, "--category", "gland")
    assert r.exit_code == 2
    assert "not a cmad model directory" in r.output


def test_bench_on_mvtec_shaped_fixture(mvtec_like_root, tmp_path):
    """Issue 5: the same bench command runs on an MVTec 3D-AD shaped tree."""
    out = tmp_path / "report"
    r = _run("bench", "--data", mvtec_like_root, "--out", out, "--size", 224,
             "--methods", "cmad,rgb-bank,xyz-bank,btf", "--cache", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    for m in ("cmad", "rgb-bank", "xyz-bank", "btf"):
        row = res["methods"][m]
        assert set(row["categories"]["tire_like"]) >= {"I-AUROC", "P-AUROC", "AUPRO@30%",
                                                       "AUPRO@1%"}
        for k in ("fit_s", "infer_ms_per_sample", "stages_ms", "model_bytes", "bank_entries",
                  "bank_bytes", "peak_rss_mb"):
            assert k in row
        assert row["model_bytes"] > 0
        # the stored threshold's error rates on the test split
        dec = row["decision"]["tire_like"]
        assert 0 <= dec["fpr"] <= 1 and 0 <= dec["fnr"] <= 1 and dec["target_fpr"] == 0.01
        assert set(row["decision_mean"]) >= {"fpr", "fnr"}
    assert 0 < res["methods"]["cmad"]["bank_bytes"] < res["methods"]["cmad"]["model_bytes"]
    # cmad against each other method on the same test parts
    comp = res["comparison"]
    assert comp["reference"] == "cmad" and set(comp["methods"]) == {"rgb-bank", "xyz-bank", "btf"}
    labels = res["test_labels"]["tire_like"]
    assert len(res["methods"]["btf"]["test_scores"]["tire_like"]) == len(labels)
    for m, row in comp["methods"].items():
        for k in ("I-AUROC", "AUPRO@30%"):
            gap = (res["methods"]["cmad"]["categories"]["tire_like"][k]
                   - res["methods"][m]["categories"]["tire_like"][k])
            d = row[k]
            assert d["mean"] == pytest.approx(gap, abs=1e-12) and d["low"] <= d["high"]
    assert all("pro_summary" not in json.dumps(e) for e in res["methods"].values())
    assert (out / "tables" / "comparison.csv").exists()
    assert "cmad - btf:" in r.output
    assert res["config"]["size"] == 224 and res["config"]["seed"] == 0  # as run
    assert (out / "index.html").exists()
    assert (out / "tables" / "i-auroc.md").exists()
    assert (out / "tables" / "decision.csv").exists()
    # each run writes a new folder: a second run into the same one is refused
    # (through the old name of --size, still accepted with a warning)
    r2 = _run("bench", "--data", mvtec_like_root, "--out", out, "--resolution", 64, "--quiet")
    assert r2.exit_code == 2
    assert "--resolution is deprecated; use --size" in r2.output


def test_bench_on_rgb_only_category_skips_3d_methods(tmp_path):
    from fixture_mvtec import make_mvtec_like_tree

    make_mvtec_like_tree(tmp_path / "data", size=(120, 160), modalities=("rgb",), n_train=3,
                         n_validation=2)
    out = tmp_path / "report"
    r = _run("bench", "--data", tmp_path / "data", "--out", out, "--size", 64,
             "--methods", "cmad,rgb-bank,xyz-bank", "--cache", tmp_path / "cache", "--quiet",
             "--stream")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["rgb-bank"]["categories"]["tire_like"]["I-AUROC"] is not None
    # --stream: each method that ran, end to end over every test file
    n_test = len(list((tmp_path / "data" / "tire_like" / "test").rglob("rgb/*.png")))
    for m in ("cmad", "rgb-bank"):
        st = res["methods"][m]["stream"]
        assert st["n"] == n_test > 0 and st["samples_per_s"] > 0
        assert abs(st["samples_per_s"] * st["ms_per_sample"] - 1000.0) < 1e-6
    assert "stream" not in res["methods"]["xyz-bank"]
    table = (out / "tables" / "throughput.csv").read_text().splitlines()
    assert table[0].startswith("method,samples_per_s") and len(table) == 3
    assert "samples/s end to end, streamed" in r.output
    # cmad runs the branch the data allows (its RGB bank); the 3D bank cannot run at all
    assert res["methods"]["cmad"]["weights"]["tire_like"] == {"rgb_bank": 1.0}
    assert res["methods"]["xyz-bank"]["categories"]["tire_like"]["I-AUROC"] is None  # NaN -> null


def test_features_json_says_where_it_was_timed(tiny_root):
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    r = _run("features", "--data", tiny_root, "--category", cat, "--limit", 2, "--size", 64,
             "--threads", 1, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n"] == 2 and res["size"] == 64
    assert isinstance(res["cpu_model"], str) and res["cpu_model"]
    assert res["cpu_count"] >= 1
    for k in ("load_average_start", "load_average_end"):
        assert res[k] is None or (len(res[k]) == 3 and all(x >= 0 for x in res[k]))


def test_demo_runs_and_says_how_long_it_took(tmp_path):
    out = tmp_path / "demo"
    r = _run("demo", "--out", out, "--preset", "tiny", "--categories", 1, "--methods", "cmad,btf",
             "--threads", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert re.search(r"demo took \d+:\d\d\.\d \(min:s\) on \d+ CPUs, 1 threads; load average",
                     r.output)
    assert "cmad vs btf" in r.output
    # one data folder per preset and seed; the `report` link points at the new report
    from cmad.synth import CATEGORY_NAMES

    made = [p.name for p in (out / "data-tiny-seed0").iterdir() if p.is_dir()]
    assert made == [CATEGORY_NAMES[0]]
    assert (out / "report").is_symlink() and (out / "report" / "index.html").is_file()
    assert (out / "report" / "details.html").is_file()


def test_fit_precision_reaches_the_model_and_a_bad_one_exits_2(tiny_root, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(FAST)
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    r = _run("fit", "--data", tiny_root, "--category", cat, "--out", tmp_path / "m", "--config",
             cfg, "--precision", "bfloat16", "--quiet")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["config"]["rgb"]["precision"] == "bfloat16"
    assert saved["config"]["size"] == 64  # the config file still applies
    r = _run("export", "--model", tmp_path / "m", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "refit with --precision float32" in r.output
    assert not (tmp_path / "m.onnx").exists()
    rgb = next((tiny_root / cat / "test").glob("*/rgb/000.png"))
    xyz = rgb.parent.parent / "xyz" / "000.tiff"
    r = _run("predict", "--model", tmp_path / "m", "--rgb", rgb, "--xyz", xyz, "--out",
             tmp_path / "p", "--runtime", "onnx", "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "use the torch runtime" in r.output, r.output
    assert "Traceback" not in r.output
    for cmd in (("fit", "--data", tiny_root, "--category", cat, "--out", tmp_path / "m2"),
                ("bench", "--data", tiny_root, "--out", tmp_path / "r")):
        r = _run(*cmd, "--precision", "half", "--quiet")
        assert r.exit_code == 2 and "--precision must be one of" in r.output, r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "m2").exists() and not (tmp_path / "r").exists()


def test_bench_config_and_precision_are_the_base_and_recorded_as_run(tmp_path):
    """bench --config/--precision reach the run (and the --scale cost curve); the file's size
    and seed apply unless --size/--seed are given; results.json records what ran."""
    from fixture_mvtec import make_mvtec_like_tree

    make_mvtec_like_tree(tmp_path / "data", size=(120, 160), modalities=("rgb",), n_train=3,
                         n_validation=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("size: 64\nseed: 3\nbank_fraction: 0.5\n")
    r = _run("bench", "--data", tmp_path / "data", "--out", tmp_path / "r", "--config", cfg,
             "--precision", "bfloat16", "--methods", "rgb-bank", "--cache", tmp_path / "c",
             "--quiet")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "r" / "results.json").read_text())["config"]
    assert (run["size"], run["seed"], run["bank_fraction"]) == (64, 3, 0.5)
    assert run["rgb"]["precision"] == "bfloat16"
    r = _run("bench", "--data", tmp_path / "data", "--out", tmp_path / "cc", "--config", cfg,
             "--precision", "bfloat16", "--methods", "rgb-bank", "--scale", "2", "--size", 96,
             "--quiet")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "cc" / "results.json").read_text())["config"]
    assert (run["size"], run["seed"], run["rgb"]["precision"]) == (96, 3, "bfloat16")
