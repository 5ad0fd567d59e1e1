"""A tiny MVTec 3D-AD shaped tree for tests (imported by conftest: `from fixture_mvtec import *`).

The scene: a tilted background plane about 0.6 m from the camera with a dome-shaped
object (30 mm high) in the middle, scattered all-zero points, NaN/inf points in one file,
defects as dents in the dome with their own gt values (253-255, as in class_ids.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

__all__ = ["CLASS_IDS", "make_mvtec_like_tree", "mvtec_like_root", "scene_xyz"]

CLASS_IDS = {"good": 0, "crack": 255, "cut": 254, "hole": 253}
SCENE_WIDTH_M = 0.24
DOME_HEIGHT_M = 0.03


def scene_xyz(h: int, w: int, rng: np.random.Generator,
              dents: list[tuple[float, float, float]] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xyz float32 (h, w, 3) of the plane + dome scene, the dome mask (height > 8 mm),
    and the height map in metres. `dents` are (row, col, radius) in pixels: 4 mm deep."""
    pitch = SCENE_WIDTH_M / w
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    x = (u - w / 2) * pitch
    y = (v - h / 2) * pitch
    plane = 0.6 + 0.15 * x + 0.08 * y
    r2 = ((u - w / 2) / (0.3 * w)) ** 2 + ((v - h / 2) / (0.3 * h)) ** 2
    height = DOME_HEIGHT_M * np.sqrt(np.clip(1.0 - r2, 0.0, None))
    for row, col, rad in dents or []:
        inside = (v - row) ** 2 + (u - col) ** 2 <= rad ** 2
        height = np.where(inside & (height > 0), np.maximum(height - 0.004, 0.0), height)
    z = plane - height + rng.normal(0.0, 0.0003, size=(h, w))
    xyz = np.stack([x, y, z], axis=2).astype(np.float32)
    return xyz, height > 0.008, height


def _rgb(height: np.ndarray, rng: np.random.Generator,
         defect: np.ndarray | None) -> np.ndarray:
    h, w = height.shape
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = (90.0, 92.0, 95.0)
    shade = np.clip(height / DOME_HEIGHT_M, 0, 1)[:, :, None]
    obj = height[:, :, None] > 0
    img = np.where(obj, np.array([170.0, 115.0, 60.0]) * (0.6 + 0.4 * shade), img)
    if defect is not None:
        img[defect] = (40.0, 30.0, 25.0)
    img += rng.normal(0, 4.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_sample(folder: Path, stem: str, h: int, w: int, rng: np.random.Generator,
                  modalities: tuple[str, ...], gt: bool, gt_regions: list[int],
                  nan_points: bool) -> None:
    dents: list[tuple[float, float, float]] = []
    values: list[int] = []
    for k, value in enumerate(gt_regions):
        angle = 2 * np.pi * (k / max(len(gt_regions), 1)) + rng.uniform(0, 0.5)
        row = h / 2 + 0.12 * h * np.sin(angle)
        col = w / 2 + 0.12 * w * np.cos(angle)
        dents.append((row, col, max(2.0, 0.04 * min(h, w))))
        values.append(value)
    xyz, _, height = scene_xyz(h, w, rng, dents)
    mask = np.zeros((h, w), dtype=np.uint8)
    v, u = np.mgrid[0:h, 0:w]
    for (row, col, rad), value in zip(dents, values):
        mask[(v - row) ** 2 + (u - col) ** 2 <= rad ** 2] = value
    specks = rng.random((h, w)) < 0.01
    xyz[specks] = 0.0
    if nan_points:
        xyz[1, 1] = np.nan
        xyz[2, 3, 0] = np.nan
        xyz[h - 2, w - 3] = np.inf
    if "rgb" in modalities:
        (folder / "rgb").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(height, rng, mask > 0 if values else None)).save(
            folder / "rgb" / f"{stem}.png")
    if "xyz" in modalities:
        (folder / "xyz").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", xyz, photometric="rgb")
    if gt:
        (folder / "gt").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(folder / "gt" / f"{stem}.png")


def make_mvtec_like_tree(
    root: Path,
    category: str = "tire_like",
    size: tuple[int, int] = (800, 600),
    n_train: int = 2,
    n_validation: int = 1,
    n_test_good: int = 2,
    defects: dict[str, list[int]] | None = None,
    modalities: tuple[str, ...] = ("rgb", "xyz"),
    seed: int = 0,
) -> Path:
    """Build `root/category` in the MVTec 3D-AD layout and return the category folder.

    size is (H, W): the default (800, 600) is tire's 600 x 800 (W x H). `defects` maps a
    test folder to the gt values of its regions, one sample each (default: `crack` with
    one region of 255, `combined` with regions of 254 and 253). The file train/good/000
    holds NaN and inf points; every cloud has ~1% all-zero points. test/good has all-zero
    gt masks, as in the real dataset.
    """
    h, w = size
    defects = {"crack": [255], "combined": [254, 253]} if defects is None else defects
    rng = np.random.default_rng(seed)
    cat = Path(root) / category
    cat.mkdir(parents=True, exist_ok=True)
    (cat / "class_ids.json").write_text(json.dumps(CLASS_IDS))
    (cat / "calibration").mkdir(exist_ok=True)
    (cat / "calibration" / "camera_parameters.json").write_text(
        json.dumps({"focus": 1000.0, "cx": w / 2, "cy": h / 2}))
    (cat / "readme.txt").write_text("synthetic test data\n")
    (cat / "license.txt").write_text("CC0\n")
    plan: list[tuple[str, str, int, list[int]]] = [
        ("train", "good", n_train, []),
        ("validation", "good", n_validation, []),
        ("test", "good", n_test_good, []),
    ]
    plan += [("test", name, 1, values) for name, values in defects.items()]
    for split, folder, count, values in plan:
        for i in range(count):
            _write_sample(cat / split / folder, f"{i:03d}", h, w, rng, modalities,
                          gt=split == "test", gt_regions=values,
                          nan_points=(split == "train" and i == 0))
    return cat


@pytest.fixture(scope="session")
def mvtec_like_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset root holding one category, `tire_like` (600 x 800 W x H). Do not modify."""
    root = tmp_path_factory.mktemp("mvtec_like")
    make_mvtec_like_tree(root)
    return root
