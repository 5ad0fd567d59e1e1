"""Tests for cmad.data.eyecandies and open_dataset: the Eyecandies layout read as shipped."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmad.data import (
    Dataset,
    EyecandiesCategory,
    EyecandiesDataset,
    EyecandiesOptions,
    dataset_info,
    detect_layout,
    format_info,
    open_dataset,
)
from cmad.data.eyecandies import FOCAL_LENGTH, dequantise_depth, read_depth_info, unproject
from cmad.errors import ConfigError, DataError
from fixture_eyecandies import PLANE_C, TEST_PLAN, make_eyecandies_tree
from fixture_mvtec import make_mvtec_like_tree

SIZE = (40, 56)  # (H, W)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = (Path(dirpath) / f).stat()
            out[str(Path(dirpath) / f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def tree(tmp_path: Path):
    return make_eyecandies_tree(tmp_path, size=SIZE)


# --- layout detection ------------------------------------------------------------------------

def test_open_dataset_detects_each_layout(eyecandies_root: Path, mvtec_like_root: Path) -> None:
    ds = open_dataset(eyecandies_root)
    assert isinstance(ds, EyecandiesDataset) and ds.categories == ["CandyLike"]
    single = open_dataset(eyecandies_root / "CandyLike")
    assert isinstance(single, EyecandiesDataset) and single.categories == ["CandyLike"]
    assert isinstance(ds.category("CandyLike"), EyecandiesCategory)
    assert [c.name for c in ds] == ["CandyLike"]
    mv = open_dataset(mvtec_like_root)
    assert type(mv) is Dataset and mv.categories == ["tire_like"]
    assert type(open_dataset(mvtec_like_root / "tire_like")) is Dataset
    assert detect_layout(eyecandies_root) == "eyecandies"
    assert detect_layout(mvtec_like_root / "tire_like") == "mvtec3d"
    with pytest.raises(DataError, match="unknown category 'nope'; available: CandyLike"):
        ds.category("nope")


def test_open_dataset_unknown_or_mixed_layout_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "plain" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match="unknown dataset layout: expected an MVTec 3D-AD") as err:
        open_dataset(tmp_path / "plain")
    assert err.value.path == tmp_path / "plain" and "Eyecandies" in str(err.value)
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "missing")
    # A split folder is not a category.
    make_eyecandies_tree(tmp_path / "mixed", size=(8, 10), n_train=1, n_val=1, n_private=0)
    with pytest.raises(DataError, match="unknown dataset layout"):
        open_dataset(tmp_path / "mixed" / "CandyLike" / "train")
    make_mvtec_like_tree(tmp_path / "mixed", category="bagel", size=(8, 10))
    with pytest.raises(DataError, match="mixed dataset layouts") as err:
        open_dataset(tmp_path / "mixed")
    assert err.value.path == tmp_path / "mixed"
    assert "bagel" in str(err.value) and "CandyLike" in str(err.value)


# --- reading -------------------------------------------------------------------------------

def test_splits_counts_and_private_split_skipped(eyecandies_root: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cmad.data.eyecandies"):
        cat = open_dataset(eyecandies_root).category("CandyLike")
    assert any("test_private/ has no ground truth; skipped" in r.getMessage()
               for r in caplog.records)
    assert cat.splits == ["train", "validation", "test"]
    assert cat.modalities == ["rgb", "xyz"] and cat.class_ids == {}
    assert [len(cat.refs(s)) for s in cat.splits] == [3, 2, len(TEST_PLAN)]
    assert [r.stem for r in cat.refs("train")] == ["000", "001", "002"]
    assert [r.stem for r in cat.refs("validation")] == ["00", "01"]
    for split in cat.splits:
        for s in cat.samples(split):
            assert s.split == split and s.category == "CandyLike"
            assert s.key == f"CandyLike/{split}/{s.defect_type}/{s.stem}"
            assert s.paths.rgb.name == f"{s.stem}_image_4.png"
            assert s.paths.xyz.name == f"{s.stem}_depth.png"
    assert all("test_private" not in str(r.rgb_path) for s in cat.splits for r in cat.refs(s))
    assert len(cat.samples("train", limit=2)) == 2


def test_labels_defect_types_and_masks(tree) -> None:
    cat = EyecandiesCategory(tree.category)
    assert cat.defect_types == ["anomalous", "bumps", "combined", "dents"]
    by_stem = {s.stem: s for s in cat.samples("test")}
    expected_type = {"00": "good", "01": "good", "02": "bumps", "03": "dents",
                     "04": "combined", "05": "anomalous"}
    for stem, s in by_stem.items():
        assert s.defect_type == expected_type[stem]
        assert s.label == int(TEST_PLAN[stem] is not None)
        truth = tree.mask[("test_public", stem)]
        assert s.gt.dtype == np.bool_ and np.array_equal(s.gt, truth)
        assert s.gt.any() == bool(s.label)
        assert s.gt_values.dtype == np.uint8 and set(np.unique(s.gt_values)) <= {0, 255}
        assert s.paths.gt.name == f"{stem}_mask.png"
    for s in cat.samples("train") + cat.samples("validation"):
        assert s.label == 0 and s.defect_type == "good" and not s.gt.any()
        assert s.gt_values is None and s.paths.gt is None


def test_depth_dequantised_and_unprojected(tree) -> None:
    cat = EyecandiesCategory(tree.category)
    h, w = SIZE
    for split in ("train", "test"):
        for s in cat.samples(split):
            folder = s.paths.xyz.parent.parent.name
            assert s.xyz.dtype == np.float32 and s.xyz.shape == (h, w, 3)
            assert s.rgb.dtype == np.uint8 and s.rgb.shape == (h, w, 3)
            assert s.valid.all() and s.size == SIZE
            lo, hi = read_depth_info(s.paths.xyz.with_name(f"{s.stem}_info_depth.yaml"))
            q = np.asarray(Image.open(s.paths.xyz)).astype(np.float64)
            formula = (q / 65535.0 * (hi - lo) + lo) * 0.1
            z = s.xyz[:, :, 2].astype(np.float64)
            np.testing.assert_allclose(z, formula, rtol=2e-6, atol=0)
            step = (hi - lo) / 65535 * 0.1
            truth = tree.depth[(folder, s.stem)] * 0.1
            assert np.abs(z - truth).max() <= 0.5 * step + 1e-6
            u = np.arange(w)[None, :]
            v = np.arange(h)[:, None]
            np.testing.assert_allclose(s.xyz[:, :, 0], (u - w / 2) * z / FOCAL_LENGTH,
                                       rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(s.xyz[:, :, 1], (v - h / 2) * z / FOCAL_LENGTH,
                                       rtol=1e-5, atol=1e-9)


def test_background_points_lie_on_the_fixture_plane(tree) -> None:
    s = EyecandiesCategory(tree.category).samples("train")[0]
    h, w = SIZE
    v, u = np.mgrid[0:h, 0:w]
    off = ((u - w / 2) / (0.3 * w)) ** 2 + ((v - h / 2) / (0.3 * h)) ** 2 > 1.05
    plane = 0.7071067811865476 * (s.xyz[:, :, 1] + s.xyz[:, :, 2]) - PLANE_C * 0.1
    assert np.abs(plane[off]).max() < 6 * 0.0005 * 0.1  # sensor noise only
    assert np.abs(plane[~off]).max() > 0.02  # the candy rises off it


def test_reader_options(tree) -> None:
    base = EyecandiesCategory(tree.category).samples("train", limit=1)[0]
    lit0 = EyecandiesCategory(tree.category, EyecandiesOptions(light=0)).samples(
        "train", limit=1)[0]
    raw = EyecandiesCategory(tree.category, EyecandiesOptions(depth_scale=1.0)).samples(
        "train", limit=1)[0]
    assert lit0.paths.rgb.name == "000_image_0.png"
    assert np.array_equal(lit0.rgb, np.asarray(Image.open(lit0.paths.rgb)))
    assert np.array_equal(base.rgb, np.asarray(Image.open(base.paths.rgb)))
    assert not np.array_equal(lit0.rgb, base.rgb)
    np.testing.assert_allclose(raw.xyz, base.xyz * 10, rtol=1e-5)
    wide = EyecandiesCategory(tree.category, EyecandiesOptions(focal_length=FOCAL_LENGTH / 2))
    np.testing.assert_allclose(wide.samples("train", limit=1)[0].xyz[:, :, 0],
                               base.xyz[:, :, 0] * 2, rtol=1e-5, atol=1e-9)
    ds = EyecandiesDataset(tree.category, EyecandiesOptions(light=2))
    assert ds.category("CandyLike").refs("train")[0].rgb_path.name == "000_image_2.png"
    assert open_dataset(tree.category, eyecandies=EyecandiesOptions(light=3)) \
        .category("CandyLike").options.light == 3
    for bad in (dict(light=6), dict(light=-1), dict(light=True), dict(depth_scale=0),
                dict(depth_scale=float("nan")), dict(focal_length=-1.0)):
        with pytest.raises(ConfigError):
            EyecandiesOptions(**bad)


def test_reader_options_and_depth_range_are_part_of_the_cache_keys(tree, tmp_path) -> None:
    """Samples read with another depth scale, or after their depth range changed, must not
    be served the clouds cached for the first reading."""
    from cmad.data.preprocess import PreprocessConfig, Preprocessor

    cache = tmp_path / "cache"
    cfg = PreprocessConfig(size=32, remove_background=False)

    def prepared(options: EyecandiesOptions):
        s = EyecandiesCategory(tree.category, options).samples("train", limit=1)[0]
        return s, Preprocessor(cfg, cache_dir=cache)(s), Preprocessor(cfg)(s)

    _, cached_a, _ = prepared(EyecandiesOptions())
    s, cached_b, fresh_b = prepared(EyecandiesOptions(depth_scale=1.0))
    assert s.paths.reader and s.paths.extra
    np.testing.assert_array_equal(cached_b.xyz, fresh_b.xyz)
    assert np.abs(cached_b.xyz).max() == pytest.approx(10 * np.abs(cached_a.xyz).max(), rel=1e-4)
    # the same reading again: served from the cache
    key = Preprocessor(cfg, cache_dir=cache)._cache_key(s)
    assert key is not None and key == Preprocessor(cfg, cache_dir=cache)._cache_key(
        EyecandiesCategory(tree.category, EyecandiesOptions(depth_scale=1.0)).samples(
            "train", limit=1)[0])
    # an edited depth range (the yaml beside the depth PNG) changes the key too
    info = s.paths.extra[0]
    info.write_text(info.read_text().replace("max:", "max: 9.0 #", 1))
    again = EyecandiesCategory(tree.category, EyecandiesOptions(depth_scale=1.0)).samples(
        "train", limit=1)[0]
    assert Preprocessor(cfg, cache_dir=cache)._cache_key(again) != key
    # and the features' cache entries
    from cmad.features import FeatureExtractor

    ext = FeatureExtractor(["xyz"], size=32, cache_dir=cache)
    pa = Preprocessor(cfg)(again)
    before = ext._cache_path(pa, "p")
    info.write_text(info.read_text().replace("max: 9.0", "max: 8.0", 1))
    assert before is not None and ext._cache_path(pa, "p") != before


def test_unproject_invalid_points_are_zero() -> None:
    depth = np.array([[1.0, 0.0], [np.nan, -2.0]], dtype=np.float32)
    xyz, valid = unproject(depth, focal=2.0)
    assert valid.tolist() == [[True, False], [False, False]]
    assert np.all(xyz[~valid] == 0) and np.isfinite(xyz).all()
    np.testing.assert_allclose(xyz[0, 0], [(0 - 1) * 1.0 / 2, (0 - 1) * 1.0 / 2, 1.0])
    q = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(dequantise_depth(q, 2.0, 4.0, 0.5), [[1.0, 2.0]])


# --- errors name the file ------------------------------------------------------------------

def test_missing_and_unpaired_files_are_problems(tree) -> None:
    data = tree.category / "train" / "data"
    (data / "001_info_depth.yaml").unlink()
    (data / "002_image_4.png").unlink()
    cat = EyecandiesCategory(tree.category)
    refs, problems = cat.scan("train")
    assert [r.stem for r in refs] == ["000"]
    paths = {p.path for p in problems}
    assert paths == {data / "001_info_depth.yaml", data / "002_image_4.png"}
    assert all("missing" in p.problem for p in problems)
    with pytest.raises(DataError) as err:
        cat.refs("train")
    assert err.value.path in paths
    # Another lighting still pairs.
    assert len(EyecandiesCategory(tree.category, EyecandiesOptions(light=1)).scan("train")[0]) == 2
    test = tree.category / "test_public" / "data"
    (test / "03_mask.png").unlink()
    (test / "01_metadata.yaml").unlink()
    refs, problems = cat.scan("test")
    assert {p.path for p in problems} == {test / "03_mask.png", test / "01_metadata.yaml"}
    assert "03" not in {r.stem for r in refs} and "01" not in {r.stem for r in refs}
    (test / "00_mask.png").unlink()  # a normal sample may lack its mask: gt all zero
    s = cat.load(next(r for r in cat.scan("test")[0] if r.stem == "00"))
    assert s.label == 0 and not s.gt.any() and s.paths.gt is None


def test_bad_yaml_and_bad_images_name_the_file(tree) -> None:
    data = tree.category / "train" / "data"
    cat = EyecandiesCategory(tree.category)
    refs = cat.refs("train")
    (data / "000_info_depth.yaml").write_text("normalization:\n  min: low\n  max: 1.0\n")
    with pytest.raises(DataError, match="normalization") as err:
        cat.load(refs[0])
    assert err.value.path == data / "000_info_depth.yaml"
    (data / "000_info_depth.yaml").write_text("normalization: [unclosed\n")
    with pytest.raises(DataError, match="unreadable YAML") as err:
        cat.load(refs[0])
    assert err.value.path == data / "000_info_depth.yaml"
    (data / "001_depth.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="unreadable image") as err:
        cat.load(refs[1])
    assert err.value.path == data / "001_depth.png"
    Image.fromarray(np.zeros(SIZE, dtype=np.uint8)).save(data / "002_depth.png")
    with pytest.raises(DataError, match="16-bit grey depth PNG") as err:
        cat.load(refs[2])
    assert err.value.path == data / "002_depth.png"
    Image.fromarray(np.full(SIZE, 1000, dtype=np.uint16)).save(data / "002_depth.png")
    assert cat.load(refs[2]).xyz[:, :, 2].min() > 0
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(data / "002_image_4.png")
    with pytest.raises(DataError, match="differs from") as err:
        cat.load(refs[2])
    assert err.value.path == data / "002_depth.png"
    (data / "002_image_4.png").write_bytes(b"")
    with pytest.raises(DataError, match="unreadable image") as err:
        cat.load(refs[2])
    assert err.value.path == data / "002_image_4.png"
    test = tree.category / "test_public" / "data"
    (test / "02_metadata.yaml").write_text("anomalous: 0\nanomalous_bumps: 1\n")
    (test / "03_metadata.yaml").write_text("anomalous: maybe\n")
    (test / "04_metadata.yaml").write_text("kind: bumps\n")
    refs, problems = cat.scan("test")
    by_path = {p.path.name: p.problem for p in problems}
    assert set(by_path) == {"02_metadata.yaml", "03_metadata.yaml", "04_metadata.yaml"}
    assert "defect kinds bumps" in by_path["02_metadata.yaml"]
    assert "0 or 1" in by_path["03_metadata.yaml"]
    assert "'anomalous" in by_path["04_metadata.yaml"]


def test_info_on_eyecandies(eyecandies_root: Path, tmp_path: Path) -> None:
    info = dataset_info(eyecandies_root)
    assert info == {"categories": {"CandyLike": {
        "splits": {"train": 3, "validation": 2, "test": len(TEST_PLAN)},
        "defect_types": ["anomalous", "bumps", "combined", "dents"],
        "modalities": ["rgb", "xyz"], "image_sizes": [[56, 40]], "problems": []}}}
    assert "no problems found" in format_info(info)
    root = tmp_path / "copy"
    shutil.copytree(eyecandies_root, root)
    data = root / "CandyLike" / "val" / "data"
    (data / "01_info_depth.yaml").write_text("normalization: {}\n")
    (data / "00_image_4.png").unlink()
    cat_info = dataset_info(root)["categories"]["CandyLike"]
    assert cat_info["splits"]["validation"] == 1
    assert any(str(data / "01_info_depth.yaml") in p for p in cat_info["problems"])
    assert any(str(data / "00_image_4.png") in p for p in cat_info["problems"])


def test_source_is_never_modified(eyecandies_root: Path) -> None:
    before = snapshot(eyecandies_root)
    ds = open_dataset(eyecandies_root)
    for cat in ds:
        for split in cat.splits:
            cat.samples(split)
    dataset_info(eyecandies_root)
    assert snapshot(eyecandies_root) == before
