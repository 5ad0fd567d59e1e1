"""The Eyecandies layout (Bonfiglioli et al., ACCV 2022), read as shipped, into `Sample`s.

```
<root>/<Category>/{train,val,test_public,test_private}/data/
    NNN_image_0.png ... NNN_image_5.png   8-bit RGB, one per lighting (0: all spotlights,
                                          1 bottom, 2 right, 3 top, 4 left, 5 global light)
    NNN_depth.png                         16-bit grey, depth quantised to 0..65535
    NNN_info_depth.yaml                   normalization: {min: .., max: ..}, in the renders'
                                          nominal metres
    NNN_normals.png, NNN_pose.txt         (not used)
    NNN_mask.png                          union of the defect masks (not in test_private)
    NNN_metadata.yaml                     anomalous: 0|1, anomalous_<kind>: 0|1
```

Splits: train -> "train", val -> "validation", test_public -> "test". test_private has no
ground truth and is skipped (one log line). Stems are the numeric prefixes (their width
differs between splits, e.g. 000 in train, 00 in val) and pair the files of one sample;
a sample lacking a file it needs is a `DataError` naming the missing file.

Depth is de-quantised as `q / 65535 * (max - min) + min` (the Eyecandies documentation) and
unprojected with the dataset's pinhole camera (focal length 711.11 px, principal point at
(W/2, H/2), pixel (u, v) = (column, row)) into an organized cloud in the CAMERA frame:
x right, y down, z = depth along the optical axis (channel 2, as in MVTec 3D-AD). The pose
file is not needed for that. The renders' nominal metres are scaled by `depth_scale`, 0.1 by
default as M3DM's Eyecandies preprocessing does (and CFM, which uses it): a candy is then
about 8 cm across, 0.3 m from the camera, so metric parameters tuned on MVTec 3D-AD (plane
threshold, FPFH radii) keep their meaning. Use `depth_scale=1.0` for the units as shipped.

RGB is `image_4` (left spotlight) by default, the image M3DM's preprocessing copies as the
RGB input (CFM and the BTF / M3DM Eyecandies numbers in those papers use that data); the
Eyecandies authors' own anomalib export uses `image_5`. `EyecandiesOptions.light` picks it.

Labels and defect types come from the metadata: not anomalous -> "good"; one
`anomalous_<kind>` set -> that kind (bumps, dents, colors, normals); several -> "combined"
(as MVTec 3D-AD names samples with several defects); anomalous without a kind ->
"anomalous". gt is `mask > 0`, gt_values the raw mask. Nothing is ever written.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cmad.data.io import clean_cloud, read_rgb, read_sample_gt
from cmad.errors import ConfigError, DataError
from cmad.progress import progress as progress_bar
from cmad.types import Sample, SamplePaths

logger = logging.getLogger(__name__)

__all__ = [
    "FOCAL_LENGTH",
    "FOLDERS",
    "EyecandiesCategory",
    "EyecandiesDataset",
    "EyecandiesOptions",
    "EyecandiesRef",
    "dequantise_depth",
    "is_eyecandies_category",
    "read_depth_info",
    "read_metadata",
    "unproject",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
FOLDERS: dict[str, str] = {"train": "train", "validation": "val", "test": "test_public"}
PRIVATE = "test_private"
FOCAL_LENGTH = 711.11
DEPTH_LEVELS = 65535
N_LIGHTS = 6
NORMAL = "good"
COMBINED = "combined"
ANOMALOUS = "anomalous"
_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.(png|yaml|txt)$")
_KIND_PREFIX = "anomalous_"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class EyecandiesOptions:
    """How Eyecandies files become a `Sample`: which lighting is RGB, the depth scale
    (metres per nominal render unit) and the camera's focal length in pixels."""

    light: int = 4
    depth_scale: float = 0.1
    focal_length: float = FOCAL_LENGTH

    def __post_init__(self) -> None:
        if isinstance(self.light, bool) or not isinstance(self.light, int) \
                or not 0 <= self.light < N_LIGHTS:
            raise ConfigError(f"Eyecandies light must be an image index 0..{N_LIGHTS - 1}, "
                              f"got {self.light!r}")
        for name in ("depth_scale", "focal_length"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"Eyecandies {name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class EyecandiesRef:
    """Where one Eyecandies sample's files are, before anything is read. `xyz_path` is the
    depth PNG, `gt_path` the union mask (None for normal samples without one)."""

    category: str
    split: str
    defect_type: str
    stem: str
    rgb_path: Path
    xyz_path: Path
    info_path: Path
    gt_path: Path | None
    label: int

    @property
    def key(self) -> str:
        """category/split/defect_type/stem, as `Sample.key`."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"

    @property
    def paths(self) -> SamplePaths:
        return SamplePaths(rgb=self.rgb_path, xyz=self.xyz_path, gt=self.gt_path)


def _data_dir(category: Path, folder: str) -> Path:
    return category / folder / "data"


def _has_sample_file(data_dir: Path) -> bool:
    try:
        with os.scandir(data_dir) as it:
            for entry in it:
                m = _FILE.match(entry.name)
                if m and (m.group(2) == "depth" or m.group(2).startswith("image_")):
                    return True
    except OSError:
        return False
    return False


def is_eyecandies_category(folder: Path) -> bool:
    """True if one of train/, val/, test_public/ or test_private/ holds a data/ folder
    with an `NNN_depth.png` or `NNN_image_K.png`."""
    folder = Path(folder)
    return folder.is_dir() and any(
        _has_sample_file(_data_dir(folder, f)) for f in (*FOLDERS.values(), PRIVATE))


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_Loader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise DataError(path, f"unreadable YAML ({type(exc).__name__}: {exc})") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_depth_info(path: str | Path) -> tuple[float, float]:
    """(min, max) depth from an `NNN_info_depth.yaml` (`normalization: {min, max}`)."""
    path = Path(path)
    data = _read_yaml(path)
    norm = data.get("normalization") if isinstance(data, dict) else None
    lo = _number(norm.get("min")) if isinstance(norm, dict) else None
    hi = _number(norm.get("max")) if isinstance(norm, dict) else None
    if lo is None or hi is None:
        raise DataError(path, "expected 'normalization: {min: <number>, max: <number>}'")
    if hi < lo:
        raise DataError(path, f"normalization max {hi} is below min {lo}")
    return lo, hi


def read_metadata(path: str | Path) -> tuple[bool, list[str]]:
    """(anomalous, sorted defect kinds) from an `NNN_metadata.yaml`; kinds are the
    `anomalous_<kind>` keys that are set."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict) or "anomalous" not in data:
        raise DataError(path, "expected an 'anomalous: 0|1' entry")

    def flag(key: str) -> bool:
        value = data[key]
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise DataError(path, f"{key} must be 0 or 1, got {value!r}")

    anomalous = flag("anomalous")
    kinds = sorted(str(k)[len(_KIND_PREFIX):] for k in data
                   if str(k).startswith(_KIND_PREFIX) and len(str(k)) > len(_KIND_PREFIX)
                   and flag(k))
    if kinds and not anomalous:
        raise DataError(path, f"anomalous is 0 but defect kinds {', '.join(kinds)} are set")
    return anomalous, kinds


def _defect_type(anomalous: bool, kinds: list[str]) -> str:
    if not anomalous:
        return NORMAL
    if not kinds:
        return ANOMALOUS
    return kinds[0] if len(kinds) == 1 else COMBINED


def _read_depth_png(path: Path) -> np.ndarray:
    """The quantised depth as uint16 (H, W); anything but a 16-bit grey PNG is an error."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except Exception as exc:  # noqa: BLE001 - PIL raises many unrelated types for a bad file
        raise DataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from None
    if mode not in ("I;16", "I;16B", "I;16L", "I") or arr.ndim != 2:
        raise DataError(path, f"expected a 16-bit grey depth PNG, got mode {mode}")
    if arr.dtype != np.uint16:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > DEPTH_LEVELS):
            raise DataError(path, "depth values outside 0..65535")
        arr = arr.astype(np.uint16)
    return arr


def dequantise_depth(q: np.ndarray, lo: float, hi: float, scale: float = 1.0) -> np.ndarray:
    """float32 depth `(q / 65535 * (hi - lo) + lo) * scale` from the 16-bit PNG values."""
    step = np.float32((hi - lo) / DEPTH_LEVELS * scale)
    return q.astype(np.float32) * step + np.float32(lo * scale)


@functools.lru_cache(maxsize=8)
def _rays(h: int, w: int, focal: float) -> tuple[np.ndarray, np.ndarray]:
    """Read-only float32 ((u - W/2) / f, (v - H/2) / f) for every pixel."""
    rx = ((np.arange(w, dtype=np.float64) - w / 2) / focal).astype(np.float32)
    ry = ((np.arange(h, dtype=np.float64) - h / 2) / focal).astype(np.float32)
    rx.setflags(write=False)
    ry.setflags(write=False)
    return rx, ry


def unproject(depth: np.ndarray, focal: float = FOCAL_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float32 (H, W, 3), valid bool (H, W)) in the camera frame from a z-depth map:
    x = (u - W/2) z / f, y = (v - H/2) z / f. Points with depth <= 0 or not finite are
    invalid and exactly 0."""
    h, w = depth.shape
    rx, ry = _rays(h, w, float(focal))
    z = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(z) & (z > 0)
    z = np.where(valid, z, np.float32(0))
    xyz = np.empty((h, w, 3), dtype=np.float32)
    np.multiply(z, rx[None, :], out=xyz[:, :, 0])
    np.multiply(z, ry[:, None], out=xyz[:, :, 1])
    xyz[:, :, 2] = z
    return xyz, valid


def _stem_order(stem: str) -> tuple[int, str]:
    return (int(stem), stem)


def _index(data_dir: Path, problems: list[DataError]) -> dict[str, dict[str, Path]]:
    """stem -> {item (e.g. "image_4", "depth", "mask"): path} for the files of data/."""
    found: dict[str, dict[str, Path]] = {}
    for f in sorted(data_dir.iterdir()):
        m = _FILE.match(f.name)
        if m is None or not f.is_file():
            continue
        stem, item = m.group(1), m.group(2)
        items = found.setdefault(stem, {})
        if item in items:
            problems.append(DataError(f, f"two {item} files share the stem {stem!r}: "
                                         f"{items[item].name} and {f.name}"))
            continue
        items[item] = f
    return found


def _wh(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


class EyecandiesCategory:
    """One Eyecandies category folder (e.g. `CandyCane/`), with the interface of
    `cmad.data.mvtec3d.Category`."""

    def __init__(self, root: str | Path, options: EyecandiesOptions | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "category folder not found")
        if not is_eyecandies_category(root):
            raise DataError(root, "not an Eyecandies category: no train/, val/, test_public/ "
                                  "or test_private/ folder with data/NNN_depth.png files")
        self.root = root
        self.name = root.name
        self.options = options if options is not None else EyecandiesOptions()
        self.modalities: list[str] = ["rgb", "xyz"]
        self.class_ids: dict[str, int] = {}
        if (root / PRIVATE).is_dir():
            logger.info("%s: %s/ has no ground truth; skipped", root, PRIVATE)

    def __repr__(self) -> str:
        return f"EyecandiesCategory({str(self.root)!r}, options={self.options})"

    @property
    def _reader_key(self) -> str:
        """The options that change a sample's cloud (the light is in its RGB file's name)."""
        o = self.options
        return f"eyecandies:depth_scale={o.depth_scale!r}:focal_length={o.focal_length!r}"

    @property
    def splits(self) -> list[str]:
        """The splits present on disk, named as cmad names them (train, validation, test)."""
        return [s for s in SPLITS if _data_dir(self.root, FOLDERS[s]).is_dir()]

    @property
    def defect_types(self) -> list[str]:
        """The defect types of the test samples (sorted), without `good`."""
        if "test" not in self.splits:
            return []
        refs, _ = self.scan("test")
        return sorted({r.defect_type for r in refs if r.defect_type != NORMAL})

    def scan(self, split: str) -> tuple[list[EyecandiesRef], list[DataError]]:
        """Pair the files of one split, collecting problems instead of raising."""
        if split not in SPLITS:
            raise DataError(self.root / split, f"unknown split {split!r}; expected one of {SPLITS}")
        data_dir = _data_dir(self.root, FOLDERS[split])
        if not data_dir.is_dir():
            return [], [DataError(data_dir, "missing split folder")]
        problems: list[DataError] = []
        index = _index(data_dir, problems)
        refs: list[EyecandiesRef] = []
        rgb_item = f"image_{self.options.light}"
        for stem in sorted(index, key=_stem_order):
            items = index[stem]
            needed = [rgb_item, "depth", "info_depth"] + (["metadata"] if split == "test" else [])
            have = items.get("depth") or items.get(rgb_item) or next(iter(items.values()))
            missing = [n for n in needed if n not in items]
            if missing:
                ext = "yaml" if missing[0] in ("info_depth", "metadata") else "png"
                problems.append(DataError(data_dir / f"{stem}_{missing[0]}.{ext}",
                                          f"missing: {have.name} has no matching "
                                          f"{missing[0]} file"))
                continue
            label, defect, gt_path = 0, NORMAL, None
            if split == "test":
                try:
                    anomalous, kinds = read_metadata(items["metadata"])
                except DataError as exc:
                    problems.append(exc)
                    continue
                label, defect = int(anomalous), _defect_type(anomalous, kinds)
                gt_path = items.get("mask")
                if gt_path is None and anomalous:
                    problems.append(DataError(data_dir / f"{stem}_mask.png",
                                              f"missing: anomalous sample {stem} "
                                              f"({items['metadata'].name}) has no mask"))
                    continue
            refs.append(EyecandiesRef(
                category=self.name, split=split, defect_type=defect, stem=stem,
                rgb_path=items[rgb_item], xyz_path=items["depth"],
                info_path=items["info_depth"], gt_path=gt_path, label=label,
            ))
        return refs, problems

    def refs(self, split: str) -> list[EyecandiesRef]:
        """The paired sample references of a split; any problem raises `DataError`."""
        refs, problems = self.scan(split)
        if problems:
            raise problems[0]
        if not refs:
            raise DataError(_data_dir(self.root, FOLDERS[split]), "no samples in this split")
        return refs

    def load(self, ref: EyecandiesRef) -> Sample:
        """Read one sample: RGB, de-quantised and unprojected depth, mask; sizes must agree."""
        rgb = read_rgb(ref.rgb_path)
        lo, hi = read_depth_info(ref.info_path)
        q = _read_depth_png(ref.xyz_path)
        size = rgb.shape[:2]
        if q.shape != size:
            raise DataError(ref.xyz_path, f"size {_wh(q.shape)} (W x H) differs from "
                                          f"{ref.rgb_path.name} {_wh(size)}")
        depth = dequantise_depth(q, lo, hi, self.options.depth_scale)
        xyz, valid = unproject(depth, self.options.focal_length)
        clean_cloud(xyz, valid, ref.xyz_path)
        gt, gt_values = read_sample_gt(ref.gt_path, size, ref.rgb_path, ref.label)
        return Sample(
            rgb=rgb, xyz=xyz, valid=valid, gt=gt, label=ref.label,
            defect_type=ref.defect_type, stem=ref.stem, category=self.name, split=ref.split,
            paths=replace(ref.paths, extra=(ref.info_path,), reader=self._reader_key),
            gt_values=gt_values,
        )

    def samples(self, split: str, limit: int | None = None,
                progress: bool = False) -> list[Sample]:
        """Load the samples of a split (the first `limit` of them, in stem order)."""
        refs = self.refs(split)
        if limit is not None:
            refs = refs[:limit]
        it = progress_bar(refs, desc=f"load {self.name}/{split}", unit="sample", enabled=progress)
        return [self.load(r) for r in it]


class EyecandiesDataset:
    """An Eyecandies root holding category folders, or a single category folder itself,
    with the interface of `cmad.data.mvtec3d.Dataset`."""

    def __init__(self, root: str | Path, options: EyecandiesOptions | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "dataset folder not found")
        self.root = root
        self.options = options if options is not None else EyecandiesOptions()
        if is_eyecandies_category(root):
            self._dirs = {root.name: root}
        else:
            self._dirs = {d.name: d for d in sorted(root.iterdir())
                          if not d.name.startswith(".") and is_eyecandies_category(d)}
        if not self._dirs:
            raise DataError(root, "no Eyecandies category folders found (a category folder "
                                  "holds train/, val/ or test_public/ with data/NNN_* files)")

    def __repr__(self) -> str:
        return f"EyecandiesDataset({str(self.root)!r}, categories={self.categories})"

    @property
    def categories(self) -> list[str]:
        """Category names, sorted."""
        return sorted(self._dirs)

    def category(self, name: str) -> EyecandiesCategory:
        """The named category; an unknown name raises `DataError` listing the known ones."""
        if name not in self._dirs:
            raise DataError(self.root, f"unknown category {name!r}; available: "
                                       f"{', '.join(self.categories)}")
        return EyecandiesCategory(self._dirs[name], self.options)

    def __iter__(self) -> Iterator[EyecandiesCategory]:
        return (EyecandiesCategory(self._dirs[n], self.options) for n in self.categories)
