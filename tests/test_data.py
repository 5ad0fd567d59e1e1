"""Tests for cmad.data: reading the MVTec 3D-AD layout, bad input, preprocessing, cache, info."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from cmad.configs import DEFAULT_SIZE
from cmad.data import (
    Category,
    Dataset,
    PreprocessConfig,
    Preprocessor,
    dataset_info,
    fit_background_plane,
    format_info,
    read_gt,
    read_rgb,
    read_xyz,
    to_original,
    to_working,
    write_png_atomic,
    write_tiff_atomic,
)
from cmad.data import preprocess as preprocess_mod
from cmad.data.preprocess import make_geometry
from cmad.errors import ConfigError, DataError
from cmad.types import Sample, SamplePaths
from fixture_mvtec import CLASS_IDS, make_mvtec_like_tree, scene_xyz

SMALL = (48, 64)  # (H, W)


def small_tree(tmp_path: Path, category: str = "widget", **kw) -> Path:
    return make_mvtec_like_tree(tmp_path, category=category, size=SMALL, **kw)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = (Path(dirpath) / f).stat()
            out[str(Path(dirpath) / f)] = (st.st_size, st.st_mtime_ns)
    return out


# --- reading the fixture tree -------------------------------------------------------------

def test_fixture_tree_reads_as_mvtec(mvtec_like_root: Path) -> None:
    ds = Dataset(mvtec_like_root)
    assert ds.categories == ["tire_like"]
    cat = ds.category("tire_like")
    assert cat.modalities == ["rgb", "xyz"]
    assert cat.class_ids == CLASS_IDS
    assert cat.defect_types == ["combined", "crack"]
    assert [len(cat.refs(s)) for s in ("train", "validation", "test")] == [2, 1, 4]
    test = cat.samples("test")
    by_type = {s.defect_type: s for s in test}
    for s in test:
        assert s.rgb.dtype == np.uint8 and s.rgb.shape == (800, 600, 3)
        assert s.xyz.dtype == np.float32 and s.xyz.shape == (800, 600, 3)
        assert s.valid.dtype == np.bool_ and s.gt.dtype == np.bool_
        assert s.size == (800, 600)
        assert np.all(s.xyz[~s.valid] == 0) and np.all(np.any(s.xyz[s.valid] != 0, axis=1))
        assert s.label == int(s.defect_type != "good")
        assert s.gt.any() == (s.label == 1)
        assert s.paths.rgb.stem == s.paths.xyz.stem == s.stem
    assert set(np.unique(by_type["combined"].gt_values)) == {0, 253, 254}
    assert set(np.unique(by_type["crack"].gt_values)) == {0, 255}
    assert np.array_equal(by_type["crack"].gt, by_type["crack"].gt_values > 0)
    assert [s.key for s in cat.samples("train", limit=1)] == ["tire_like/train/good/000"]
    train = cat.samples("train")
    assert all(s.split == "train" and s.label == 0 and s.gt_values is None for s in train)


def test_root_may_be_the_category_folder(mvtec_like_root: Path) -> None:
    ds = Dataset(mvtec_like_root / "tire_like")
    assert ds.categories == ["tire_like"]
    assert len(ds.category("tire_like").refs("test")) == 4


def test_several_categories_any_names_and_unknown_name(tmp_path: Path) -> None:
    small_tree(tmp_path, "my-widget_01")
    small_tree(tmp_path, "zz", defects={"scratch": [255]})
    (tmp_path / "not_a_category").mkdir()
    ds = Dataset(tmp_path)
    assert ds.categories == ["my-widget_01", "zz"]
    assert [c.name for c in ds] == ["my-widget_01", "zz"]
    assert ds.category("zz").defect_types == ["scratch"]
    with pytest.raises(DataError, match="my-widget_01, zz"):
        ds.category("bagel")


@pytest.mark.parametrize("modalities", [("rgb",), ("xyz",)])
def test_single_modality_categories(tmp_path: Path, modalities: tuple[str, ...]) -> None:
    cat = Category(small_tree(tmp_path, modalities=modalities))
    assert cat.modalities == list(modalities)
    s = cat.samples("test")[-1]
    assert (s.rgb is None) == ("rgb" not in modalities)
    assert (s.xyz is None) == ("xyz" not in modalities)
    if s.xyz is None:
        assert s.valid.all() and s.valid.shape == SMALL
    prepared = Preprocessor(PreprocessConfig(size=32))(s)
    assert (prepared.rgb is None) == (s.rgb is None)
    assert (prepared.xyz is None) == (s.xyz is None)
    if s.xyz is None:
        # RGB-only: foreground is the image area, False in the padding (top/bottom rows).
        g = prepared.geometry
        assert g.pad_top == 8 and g.pad_left == 0
        assert np.array_equal(prepared.foreground, prepared.valid)
        assert prepared.foreground[12:20].all() and not prepared.foreground[:3].any()
        assert not prepared.foreground[-3:].any()


def test_nan_points_invalid_with_one_warning(mvtec_like_root: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = mvtec_like_root / "tire_like/train/good/xyz/000.tiff"
    raw = tifffile.imread(path)
    assert np.isnan(raw).any() and np.isinf(raw).any()
    with caplog.at_level(logging.WARNING, logger="cmad.data.io"):
        xyz, valid = read_xyz(path)
    records = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(records) == 1 and "3 NaN/inf" in records[0].getMessage()
    assert np.isfinite(xyz).all()
    assert not valid[1, 1] and not valid[2, 3] and not valid[798, 597]
    assert np.all(xyz[1, 1] == 0) and np.all(xyz[2, 3] == 0)
    zero_on_disk = np.all(raw == 0, axis=2)
    assert zero_on_disk.sum() > 1000 and not valid[zero_on_disk].any()
    assert valid.sum() == np.isfinite(raw).all(axis=2).sum() - zero_on_disk.sum()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmad.data.io"):
        read_xyz(mvtec_like_root / "tire_like/train/good/xyz/001.tiff")
    assert not caplog.records


def test_far_outliers_invalid_with_one_warning(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from cmad.data.io import clean_cloud

    rng = np.random.default_rng(0)
    xyz = np.stack([rng.uniform(-0.05, 0.05, (20, 30)), rng.uniform(-0.05, 0.05, (20, 30)),
                    rng.uniform(0.4, 0.5, (20, 30))], axis=2).astype(np.float32)
    xyz[0, 0] = 1e30          # a finite glitch
    xyz[1, 1] = (0, 0, 500)   # 500 m away from a part 0.45 m from the camera
    xyz[2, 2] = -3e7
    xyz[3, 3] = (0.1, 0.1, 0.9)  # far-ish but part of the scene: kept
    path = tmp_path / "c.tiff"
    tifffile.imwrite(path, xyz, photometric="rgb")
    with caplog.at_level(logging.WARNING, logger="cmad.data.io"):
        out, valid = read_xyz(path)
    records = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(records) == 1 and "3 far outlier" in records[0].getMessage()
    assert not valid[0, 0] and not valid[1, 1] and not valid[2, 2] and valid[3, 3]
    assert np.all(out[~valid] == 0) and valid.sum() == 20 * 30 - 3
    # a cloud with nothing valid left is an error naming it
    with pytest.raises(DataError, match="no valid point"):
        clean_cloud(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), bool), path)
    tifffile.imwrite(path, np.full((4, 4, 3), np.nan, np.float32), photometric="rgb")
    with pytest.raises(DataError, match=f"{path}.*no valid point"):
        read_xyz(path)


def test_recover_folder_restores_a_moved_aside_output(tmp_path: Path) -> None:
    from cmad.data.io import recover_folder

    out = tmp_path / "out"
    old = tmp_path / ".out.abc123.old"   # what a run killed between its renames leaves
    old.mkdir()
    (old / "scores.json").write_text("old")
    half = tmp_path / ".out.def456.tmp"  # and a half-built folder
    half.mkdir()
    (half / "x").write_text("half")
    recover_folder(out)
    assert (out / "scores.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    recover_folder(out)  # nothing to do: nothing changes
    assert (out / "scores.json").read_text() == "old"


def test_readers_convert_modes(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "l.png")
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_rgb(tmp_path / "l.png"), np.repeat(grey[:, :, None], 3, 2))
    assert read_rgb(tmp_path / "rgba.png").shape == (3, 4, 3)
    assert np.all(read_rgb(tmp_path / "rgba.png")[..., 0] == 200)
    gt_rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    gt_rgb[1, 1] = (0, 254, 0)
    Image.fromarray(gt_rgb).save(tmp_path / "gt.png")
    gt = read_gt(tmp_path / "gt.png")
    assert gt.shape == (3, 4) and gt.dtype == np.uint8 and gt[1, 1] == 254 and gt.sum() == 254


def test_atomic_writers_leave_no_temporary_files(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    write_tiff_atomic(tmp_path / "out" / "m.tiff", arr)
    write_png_atomic(tmp_path / "out" / "m.png", (arr > 0.5))
    write_tiff_atomic(tmp_path / "out" / "m.tiff", arr * 2)  # replace
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.png", "m.tiff"]
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "m.tiff"), arr * 2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "m.png")) > 0, arr > 0.5)


# --- bad input ------------------------------------------------------------------------------

def test_missing_split_folder(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    shutil.rmtree(cat_dir / "validation")
    cat = Dataset(tmp_path).category("widget")
    with pytest.raises(DataError, match="missing split folder") as err:
        cat.refs("validation")
    assert err.value.path == cat_dir / "validation"
    assert "validation" in str(err.value)
    assert len(cat.refs("train")) == 2


def test_rgb_and_xyz_of_different_sizes(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    bad = cat_dir / "train/good/xyz/001.tiff"
    tifffile.imwrite(bad, np.ones((40, 64, 3), dtype=np.float32), photometric="rgb")
    cat = Category(cat_dir)
    ref = cat.refs("train")[1]
    with pytest.raises(DataError) as err:
        cat.load(ref)
    assert err.value.path == bad
    assert "64x40" in str(err.value) and "64x48" in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize("shape,dtype", [((48, 64), np.float32), ((48, 64, 4), np.float32),
                                         ((48, 64, 3), np.uint16)])
def test_tiff_that_is_not_hxwx3_float(tmp_path: Path, shape: tuple[int, ...],
                                      dtype: type) -> None:
    cat_dir = small_tree(tmp_path)
    bad = cat_dir / "test/crack/xyz/000.tiff"
    tifffile.imwrite(bad, np.ones(shape, dtype=dtype),
                     photometric="rgb" if len(shape) == 3 else "minisblack")
    cat = Category(cat_dir)
    ref = next(r for r in cat.refs("test") if r.defect_type == "crack")
    with pytest.raises(DataError) as err:
        cat.load(ref)
    assert err.value.path == bad and str(bad) in str(err.value)


def test_unreadable_png_and_tiff(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    bad_png = cat_dir / "train/good/rgb/000.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    bad_tiff = cat_dir / "train/good/xyz/001.tiff"
    bad_tiff.write_bytes(b"garbage" * 10)
    cat = Category(cat_dir)
    refs = cat.refs("train")
    with pytest.raises(DataError, match="unreadable image") as err:
        cat.load(refs[0])
    assert err.value.path == bad_png and err.value.__cause__ is None
    assert err.value.__suppress_context__
    with pytest.raises(DataError, match="unreadable TIFF") as err:
        cat.load(refs[1])
    assert err.value.path == bad_tiff
    with pytest.raises(DataError, match="file not found"):
        read_rgb(cat_dir / "nope.png")


def test_empty_category(tmp_path: Path) -> None:
    for split in ("train/good", "validation/good", "test/good"):
        (tmp_path / "empty" / split).mkdir(parents=True)
    with pytest.raises(DataError, match="empty category") as err:
        Category(tmp_path / "empty")
    assert err.value.path == tmp_path / "empty"
    with pytest.raises(DataError, match="empty category"):
        Category(tmp_path)  # no split folder at all
    with pytest.raises(DataError, match="no category folders"):
        Dataset(tmp_path / "empty" / "train")
    with pytest.raises(DataError, match="not found"):
        Dataset(tmp_path / "missing")
    # Modality folders present but no files: a split with no samples.
    for split in ("train/good/rgb", "train/good/xyz"):
        (tmp_path / "hollow" / split).mkdir(parents=True)
    with pytest.raises(DataError, match="no samples") as err:
        Category(tmp_path / "hollow").refs("train")
    assert err.value.path == tmp_path / "hollow" / "train"


def test_gt_of_wrong_size(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    bad = cat_dir / "test/combined/gt/000.png"
    Image.fromarray(np.full((48, 60), 255, dtype=np.uint8)).save(bad)
    cat = Category(cat_dir)
    ref = next(r for r in cat.refs("test") if r.defect_type == "combined")
    with pytest.raises(DataError, match="60x48") as err:
        cat.load(ref)
    assert err.value.path == bad


def test_mis_paired_stems(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    (cat_dir / "train/good/xyz/001.tiff").rename(cat_dir / "train/good/xyz/005.tiff")
    cat = Category(cat_dir)
    with pytest.raises(DataError, match="no matching xyz") as err:
        cat.refs("train")
    assert err.value.path == cat_dir / "train/good/xyz/001.tiff"
    refs, problems = cat.scan("train")
    assert [r.stem for r in refs] == ["000"]
    assert {p.path for p in problems} == {cat_dir / "train/good/xyz/001.tiff",
                                          cat_dir / "train/good/rgb/005.png"}


def test_defect_sample_without_gt_and_orphan_gt(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    (cat_dir / "test/crack/gt/000.png").rename(cat_dir / "test/crack/gt/007.png")
    cat = Category(cat_dir)
    with pytest.raises(DataError, match="no matching gt") as err:
        cat.refs("test")
    assert err.value.path == cat_dir / "test/crack/gt/000.png"
    _, problems = cat.scan("test")
    assert cat_dir / "test/crack/gt/007.png" in {p.path for p in problems}


def test_missing_gt_of_good_test_sample_is_all_zero(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    shutil.rmtree(cat_dir / "test/good/gt")
    cat = Category(cat_dir)
    good = [s for s in cat.samples("test") if s.label == 0]
    assert len(good) == 2
    assert all(s.paths.gt is None and not s.gt.any() and s.gt.shape == SMALL for s in good)


def test_defect_folder_in_train_is_rejected(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    shutil.copytree(cat_dir / "train/good", cat_dir / "train/crack")
    with pytest.raises(DataError, match="only good/") as err:
        Category(cat_dir).refs("train")
    assert err.value.path == cat_dir / "train/crack"


# --- preprocessing --------------------------------------------------------------------------

def _scene_sample(xyz: np.ndarray, valid: np.ndarray) -> Sample:
    h, w = valid.shape
    return Sample(rgb=None, xyz=xyz, valid=valid, gt=np.zeros((h, w), bool), label=0,
                  defect_type="good", stem="000", category="scene", split="train",
                  paths=SamplePaths(None, None, None))


def _scene(h: int = 120, w: int = 160, seed: int = 1):
    rng = np.random.default_rng(seed)
    xyz, obj, height = scene_xyz(h, w, rng)
    valid = rng.random((h, w)) > 0.02
    xyz[~valid] = 0
    return xyz, valid, obj, height


def test_background_plane_removed_object_kept() -> None:
    xyz, valid, obj, height = _scene()
    plane = fit_background_plane(xyz, valid, border=10, threshold=0.005, iters=200,
                                 rng=np.random.default_rng(0))
    assert plane is not None
    normal, _ = plane
    true_normal = np.array([-0.15, -0.08, 1.0]) / np.linalg.norm([-0.15, -0.08, 1.0])
    assert abs(normal @ true_normal) > 0.9999 and abs(np.linalg.norm(normal) - 1) < 1e-9
    fg = Preprocessor(PreprocessConfig(size=64)).foreground(_scene_sample(xyz, valid))
    background = valid & (height == 0)
    assert fg[valid & obj].mean() > 0.99
    assert fg[background].mean() < 0.005
    assert not fg[~valid].any()
    keep_all = Preprocessor(PreprocessConfig(remove_background=False)).foreground(
        _scene_sample(xyz, valid))
    assert np.array_equal(keep_all, valid)


def test_inlier_counts_match_the_residual_matrix() -> None:
    """The RANSAC scorer counts, per hypothesis, what the (points x hypotheses) residual
    matrix counts, also for points placed just inside and just outside the threshold."""
    from cmad.data.preprocess import _inlier_counts

    rng = np.random.default_rng(4)
    pts = rng.normal(size=(3000, 3))
    normals = rng.normal(size=(50, 3))
    normals /= np.linalg.norm(normals, axis=1)[:, None]
    ds = rng.normal(size=50) * 0.1
    # points at distance 0.005 -/+ 1e-9 from hypothesis 0
    edge = pts[:40] - (pts[:40] @ normals[0] + ds[0])[:, None] * normals[0]
    off = np.where(np.arange(40) % 2 == 0, 0.005 - 1e-9, 0.005 + 1e-9)
    pts = np.concatenate([pts, edge + off[:, None] * normals[0]])
    ref = np.count_nonzero(np.abs(pts @ normals.T + ds) < 0.005, axis=0)
    got = _inlier_counts(np.ascontiguousarray(pts.T), normals, ds, 0.005)
    assert np.array_equal(got, ref)
    assert ref[0] >= 20 and ref.max() > ref.min()


def test_largest_component_drops_small_blobs() -> None:
    xyz, valid, obj, _ = _scene()
    xyz[15:20, 15:20, 2] -= 0.02  # a small box 20 mm above the plane, away from the dome
    sample = _scene_sample(xyz, valid)
    fg_all = Preprocessor(PreprocessConfig()).foreground(sample)
    fg_big = Preprocessor(PreprocessConfig(largest_component=True)).foreground(sample)
    assert fg_all[15:20, 15:20][valid[15:20, 15:20]].all()
    assert not fg_big[15:20, 15:20].any()
    assert fg_big[valid & obj].mean() > 0.99


def test_plane_fit_falls_back_without_border_points(caplog: pytest.LogCaptureFixture) -> None:
    xyz, valid, _, _ = _scene(60, 80)
    valid[:, :] = False
    valid[20:40, 20:60] = True
    xyz[~valid] = 0
    assert fit_background_plane(xyz, valid, 10, 0.005, 50, np.random.default_rng(0)) is None
    with caplog.at_level(logging.WARNING, logger="cmad.data.preprocess"):
        fg = Preprocessor().foreground(_scene_sample(xyz, valid))
    assert np.array_equal(fg, valid)
    assert any("background not removed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("hw,size", [((48, 64), 224), ((64, 48), 32), ((50, 50), 40),
                                     ((800, 600), 224), ((37, 91), 50)])
def test_pad_resize_round_trip(hw: tuple[int, int], size: int) -> None:
    h, w = hw
    g = make_geometry(h, w, size)
    assert g.side == max(h, w)
    assert (g.pad_top, g.pad_left) == ((g.side - h) // 2, (g.side - w) // 2)
    rng = np.random.default_rng(h * w)
    coarse = Image.fromarray(rng.random((6, 6)).astype(np.float32))
    mask = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR)) > 0.5
    mask[: h // 4, : w // 4] = True
    work = to_working(mask, g)
    assert work.shape == (size, size) and work.dtype == np.bool_
    back = to_original(work.astype(np.float32), g)
    assert back.shape == (h, w) and back.dtype == np.float32
    wrong = (back > 0.5) != mask
    tol = math.ceil(g.side / size) + 1
    near_edge = np.where(mask, ndimage.distance_transform_edt(mask),
                         ndimage.distance_transform_edt(~mask)) <= tol
    assert not (wrong & ~near_edge).any()
    assert wrong.mean() < 0.1
    # The padding maps to nothing: a full image becomes exactly its area in the square.
    full = to_working(np.ones((h, w), bool), g)
    assert abs(full.mean() - (h * w) / g.side ** 2) < 2.5 / size
    # xyz is resized by nearest: values are never blended.
    values = rng.random((h, w, 3)).astype(np.float32)
    wv = to_working(values, g)
    assert set(np.unique(wv[full])) <= set(np.unique(values))
    assert np.all(wv[~full] == 0)


def test_geometry_shape_checks() -> None:
    g = make_geometry(48, 64, 32)
    with pytest.raises(ValueError):
        to_original(np.zeros((31, 32), np.float32), g)
    with pytest.raises(ValueError):
        to_working(np.zeros((64, 48), bool), g)


def test_prepared_sample(mvtec_like_root: Path) -> None:
    cat = Category(mvtec_like_root / "tire_like")
    sample = next(s for s in cat.samples("test") if s.defect_type == "crack")
    p = Preprocessor(PreprocessConfig(size=224, rgb_interp="bicubic"))(sample)
    g = p.geometry
    assert (g.orig_h, g.orig_w, g.pad_top, g.pad_left, g.size) == (800, 600, 0, 100, 224)
    assert p.rgb.shape == (224, 224, 3) and p.rgb.dtype == np.uint8
    assert p.xyz.shape == (224, 224, 3) and p.xyz.dtype == np.float32
    for m in (p.valid, p.foreground, p.gt):
        assert m.shape == (224, 224) and m.dtype == np.bool_
    assert p.gt_orig is sample.gt and p.key == sample.key and p.label == 1
    assert not (p.foreground & ~p.valid).any()
    assert np.all(p.xyz[~p.foreground] == 0) and np.all(np.any(p.xyz[p.foreground] != 0, 1))
    assert not p.valid[:, :28].any() and not p.valid[:, -28:].any()  # 100 px pad -> 28
    assert 0.1 < p.foreground.mean() < 0.4 and p.gt.any()
    assert (p.gt & p.foreground).sum() > 0.8 * p.gt.sum()  # defects lie on the object
    assert np.all(p.rgb[:, :27] == 0)


def test_cache_hit_identical_and_dataset_untouched(mvtec_like_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot(mvtec_like_root)
    cat = Category(mvtec_like_root / "tire_like")
    samples = cat.samples("test")[2:]
    cfg = PreprocessConfig(size=64)
    cache = tmp_path / "cache"
    first = Preprocessor(cfg, cache_dir=cache).prepare_many(samples, progress=False)
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) == 2

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: plane fitted again")

    with monkeypatch.context() as mp:
        mp.setattr(preprocess_mod, "fit_background_plane", boom)
        second = Preprocessor(cfg, cache_dir=cache).prepare_many(samples, progress=False)
    for a, b in zip(first, second):
        for name in ("rgb", "xyz", "valid", "foreground", "gt"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert a.geometry == b.geometry and a.key == b.key
    # Another configuration is another entry.
    Preprocessor(PreprocessConfig(size=64, plane_threshold=0.004), cache_dir=cache)(samples[0])
    assert len(list(cache.rglob("*.safetensors"))) == 3
    # A corrupt entry is recomputed, with the same result.
    entries[0].write_bytes(b"\x00" * 40)
    with caplog.at_level(logging.WARNING, logger="cmad.data.preprocess"):
        again = Preprocessor(cfg, cache_dir=cache).prepare_many(samples, progress=False)
    assert any("recomputing" in r.getMessage() for r in caplog.records)
    for a, b in zip(first, again):
        assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.rgb, b.rgb)
    assert not list(cache.rglob("*.tmp"))
    # Never write inside the dataset.
    with pytest.raises(ConfigError, match="inside the dataset"):
        Preprocessor(cfg, cache_dir=mvtec_like_root / "tire_like" / "cache")(samples[0])
    assert snapshot(mvtec_like_root) == before


def test_preprocess_config() -> None:
    a, b = PreprocessConfig(), PreprocessConfig()
    assert a.digest() == b.digest() and len(a.digest()) == 16
    assert PreprocessConfig(size=256).digest() != a.digest()
    assert PreprocessConfig.from_dict(a.to_dict()) == a
    assert a.to_dict()["plane_threshold"] == 0.005 and a.to_dict()["size"] == DEFAULT_SIZE
    with pytest.raises(ConfigError):
        PreprocessConfig(rgb_interp="lanczos")
    with pytest.raises(ConfigError):
        PreprocessConfig.from_dict({"size": 224, "colour": 1})


# --- dataset info ---------------------------------------------------------------------------

def test_dataset_info_on_fixture(mvtec_like_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_full_read(*args, **kwargs):
        raise AssertionError("dataset_info decoded a whole point cloud")

    monkeypatch.setattr(tifffile, "imread", no_full_read)
    info = dataset_info(mvtec_like_root)
    assert info == {"categories": {"tire_like": {
        "splits": {"train": 2, "validation": 1, "test": 4},
        "defect_types": ["combined", "crack"],
        "modalities": ["rgb", "xyz"],
        "image_sizes": [[600, 800]],
        "problems": [],
    }}}
    assert json.loads(json.dumps(info)) == info
    text = format_info(info)
    assert "tire_like" in text and "600x800" in text and "no problems found" in text


def test_dataset_info_collects_problems(tmp_path: Path) -> None:
    cat_dir = small_tree(tmp_path)
    shutil.rmtree(cat_dir / "validation")
    (cat_dir / "train/good/xyz/001.tiff").rename(cat_dir / "train/good/xyz/004.tiff")
    (cat_dir / "test/crack/rgb/000.png").write_bytes(b"not a png")
    tifffile.imwrite(cat_dir / "test/good/xyz/001.tiff", np.ones((40, 64, 3), np.float32),
                     photometric="rgb")
    Image.fromarray(np.zeros((48, 50), np.uint8)).save(cat_dir / "test/combined/gt/000.png")
    info = dataset_info(tmp_path)["categories"]["widget"]
    assert info["splits"] == {"train": 1, "validation": 0, "test": 4}
    assert info["image_sizes"] == [[64, 40], [64, 48]]
    problems = "\n".join(info["problems"])
    assert len(info["problems"]) == 6
    for expected in ("validation: missing split folder", "xyz/001.tiff: missing",
                     "rgb/004.png: missing", "crack/rgb/000.png: unreadable image",
                     "good/xyz/001.tiff: size 64x40", "combined/gt/000.png: size 50x48"):
        assert expected in problems
    assert "problems in widget:" in format_info({"categories": {"widget": info}})


def test_dataset_info_verify_reads_every_sample(tmp_path: Path) -> None:
    """A file cut short after its header passes the header check; `verify` reads it whole."""
    cat_dir = small_tree(tmp_path)
    png = cat_dir / "train/good/rgb/000.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    assert dataset_info(tmp_path)["categories"]["widget"]["problems"] == []
    problems = dataset_info(tmp_path, verify=True)["categories"]["widget"]["problems"]
    assert len(problems) == 1 and "train/good/rgb/000.png: unreadable image" in problems[0]


def _reference_far(xyz, valid):
    """Far outliers by the definition, with exact medians over every valid point."""
    from cmad.data.io import FAR_FACTOR, MAX_ABS_COORD

    pts = xyz[valid].astype(np.float64)
    far = np.abs(pts).max(axis=1) > MAX_ABS_COORD
    centre = np.median(pts[~far], axis=0)
    dist = np.linalg.norm(pts - centre, axis=1)
    far |= dist > FAR_FACTOR * np.median(dist[~far])
    out = np.zeros(valid.shape, dtype=bool)
    out[valid] = far
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_cloud_matches_exact_medians_on_a_large_cloud(seed):
    """The fast far-outlier test (medians on a subsample, float32 distances) marks the same
    points as the definition with exact medians, on a cloud larger than the subsample."""
    from cmad.data.io import MEDIAN_POINTS, clean_cloud

    rng = np.random.default_rng(seed)
    h, w = 400, 500
    assert h * w > 2 * MEDIAN_POINTS
    xyz = np.stack([rng.normal(0, 0.05, (h, w)), rng.normal(0, 0.05, (h, w)),
                    0.5 + rng.normal(0, 0.01, (h, w))], 2).astype(np.float32)
    valid = rng.random((h, w)) > 0.1
    xyz[~valid] = 0
    planted = [(3, 4, 1e7), (10, 20, 50.0), (100, 200, -30.0), (399, 499, 1e30)]
    for y, x, v in planted:
        xyz[y, x] = v
        valid[y, x] = True
    expect = _reference_far(xyz, valid)
    assert expect.sum() == len(planted)
    got_valid = valid.copy()
    got_xyz = xyz.copy()
    clean_cloud(got_xyz, got_valid, "cloud.tiff")
    assert np.array_equal(valid & ~got_valid, expect)
    assert (got_xyz[expect] == 0).all()
    assert np.array_equal(got_xyz[got_valid], xyz[got_valid])


def test_grey_images_of_16_and_32_bits_keep_their_range(tmp_path: Path) -> None:
    """A 16-bit grey image read as RGB: its values by bit depth, never clipped to white
    (older Pillow opens 16-bit PNGs as 32-bit mode "I")."""
    from PIL import Image

    from cmad.data.io import read_rgb

    ramp = (np.arange(64, dtype=np.int64)[None, :] * 1024).repeat(4, 0)  # 0 .. 64,512
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.int32), mode="I").save(tmp_path / "g32.tif")
    small = (np.arange(64, dtype=np.int32)[None, :] * 4).repeat(4, 0)  # 8-bit values in "I"
    Image.fromarray(small, mode="I").save(tmp_path / "s32.tif")
    want = (ramp >> 8).astype(np.uint8)
    for name in ("g16.png", "g32.tif"):
        got = read_rgb(tmp_path / name)
        assert got.shape == (4, 64, 3) and np.array_equal(got[:, :, 0], want), name
    assert np.array_equal(read_rgb(tmp_path / "s32.tif")[:, :, 0], small.astype(np.uint8))
    from cmad.data.io import _to_uint8

    # a 16-bit PNG opened in mode "I": by its depth, however dark the frame
    dark = np.array([[0, 200, 255]], dtype=np.int32)
    assert _to_uint8(dark, 16).tolist() == [[0, 0, 0]]
    wide = np.array([[0, 1 << 19, (1 << 20) - 1]], dtype=np.int32)  # 20-bit values
    assert _to_uint8(wide).tolist() == [[0, 128, 255]]
