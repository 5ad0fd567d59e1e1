"""The synthetic data generator: layout, determinism, point-cloud realism, defect semantics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from cmad import synth
from cmad.errors import ConfigError, DataError
from cmad.report.montage import montage

SPLIT_FOLDERS = {"train": ["good"], "validation": ["good"],
                 "test": ["good", *synth.DEFECT_TYPES, "combined"]}


def _category_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stems(folder: Path, ext: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*.{ext}"))


def test_presets_and_categories() -> None:
    assert len(synth.CATEGORY_NAMES) >= 5
    assert set(synth.SIZES) == {"tiny", "small", "demo", "default", "mvtec"}
    for preset in synth.SIZES.values():
        assert preset["train"] > 0 and preset["test_per_defect"] > 0
    assert synth.CLASS_IDS["good"] == 0
    assert sorted(v for k, v in synth.CLASS_IDS.items() if k != "good") == list(
        range(256 - len(synth.DEFECT_TYPES), 256))


def test_mvtec_preset_has_real_size_splits_and_the_same_defect_mix() -> None:
    from cmad.synth.presets import sample_plan

    def test_folders(size: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for split, folder, _ in sample_plan(synth.SIZES[size]):
            if split == "test":
                counts[folder] = counts.get(folder, 0) + 1
        return counts

    plan = sample_plan(synth.SIZES["mvtec"])
    assert sum(split == "train" for split, _, _ in plan) == 250
    assert sum(split == "validation" for split, _, _ in plan) == 25
    mvtec, default = test_folders("mvtec"), test_folders("default")
    assert sum(mvtec.values()) == 100
    assert set(mvtec) == set(default) == {"good", "combined", *synth.DEFECT_TYPES}
    # every defect folder equally often, as in the default preset
    assert len({n for f, n in mvtec.items() if f != "good"}) == 1
    assert synth.SIZES["mvtec"]["scale"] == synth.SIZES["default"]["scale"]


def test_layout(tiny_root: Path) -> None:
    cats = _category_dirs(tiny_root)
    assert [c.name for c in cats] == sorted(synth.CATEGORY_NAMES[:2])
    sizes = set()
    for cat in cats:
        ids = json.loads((cat / "class_ids.json").read_text())
        assert ids == synth.CLASS_IDS
        cam = json.loads((cat / "calibration" / "camera_parameters.json").read_text())
        assert {"fx", "fy", "cx", "cy", "image_width", "image_height"} <= set(cam)
        assert "synthetic" in (cat / "readme.txt").read_text().lower()
        assert (cat / "license.txt").is_file()
        assert sorted(p.name for p in cat.iterdir() if p.is_dir()) == [
            "calibration", "test", "train", "validation"]
        for split, folders in SPLIT_FOLDERS.items():
            assert sorted(p.name for p in (cat / split).iterdir()) == sorted(folders)
            for folder in folders:
                d = cat / split / folder
                stems = _stems(d / "rgb", "png")
                assert stems == [f"{i:03d}" for i in range(len(stems))] and stems
                assert _stems(d / "xyz", "tiff") == stems
                if split == "test":
                    assert _stems(d / "gt", "png") == stems
                else:
                    assert not (d / "gt").exists()
                for stem in stems:
                    rgb_img = Image.open(d / "rgb" / f"{stem}.png")
                    assert rgb_img.mode == "RGB"
                    w, h = rgb_img.size
                    assert w != h
                    sizes.add((w, h))
                    xyz = tifffile.imread(d / "xyz" / f"{stem}.tiff")
                    assert xyz.dtype == np.float32 and xyz.shape == (h, w, 3)
                    if split != "test":
                        continue
                    gt_img = Image.open(d / "gt" / f"{stem}.png")
                    assert gt_img.mode == "L" and gt_img.size == (w, h)
                    values = set(np.unique(np.asarray(gt_img)).tolist())
                    if folder == "good":
                        assert values == {0}
                    elif folder == "combined":
                        nonzero = values - {0}
                        assert len(nonzero) >= 2
                        assert nonzero <= {ids[t] for t in synth.DEFECT_TYPES}
                    else:
                        assert values == {0, ids[folder]}
    assert len(sizes) >= 2   # categories differ in image size


def test_point_clouds_are_plausible(tiny_root: Path) -> None:
    for xyz_path in sorted(tiny_root.glob("*/*/*/xyz/*.tiff")):
        xyz = tifffile.imread(xyz_path)
        assert np.isfinite(xyz).all()
        zero = xyz == 0
        invalid = zero.all(axis=2)
        # a point is either exactly (0, 0, 0) or a real point with non-zero depth
        assert not (zero[..., 2] & ~invalid).any()
        assert 0.001 < invalid.mean() < 0.4, xyz_path
        z = xyz[..., 2][~invalid]
        assert 0.33 < z.min() and z.max() < 0.47, xyz_path
        # a tilted table plus a part a few centimetres tall
        assert 0.008 < z.max() - z.min() < 0.06, xyz_path


def test_depth_noise_is_sub_millimetre() -> None:
    r = synth.render_sample("gland", None, seed=3, size="small")
    xyz = r.xyz
    # a patch of table in a corner (the part is in the middle): residual of a plane fit
    patch = xyz[4:16, 4:20].reshape(-1, 3).astype(np.float64)
    patch = patch[np.any(patch != 0, axis=1)]
    a = np.c_[patch[:, :2], np.ones(len(patch))]
    coef, *_ = np.linalg.lstsq(a, patch[:, 2], rcond=None)
    resid = patch[:, 2] - a @ coef
    assert 0.00005 < resid.std() < 0.0005


def test_determinism(tmp_path: Path, tiny_root: Path) -> None:
    again = synth.generate(tmp_path / "again", size="tiny", seed=0, progress=False)
    files = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synth.generate(tmp_path / "other", categories=["gland"], size="tiny", seed=1,
                           progress=False)
    rel = Path("gland/train/good/rgb/000.png")
    assert (other / rel).read_bytes() != (tiny_root / rel).read_bytes()


def test_regenerate_replaces_only_synthetic(tmp_path: Path) -> None:
    out = synth.generate(tmp_path, categories=["rope"], size="tiny", seed=0, progress=False)
    stale = out / "rope" / "train" / "good" / "rgb" / "999.png"
    stale.write_bytes(b"x")
    synth.generate(tmp_path, categories=["rope"], size="tiny", seed=0, progress=False)
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    foreign = tmp_path / "gland"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="refusing"):
        synth.generate(tmp_path, categories=["gland"], size="tiny", progress=False)
    assert (foreign / "mine.txt").read_text() == "user data"


def test_train_option_sets_the_training_samples(tmp_path: Path, tiny_root: Path) -> None:
    out = synth.generate(tmp_path, categories=["gland"], size="tiny", seed=0, train=7,
                         progress=False)
    cat = out / "gland"
    want = [f"{i:03d}" for i in range(7)]
    assert _stems(cat / "train" / "good" / "rgb", "png") == want
    assert _stems(cat / "train" / "good" / "xyz", "tiff") == want
    # the other splits keep the preset's counts, and the preset's training samples are unchanged
    for rel in ["validation/good/rgb", "test/good/rgb", "test/combined/gt"]:
        assert _stems(cat / rel, "png") == _stems(tiny_root / "gland" / rel, "png"), rel
    for i in range(synth.SIZES["tiny"]["train"]):
        rel = Path(f"gland/train/good/xyz/{i:03d}.tiff")
        assert (out / rel).read_bytes() == (tiny_root / rel).read_bytes(), rel
    assert "7 training samples" in (cat / "readme.txt").read_text()
    from cmad.data.info import dataset_info

    info = dataset_info(out)["categories"]["gland"]
    assert info["problems"] == [] and info["splits"]["train"] == 7


def test_cli_train_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cmad.cli import app

    runner = CliRunner()
    out = tmp_path / "syn"
    r = runner.invoke(app, ["synth", "--out", str(out), "--preset", "tiny", "--categories", "1",
                            "--train", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    cat = out / synth.CATEGORY_NAMES[0]
    assert _stems(cat / "train" / "good" / "rgb", "png") == [f"{i:03d}" for i in range(5)]
    r = runner.invoke(app, ["synth", "--out", str(tmp_path / "bad"), "--preset", "tiny",
                            "--train", "0", "--quiet"])
    assert r.exit_code == 2 and "train" in r.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("train", [0, -1, 1000, 2.5, True, "7"])
def test_train_option_rejects_bad_counts(tmp_path: Path, train: object) -> None:
    with pytest.raises(ConfigError, match="train"):
        synth.generate(tmp_path, categories=["gland"], size="tiny", train=train, progress=False)
    assert not list(tmp_path.iterdir())


def test_synth_imports_only_data_types_errors_and_progress() -> None:
    """cmad.synth sits beside the data readers: it may use cmad.data, cmad.types and
    cmad.errors, never the layers above (features, model, report, ...)."""
    import ast

    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    pkg = Path(synth.__file__).parent
    modules = sorted(pkg.glob("*.py"))
    assert {"__init__.py", "writer.py", "render.py"} <= {m.name for m in modules}
    found: dict[str, set[str]] = {}
    for mod in modules:
        for node in ast.walk(ast.parse(mod.read_text(), str(mod))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # `from cmad import report` imports cmad.report: name every imported member
                parts = ["cmad", "synth"][:max(0, 3 - node.level)] if node.level else []
                base = ".".join([*parts, *([node.module] if node.module else [])])
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found.setdefault(mod.name, set()).update(n for n in names if within(n, "cmad"))
    used = set().union(*found.values())
    assert any(within(n, "cmad.data.io") for n in used)   # the scan sees the imports
    for layer in ("cmad.features", "cmad.model", "cmad.report"):
        assert not [n for n in used if within(n, layer)], found
    allowed = ("cmad.synth", "cmad.data", "cmad.types", "cmad.errors", "cmad.progress")
    assert [n for n in used if not any(within(n, a) for a in allowed)] == [], found


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        synth.generate(tmp_path, categories=["nope"], size="tiny", progress=False)
    with pytest.raises(ConfigError):
        synth.generate(tmp_path, size="huge", progress=False)
    with pytest.raises(ConfigError):
        synth.generate(tmp_path, categories=0, size="tiny", progress=False)
    with pytest.raises(ConfigError):
        synth.render_sample("gland", "scratch")


def _pair(category: str, defect: str, seed: int = 0) -> tuple[synth.Rendered, synth.Rendered]:
    with_d = synth.render_sample(category, defect, seed=seed, size="small")
    without = synth.render_sample(category, defect, seed=seed, size="small", with_defect=False)
    return with_d, without


def _rgb_diff(a: synth.Rendered, b: synth.Rendered) -> np.ndarray:
    return np.abs(a.rgb.astype(np.int32) - b.rgb.astype(np.int32)).max(axis=2)


def _z_diff(a: synth.Rendered, b: synth.Rendered) -> tuple[np.ndarray, np.ndarray]:
    both = np.any(a.xyz != 0, axis=2) & np.any(b.xyz != 0, axis=2)
    return np.abs(a.xyz[..., 2] - b.xyz[..., 2]), both


@pytest.mark.parametrize("category", ["gland", "cookie"])
def test_stain_changes_colour_only(category: str) -> None:
    d, clean = _pair(category, "stain")
    gt = d.gt > 0
    assert set(np.unique(d.gt).tolist()) == {0, synth.CLASS_IDS["stain"]}
    assert not clean.gt.any()
    np.testing.assert_array_equal(d.xyz, clean.xyz)
    diff = _rgb_diff(d, clean)
    assert diff[gt].mean() > 12
    # the colour change stays within the gt up to the lens blur (2 px) and sampling (1 px)
    near = ndimage.binary_dilation(gt, iterations=4)
    assert diff[~near].max() == 0


@pytest.mark.parametrize("category", ["rope", "cookie", "tire"])
def test_dent_changes_geometry_and_only_shading(category: str) -> None:
    """On matte parts a dent barely shows in colour (on metal its highlight moves more)."""
    d, clean = _pair(category, "dent")
    gt = d.gt > 0
    dz, both = _z_diff(d, clean)
    assert dz[gt & both].max() > 0.0004          # at least 0.4 mm deep somewhere
    assert dz[gt & both].max() < 0.0016
    near = ndimage.binary_dilation(gt, iterations=3)
    assert (d.xyz[~near] == clean.xyz[~near]).all(axis=1).mean() > 0.995
    # subtle in colour: far less than a stain of the same part
    stain, stain_clean = _pair(category, "stain")
    dent_rgb = _rgb_diff(d, clean)[gt].mean()
    stain_rgb = _rgb_diff(stain, stain_clean)[stain.gt > 0].mean()
    assert dent_rgb < 0.4 * stain_rgb


@pytest.mark.parametrize("defect", ["hole", "cut", "contamination"])
def test_geometric_and_colour_defects_change_both(defect: str) -> None:
    d, clean = _pair("gland", defect, seed=1)
    gt = d.gt > 0
    assert set(np.unique(d.gt).tolist()) == {0, synth.CLASS_IDS[defect]}
    dz, both = _z_diff(d, clean)
    valid_d = np.any(d.xyz != 0, axis=2)
    valid_c = np.any(clean.xyz != 0, axis=2)
    changed_geom = (dz[gt & both] > 0.0003).mean() + (valid_d != valid_c)[gt].mean()
    assert changed_geom > 0.2
    assert _rgb_diff(d, clean)[gt].mean() > 8


def test_defect_area_fraction(small_root: Path) -> None:
    fractions = []
    for gt_path in sorted(small_root.glob("*/test/*/gt/*.png")):
        if gt_path.parent.parent.name == "good":
            continue
        gt = np.asarray(Image.open(gt_path)) > 0
        fractions.append(gt.mean())
    fractions = np.array(fractions)
    assert len(fractions) >= 12
    assert fractions.min() >= 0.0006 and fractions.max() <= 0.035
    assert np.median(fractions) > 0.001


def test_gt_marks_the_object_not_the_table() -> None:
    r = synth.render_sample("rope", "combined", seed=2, size="small")
    clean = synth.render_sample("rope", "combined", seed=2, size="small", with_defect=False)
    assert len(set(np.unique(r.gt).tolist()) - {0}) >= 2
    # defects sit on the part: well above the table (z smaller than the table around them)
    valid = np.any(clean.xyz != 0, axis=2)
    table_z = np.median(clean.xyz[..., 2][valid][:200])
    gt = (r.gt > 0) & valid
    assert np.median(clean.xyz[..., 2][gt]) < table_z - 0.004


def test_montage(tiny_root: Path, tmp_path: Path) -> None:
    out = montage(tiny_root, tmp_path / "m.png", per_category=2)
    img = Image.open(out)
    assert img.size[0] > 300 and img.size[1] > 300


def test_data_layer_reads_it_without_problems(tiny_root: Path) -> None:
    from cmad.data.info import dataset_info

    info = dataset_info(tiny_root)
    assert sorted(info["categories"]) == sorted(synth.CATEGORY_NAMES[:2])
    for cat in info["categories"].values():
        assert cat["problems"] == []
        assert cat["splits"] == {"train": 4, "validation": 2, "test": 8}
