"""A tiny tree in the Eyecandies layout for tests (imported by conftest:
`from fixture_eyecandies import *`).

Files as Eyecandies ships them: `<split>/data/NNN_image_0..5.png`, a 16-bit `NNN_depth.png`
with its `NNN_info_depth.yaml` (normalization min/max), `NNN_normals.png`, `NNN_pose.txt`,
and outside test_private `NNN_mask.png`, the four per-kind masks, `NNN_metadata.yaml` and
`NNN_object_params.yaml`. Stems are 3 digits in train and test_private, 2 in val and
test_public, as in the real data. The scene, in the renders' nominal metres: a conveyor plane
tilted by 45 degrees about 3.2 m from the camera with a dome-shaped candy on it; bumps raise
and dents lower the candy's surface; colour and normal defects only change the images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

__all__ = ["EyecandiesTree", "TEST_PLAN", "eyecandies_root", "make_eyecandies_tree",
           "plane_depth"]

FOCAL = 711.11
PLANE_C = 0.7071067811865476 * 3.2  # the plane 0.7071 (y + z) = PLANE_C
KINDS = ("bumps", "dents", "colors", "normals")
# test_public: stem -> defect kinds set in the metadata (None: a normal sample);
# "anomalous" alone means the flag without any kind.
TEST_PLAN: dict[str, tuple[str, ...] | None] = {
    "00": None, "01": None, "02": ("bumps",), "03": ("dents",),
    "04": ("colors", "normals"), "05": ("anomalous",),
}
POSE = np.array([[1.0, 0.0, 0.0, 0.0],
                 [0.0, 0.7071067811865475727, -0.7071067811865474617, -2.121320343559642385],
                 [0.0, 0.7071067811865474617, 0.7071067811865475727, 2.221320343559642918],
                 [0.0, 0.0, 0.0, 1.0]])


@dataclass
class EyecandiesTree:
    """The category folder and, per (split folder, stem), the depth that was quantised and
    the defect mask that was written."""

    category: Path
    depth: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    mask: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def plane_depth(h: int, w: int, focal: float = FOCAL) -> np.ndarray:
    """z-depth (H, W) of the conveyor plane 0.7071 (y + z) = PLANE_C in the camera frame."""
    ry = (np.arange(h, dtype=np.float64) - h / 2) / focal
    return np.repeat((PLANE_C / (0.7071067811865476 * (ry + 1.0)))[:, None], w, axis=1)


def _discs(h: int, w: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    v, u = np.mgrid[0:h, 0:w]
    out = []
    for k in range(n):
        angle = 2 * np.pi * k / max(n, 1) + rng.uniform(0, 0.4)
        row, col = h / 2 + 0.15 * h * np.sin(angle), w / 2 + 0.15 * w * np.cos(angle)
        out.append((v - row) ** 2 + (u - col) ** 2 <= (0.08 * min(h, w)) ** 2)
    return out


def _write_yaml(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_sample(data: Path, stem: str, h: int, w: int, rng: np.random.Generator,
                  kinds: tuple[str, ...] | None, public: bool, tree: EyecandiesTree) -> None:
    v, u = np.mgrid[0:h, 0:w]
    r2 = ((u - w / 2) / (0.3 * w)) ** 2 + ((v - h / 2) / (0.3 * h)) ** 2
    height = 0.3 * np.sqrt(np.clip(1.0 - r2, 0.0, None))  # the candy: 0.3 nominal m high
    kinds = kinds or ()
    real = [k for k in kinds if k in KINDS]
    regions = dict(zip(real, _discs(h, w, len(real), rng)))
    if kinds == ("anomalous",):
        regions["anomalous"] = _discs(h, w, 1, rng)[0]
    if "bumps" in regions:
        height = height + 0.04 * regions["bumps"]
    if "dents" in regions:
        height = height - 0.04 * regions["dents"]
    depth = plane_depth(h, w) - height + rng.normal(0.0, 0.0005, size=(h, w))
    lo, hi = float(depth.min()), float(depth.max())
    q = np.rint((depth - lo) / (hi - lo) * 65535).astype(np.uint16)
    Image.fromarray(q).save(data / f"{stem}_depth.png")
    _write_yaml(data / f"{stem}_info_depth.yaml",
                f"normalization:\n  max: {hi!r}\n  min: {lo!r}\n")
    base = np.empty((h, w, 3), dtype=np.float64)
    base[:] = (60.0, 90.0, 60.0)
    obj = height > 0
    base[obj] = (200.0, 60.0, 190.0)
    if "colors" in regions:
        base[regions["colors"]] = (30.0, 200.0, 40.0)
    base += rng.normal(0, 3.0, size=base.shape)
    for k in range(6):
        img = np.clip(np.rint(base * (0.5 + 0.1 * k) + 5 * k), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(data / f"{stem}_image_{k}.png")
    gy, gx = np.gradient(height)
    normals = np.stack([-gx, -gy, np.ones_like(gx)], axis=2)
    if "normals" in regions:
        normals[regions["normals"]] += (0.5, 0.0, 0.0)
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    Image.fromarray(np.rint((normals + 1) * 127.5).astype(np.uint8)).save(
        data / f"{stem}_normals.png")
    np.savetxt(data / f"{stem}_pose.txt", POSE)
    tree.depth[(data.parent.name, stem)] = depth
    if not public:
        return
    union = np.zeros((h, w), dtype=bool)
    for kind in KINDS:
        m = regions.get(kind, np.zeros((h, w), dtype=bool))
        union |= m
        Image.fromarray(m.astype(np.uint8) * 255).save(data / f"{stem}_{kind}_mask.png")
    union |= regions.get("anomalous", np.zeros((h, w), dtype=bool))
    Image.fromarray(union.astype(np.uint8) * 255).save(data / f"{stem}_mask.png")
    tree.mask[(data.parent.name, stem)] = union
    flags = "".join(f"anomalous_{k}: {int(k in kinds)}\n" for k in KINDS)
    _write_yaml(data / f"{stem}_metadata.yaml", f"anomalous: {int(bool(kinds))}\n{flags}")
    _write_yaml(data / f"{stem}_object_params.yaml",
                f"scene:\n  Seed: {int(rng.integers(0, 1000))}\nobject:\n  Flip: true\n")


def make_eyecandies_tree(root: Path, category: str = "CandyLike", size: tuple[int, int] = (40, 56),
                         n_train: int = 3, n_val: int = 2, n_private: int = 2,
                         seed: int = 0) -> EyecandiesTree:
    """Build `root/category` in the Eyecandies layout. size is (H, W). test_public holds the
    samples of `TEST_PLAN`."""
    h, w = size
    rng = np.random.default_rng(seed)
    tree = EyecandiesTree(Path(root) / category)
    plan: list[tuple[str, str, tuple[str, ...] | None, bool]] = []
    plan += [("train", f"{i:03d}", None, True) for i in range(n_train)]
    plan += [("val", f"{i:02d}", None, True) for i in range(n_val)]
    plan += [("test_public", stem, kinds, True) for stem, kinds in TEST_PLAN.items()]
    plan += [("test_private", f"{i:03d}", None, False) for i in range(n_private)]
    for folder, stem, kinds, public in plan:
        data = tree.category / folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        _write_sample(data, stem, h, w, rng, kinds, public, tree)
    return tree


@pytest.fixture(scope="session")
def eyecandies_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset root holding one Eyecandies category, `CandyLike` (56 x 40 W x H). Do not
    modify."""
    root = tmp_path_factory.mktemp("eyecandies")
    make_eyecandies_tree(root)
    return root
