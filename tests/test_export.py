"""Whole-model ONNX export: parity with the torch path, metadata, clear refusals, CLI."""
import json

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from cmad.cli import app  # noqa: E402
from cmad.data.mvtec3d import Dataset  # noqa: E402
from cmad.errors import ConfigError, ModelFormatError  # noqa: E402
from cmad.export import (  # noqa: E402
    ONNX_OPSET,
    OnnxDetector,
    export_onnx,
    load_predictor,
    read_metadata,
)
from cmad.model.branch import Branch  # noqa: E402
from cmad.model.branches import REGISTRY  # noqa: E402
from cmad.model.config import DetectorConfig  # noqa: E402
from cmad.pipeline import Detector  # noqa: E402

SIZE = 64
TOL = 1e-4
DEFAULT = DetectorConfig().branches
NEW = ("mapping", "joint_bank", "rgb_bank", "geom_bank")


def _cfg(branches):
    return DetectorConfig.from_dict(dict(
        size=SIZE, branches=list(branches), bank_min_entries=16,
        align={"epochs": 5, "hidden": 32}, mapping={"epochs": 3, "hidden": 32}))


@pytest.fixture(scope="module")
def data(tiny_root):
    ds = Dataset(tiny_root)
    cat = ds.category(ds.categories[0])
    # 20 samples: every split of the fitted category, then the other category's test split
    samples = [s for split in ("train", "validation", "test") for s in cat.samples(split)]
    samples += ds.category(ds.categories[1]).samples("test")
    assert len(samples) >= 20
    return cat, samples[:20]


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    """branches -> (loaded detector, model folder, exported file), each fitted once."""
    cat, _ = data
    cache = {}

    def get(branches):
        if branches not in cache:
            tmp = tmp_path_factory.mktemp("export")
            model = Detector(_cfg(branches)).fit(cat, progress=False).save(tmp / "model")
            det = Detector.load(model)
            cache[branches] = (det, model, export_onnx(det, tmp / "model.onnx"))
        return cache[branches]

    return get


@pytest.fixture(params=[DEFAULT, NEW], ids=["default", "mapping-geom"])
def exported(request, models):
    return models(request.param)


@pytest.fixture
def default_export(models):
    return models(DEFAULT)


def test_onnx_matches_torch_on_20_samples(exported, data):
    det, _, path = exported
    _, samples = data
    ref = det.predict(samples)
    got = OnnxDetector(path, threads=1).predict(samples)
    assert len(got) == len(ref) == 20
    for r, g in zip(ref, got):
        assert g.key == r.key
        assert abs(g.score - r.score) <= TOL * max(1.0, abs(r.score)), r.key
        assert g.anomaly_map_work.shape == r.anomaly_map_work.shape == (SIZE, SIZE)
        assert np.abs(g.anomaly_map_work - r.anomaly_map_work).max() <= TOL, r.key
        assert g.anomaly_map.shape == r.anomaly_map.shape
        assert np.abs(g.anomaly_map - r.anomaly_map).max() <= TOL, r.key
    # not a trivial pass: the scores vary over the samples far more than the tolerance
    assert np.ptp([r.score for r in ref]) > 100 * TOL


def test_metadata_names_the_model(exported):
    det, model, path = exported
    meta = read_metadata(path)
    saved = json.loads((model / "config.json").read_text())
    assert meta["onnx_opset"] == str(ONNX_OPSET)
    assert meta["cmad_version"] == saved["cmad_version"]
    assert meta["tensors_sha256"] == saved["tensors_sha256"]
    assert json.loads(meta["config"]) == saved["config"]
    assert json.loads(meta["branches"]) == list(det.branches)
    assert float(meta["threshold"]) == det.threshold
    names = [i["name"] for i in json.loads(meta["inputs"])]
    needs_fpfh = "xyz" in det.core.needs
    assert names[:4] == ["rgb", "xyz", "foreground", "image_box"]
    assert ("fpfh" in names) == needs_fpfh and ("fpfh_valid" in names) == needs_fpfh
    assert [o["name"] for o in json.loads(meta["outputs"])] == ["score", "anomaly_map"]
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == names
    assert all(i.doc_string for i in (*m.graph.input, *m.graph.output))
    assert any(o.version == ONNX_OPSET for o in m.opset_import if o.domain in ("", "ai.onnx"))
    # int4 banks stay packed in the file: uint8 codes, no decoded float copy of a bank
    inits = {t.name: t for t in m.graph.initializer}
    codes = [n for n in inits if n.endswith("search.codes")]
    assert codes and all(inits[n].data_type == onnx.TensorProto.UINT8 for n in codes)


class NoExport(Branch):
    """A toy branch without an export module."""

    name = "toy_noexport"
    display = "toy"
    needs = ("colour",)
    panel = "rgb-bank"

    def fit(self, train, val, progress=False):
        self.mean = train["colour"].mean(dim=(0, 2, 3))

    def score(self, fm):
        return (fm["colour"] - self.mean[None, :, None, None]).abs().sum(1), fm.image

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, tensors, meta):
        self.mean = tensors["mean"]


def test_a_branch_without_export_is_refused_clearly(monkeypatch, data, tmp_path):
    monkeypatch.setitem(REGISTRY, NoExport.name, NoExport)
    cat, _ = data
    det = Detector(DetectorConfig(size=SIZE, branches=("toy_noexport",))).fit(cat, progress=False)
    with pytest.raises(ConfigError, match="toy_noexport.*cannot be exported"):
        export_onnx(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_files_that_are_not_exports_are_refused(tmp_path, default_export):
    _, model, path = default_export
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelFormatError, match="not a readable ONNX file"):
        OnnxDetector(bad)
    with pytest.raises(ConfigError, match="--runtime onnx"):
        load_predictor(path, "torch")
    with pytest.raises(ConfigError, match="--runtime"):
        load_predictor(model, "tensorrt")


def test_cli_export_and_predict_runtime_onnx_match_torch(default_export, data, tmp_path):
    _, model, _ = default_export
    cat, _ = data
    folder = next(s.paths.rgb.parent.parent for s in cat.samples("test") if s.label == 0)
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", "--model", str(model), "--out", str(out), "--threads", "1",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "opset 17" in r.output
    res = {}
    for name, extra in (("torch", []), ("onnx", ["--runtime", "onnx"]),
                        ("folder", ["--runtime", "onnx", "--cache", str(tmp_path / "c")])):
        src = str(out) if name == "onnx" else str(model)
        r = runner.invoke(app, ["predict", "--model", src, "--input", str(folder), "--out",
                                str(tmp_path / name), "--threads", "1", "--quiet", *extra])
        assert r.exit_code == 0, r.output
        res[name] = json.loads((tmp_path / name / "scores.json").read_text())
    assert list((tmp_path / "c" / "onnx-model").glob("*.onnx"))
    for name in ("onnx", "folder"):
        assert res[name]["threshold"] == res["torch"]["threshold"]
        for a, b in zip(res["torch"]["samples"], res[name]["samples"]):
            assert a["stem"] == b["stem"] and a["anomalous"] == b["anomalous"]
            assert abs(a["score"] - b["score"]) <= TOL
            ma = tifffile.imread(tmp_path / "torch" / "maps" / f"{a['stem']}.tiff")
            mb = tifffile.imread(tmp_path / name / "maps" / f"{a['stem']}.tiff")
            assert ma.shape == mb.shape and np.abs(ma - mb).max() <= TOL
    r = runner.invoke(app, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "y.onnx")])
    assert r.exit_code == 2 and "error:" in r.output
    # an earlier export is replaced; a user's file is not
    r = runner.invoke(app, ["export", "--model", str(model), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"\x89PNG not an export")
    r = runner.invoke(app, ["export", "--model", str(model), "--out", str(mine), "--quiet"])
    assert r.exit_code == 2 and "not a cmad ONNX export; not overwritten" in r.output, r.output
    assert mine.read_bytes() == b"\x89PNG not an export"


def test_bench_times_both_runtimes_on_the_same_samples(default_export, data, tmp_path):
    from types import SimpleNamespace

    from cmad.bench import time_runtimes
    from cmad.report.tables import runtime_table

    det, _, _ = default_export
    _, samples = data
    cd = SimpleNamespace(modalities=det.modalities, test=det.prepare(samples[-3:]))
    rt = time_runtimes(det, cd, tmp_path)
    assert rt["n"] == 3 and rt["torch_ms"] > 0 and rt["onnx_ms"] > 0
    assert rt["max_score_diff"] <= TOL and rt["max_map_diff"] <= TOL
    assert rt["onnx_bytes"] == (tmp_path / "model.onnx").stat().st_size
    table = runtime_table({"methods": {"cmad": {"runtime": rt}, "other": {}}})
    assert [row[0] for row in table.cells] == ["cmad"]
    assert table.values[0][1] == rt["torch_ms"] and table.values[0][2] == rt["onnx_ms"]
    assert runtime_table({"methods": {"cmad": {}}}) is None


def test_feature_stages_in_torch_match_numpy_and_numba(data):
    """The graph's own versions of the rendering (every kind: the same uint8 image), the
    colour statistics, the geometric context and the image masks."""
    import torch

    from cmad.data.preprocess import PreprocessConfig, Preprocessor
    from cmad.features import colour_stats, geometry_context
    from cmad.features import graph as g
    from cmad.features.geometry import GeometryConfig, render_geometry

    _, samples = data
    prep = [Preprocessor(PreprocessConfig(size=SIZE))(s) for s in samples[:8]]
    xyz = torch.from_numpy(np.stack([p.xyz for p in prep]))
    fg = torch.from_numpy(np.stack([p.foreground for p in prep]))
    rgb = torch.from_numpy(np.stack([p.rgb for p in prep]))
    for kind in ("shading", "normals", "curvature", "shading_curvature"):
        cfg = GeometryConfig(kind=kind)
        ref = np.stack([render_geometry(p.xyz, p.foreground, cfg) for p in prep])
        assert ref.std() > 0
        assert np.array_equal(g.render_geometry(xyz, fg, cfg).numpy(), ref), kind
    grid = (SIZE // 8, SIZE // 8)
    ctx = np.stack([geometry_context(p.xyz, p.foreground, grid) for p in prep])
    assert np.abs(ctx).max() > 1.0
    assert np.allclose(g.geometry_context(xyz, fg, grid).numpy(), ctx, rtol=1e-5, atol=1e-5)
    col = np.stack([colour_stats(p.rgb, grid) for p in prep])
    assert np.allclose(g.colour_stats(rgb, grid).numpy(), col, atol=1e-6)
    box = torch.tensor([[p.geometry.orig_h, p.geometry.orig_w, p.geometry.pad_top,
                         p.geometry.pad_left] for p in prep])
    assert any(p.geometry.pad_top or p.geometry.pad_left for p in prep)  # padding exercised
    for n in (grid[0], SIZE):
        got = g.image_mask(box, n, n).numpy()
        assert np.array_equal(got, np.stack([p.geometry.image_mask(n, n) for p in prep]))


def test_onnx_refuses_another_unit_and_nan_scores(default_export, data, monkeypatch):
    """The ONNX runtime refuses what the torch runtime refuses: a cloud in millimetres
    (the training clouds' scale travels in the metadata) and a NaN score."""
    import dataclasses

    from cmad.errors import DataError

    det, _, path = default_export
    _, samples = data
    onnx_det = OnnxDetector(path, threads=1)
    assert onnx_det.xyz_scale == pytest.approx(det.xyz_scale)
    mm = dataclasses.replace(samples[0], xyz=samples[0].xyz * 1000)
    for predictor in (det, onnx_det):
        with pytest.raises(DataError, match="different unit"):
            predictor.predict([mm])
        with pytest.raises(DataError, match="different unit"):
            list(predictor.iter_predict([mm]))
    real_run = onnx_det.session.run
    monkeypatch.setattr(onnx_det.session, "run",
                        lambda names, x: [np.full_like(a, np.nan) for a in real_run(names, x)])
    with pytest.raises(DataError, match="cannot be scored"):
        onnx_det.predict(samples[:1])


def test_a_map_without_the_rgb_bank_keeps_the_score_and_exports(data, models, tmp_path):
    """The default `map_exclude` (the RGB bank): the image score still fuses every branch
    (the scores of a model with every branch in its map, bit for bit), the map fuses the
    others (their normalised maps, weights rescaled), the pixel threshold is read off
    those maps, and ONNX matches torch (the exported default)."""
    from cmad.model.core import LOC, localisation_maps
    from cmad.model.fusion import combine, normalise, upsample

    cat, samples = data
    det, _, onnx_path = models(DEFAULT)
    assert det.config.map_exclude == ("rgb_bank",)
    assert det.core.map_weights == pytest.approx({"mapping": 0.5, "joint_bank": 0.5})
    cfg = DetectorConfig.from_dict({**_cfg(DEFAULT).to_dict(), "map_exclude": []})
    ref = Detector(cfg).fit(cat, progress=False)
    assert ref.core.map_weights is None
    got, want = det.predict(samples, branch_maps=False), ref.predict(samples, branch_maps=False)
    assert [p.score for p in got] == [p.score for p in want]
    assert det.decision.threshold == ref.decision.threshold
    assert det.decision.pixel_threshold != ref.decision.pixel_threshold
    prep = det.prepare(samples[:4])
    fm, _ = det.extractor.extract(prep)
    raw, _ = det.core.branch_scores(fm)
    maps = {n: normalise(s, v, *det.core.norm[n]) for n, (s, v) in raw.items()}
    # the mapping (loss nll) stands in the map with its localisation map, the plain errors
    assert "mapping" + LOC in maps
    sub = upsample(combine(localisation_maps(maps), {"mapping": 0.5, "joint_bank": 0.5}), SIZE,
                   det.config.sigma)
    for p, w, m, pr in zip(got, want, sub, prep):
        a = pr.geometry.image_mask(SIZE, SIZE)
        assert np.allclose(p.anomaly_map_work[a], m[a], atol=1e-6)
        assert not np.allclose(p.anomaly_map_work, w.anomaly_map_work, atol=1e-3)
    for p, q in zip(got, OnnxDetector(onnx_path).predict(samples)):
        assert abs(p.score - q.score) < TOL
        assert np.abs(p.anomaly_map - q.anomaly_map).max() < TOL


def test_a_model_saved_before_map_exclude_keeps_every_branch_in_its_map(models, tmp_path):
    import shutil

    _, model, _ = models(DEFAULT)
    old = tmp_path / "old"
    shutil.copytree(model, old)
    meta = json.loads((old / "config.json").read_text())
    del meta["config"]["map_exclude"]
    (old / "config.json").write_text(json.dumps(meta))
    assert Detector.load(old).core.map_weights is None
    assert Detector.load(model).core.map_weights is not None


def test_a_bfloat16_model_is_not_exported(data, tmp_path):
    """ONNX computes the CNN in float32: a model fitted on bfloat16 features is refused, and
    so is `bench --onnx` with such a config, before any fit."""
    cat, _ = data
    cfg = _cfg(DEFAULT).with_overrides({"rgb": {"precision": "bfloat16"}})
    det = Detector(cfg).fit(cat, progress=False)
    with pytest.raises(ConfigError, match="refit with --precision float32"):
        export_onnx(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    from cmad.bench import run_bench

    with pytest.raises(ConfigError, match="--onnx.*bfloat16"):
        run_bench(data[0].root.parent, tmp_path / "r", methods=["cmad"], base=cfg, onnx=True,
                  progress=False)
    assert not (tmp_path / "r").exists()
