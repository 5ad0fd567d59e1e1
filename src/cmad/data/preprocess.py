"""Preprocessing: background-plane removal, pad to square, resize to the working resolution.

The user's files are never written to. Derived arrays go to an optional cache folder (one
safetensors file per sample, no pickle) keyed by the input files' paths, sizes and mtimes
and by the configuration digest; a corrupt cache entry is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save as st_save
from scipy import ndimage

from cmad.cache import entry_path, file_digest, key_of, reader_identity
from cmad.configs import DEFAULT_SIZE
from cmad.data.io import write_bytes_atomic
from cmad.errors import ConfigError
from cmad.progress import progress as progress_bar
from cmad.types import Geometry, Prepared, Sample

logger = logging.getLogger(__name__)

__all__ = [
    "PreprocessConfig",
    "Preprocessor",
    "border_ring",
    "fit_background_plane",
    "make_geometry",
    "to_original",
    "to_working",
]

# Bump when the preprocessing code changes what it computes: cached entries and saved models
# made by other code versions are then recomputed / refused.
CODE_VERSION = "2"
MIN_RING_POINTS = 10
_RANSAC_SCORE_POINTS = 4096
_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; `plane_threshold` is in metres, `border` in pixels."""

    size: int = DEFAULT_SIZE
    remove_background: bool = True
    plane_threshold: float = 0.005
    border: int = 10
    ransac_iters: int = 200
    largest_component: bool = False
    rgb_interp: str = "bilinear"
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise ConfigError(f"preprocess size must be >= 1, got {self.size}")
        if not self.plane_threshold > 0:
            raise ConfigError(f"plane_threshold must be > 0 metres, got {self.plane_threshold}")
        if int(self.border) < 1:
            raise ConfigError(f"border must be >= 1 pixel, got {self.border}")
        if int(self.ransac_iters) < 1:
            raise ConfigError(f"ransac_iters must be >= 1, got {self.ransac_iters}")
        if self.rgb_interp not in _INTERP:
            raise ConfigError(f"rgb_interp must be one of {sorted(_INTERP)}, "
                              f"got {self.rgb_interp!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of `to_dict`; unknown keys raise `ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown preprocess option(s): {', '.join(unknown)}")
        return cls(**data)

    def digest(self) -> str:
        """A stable short hash of the parameters (same values -> same digest)."""
        payload = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def border_ring(shape: tuple[int, int], border: int) -> np.ndarray:
    """bool (H, W): True within `border` pixels of the image edge."""
    h, w = shape
    ring = np.ones((h, w), dtype=bool)
    ring[border:h - border, border:w - border] = False
    return ring


def fit_background_plane(
    xyz: np.ndarray,
    valid: np.ndarray,
    border: int = 10,
    threshold: float = 0.005,
    iters: int = 200,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, float] | None:
    """RANSAC plane through the valid points of the border ring: (unit normal (3,), d).

    A point p lies on the plane when |normal . p + d| < threshold. The best hypothesis is
    refined by least squares on its inliers. Returns None when the ring has fewer than
    `MIN_RING_POINTS` valid points (the caller then removes nothing).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    pts = xyz[border_ring(valid.shape, border) & valid].astype(np.float64)
    if len(pts) < MIN_RING_POINTS:
        return None
    score = pts
    if len(pts) > _RANSAC_SCORE_POINTS:
        score = pts[rng.choice(len(pts), _RANSAC_SCORE_POINTS, replace=False)]
    idx = rng.integers(0, len(pts), size=(iters, 3))
    a, b, c = pts[idx[:, 0]], pts[idx[:, 1]], pts[idx[:, 2]]
    normals = np.cross(b - a, c - a)
    norms = np.linalg.norm(normals, axis=1)
    ok = norms > 1e-12
    if not ok.any():
        normal, d = _lstsq_plane(pts)
    else:
        normals = normals[ok] / norms[ok, None]
        ds = -np.einsum("ij,ij->i", normals, a[ok])
        counts = _inlier_counts(np.ascontiguousarray(score.T), normals, ds, float(threshold))
        best = int(np.argmax(counts))
        normal, d = normals[best], float(ds[best])
        inliers = np.abs(pts @ normal + d) < threshold
        if inliers.sum() >= 3:
            refined_n, refined_d = _lstsq_plane(pts[inliers])
            if (np.abs(pts @ refined_n + refined_d) < threshold).sum() >= inliers.sum():
                normal, d = refined_n, refined_d
    if normal[2] < 0:
        normal, d = -normal, -d
    return normal.astype(np.float64), float(d)


@njit(cache=True, nogil=True)
def _inlier_counts(xyz, normals, ds, threshold):  # noqa: ANN001, ANN202
    """Per hypothesis j, the points p (columns of the (3, N) `xyz`) with
    |normals[j] . p + ds[j]| < threshold, in one pass without the (points x hypotheses)
    residual matrix."""
    x, y, z = xyz[0], xyz[1], xyz[2]
    counts = np.zeros(normals.shape[0], np.int64)
    for j in range(normals.shape[0]):
        nx, ny, nz, d = normals[j, 0], normals[j, 1], normals[j, 2], ds[j]
        c = 0
        for i in range(x.shape[0]):
            c += abs(x[i] * nx + y[i] * ny + z[i] * nz + d) < threshold
        counts[j] = c
    return counts


def _lstsq_plane(pts: np.ndarray) -> tuple[np.ndarray, float]:
    centroid = pts.mean(axis=0)
    _, _, vt = np.linalg.svd(pts - centroid, full_matrices=False)
    normal = vt[-1] / np.linalg.norm(vt[-1])
    return normal, float(-normal @ centroid)


def make_geometry(h: int, w: int, size: int) -> Geometry:
    """Centered zero padding of an (h, w) image to a square, then resizing to `size`."""
    side = max(h, w)
    return Geometry(orig_h=h, orig_w=w, pad_top=(side - h) // 2, pad_left=(side - w) // 2,
                    size=size)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest resizing (pixel centres, as PIL)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def _resize_smooth(arr: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Smooth resize to (size, size): uint8 images stay uint8, anything else becomes float32."""
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] in (3, 4)):
        return np.asarray(Image.fromarray(arr).resize((size, size), resample))
    planes = arr[:, :, None] if arr.ndim == 2 else arr
    out = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(planes[:, :, k], dtype=np.float32))
                   .resize((size, size), resample))
        for k in range(planes.shape[2])
    ], axis=2)
    return out[:, :, 0] if arr.ndim == 2 else out


def to_working(arr: np.ndarray, geometry: Geometry, nearest: bool = True,
               interp: str = "bilinear") -> np.ndarray:
    """Original (H, W) or (H, W, C) array -> working (S, S[, C]): pad with zeros, resize.

    `nearest=True` (masks, xyz) keeps values unblended; otherwise `interp` (bilinear or
    bicubic) is used.
    """
    arr = np.asarray(arr)
    g = geometry
    if arr.shape[:2] != (g.orig_h, g.orig_w):
        raise ValueError(f"array of shape {arr.shape} does not match geometry "
                         f"{g.orig_h}x{g.orig_w} (H x W)")
    padded = np.zeros((g.side, g.side) + arr.shape[2:], dtype=arr.dtype)
    padded[g.pad_top:g.pad_top + g.orig_h, g.pad_left:g.pad_left + g.orig_w] = arr
    if g.side == g.size:
        return padded
    if nearest:
        idx = _nearest_index(g.side, g.size)
        return np.ascontiguousarray(padded[np.ix_(idx, idx)])
    if interp not in _INTERP:
        raise ConfigError(f"interp must be one of {sorted(_INTERP)}, got {interp!r}")
    return _resize_smooth(padded, g.size, _INTERP[interp])


def to_original(map_work: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Working-resolution map (S, S) -> float32 (H, W): bilinear resize to the padded square,
    then crop the padding away."""
    g = geometry
    m = np.ascontiguousarray(map_work, dtype=np.float32)
    if m.shape != (g.size, g.size):
        raise ValueError(f"map of shape {m.shape} does not match working size {g.size}")
    if g.side != g.size:
        m = np.asarray(Image.fromarray(m).resize((g.side, g.side), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(
        m[g.pad_top:g.pad_top + g.orig_h, g.pad_left:g.pad_left + g.orig_w], dtype=np.float32)


class Preprocessor:
    """Turns a `Sample` into a `Prepared` one, optionally through a cache folder.

    The cache folder must not lie inside the dataset; entries are written atomically.
    """

    def __init__(self, config: PreprocessConfig | None = None,
                 cache_dir: str | Path | None = None) -> None:
        self.config = config if config is not None else PreprocessConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def foreground(self, sample: Sample) -> np.ndarray:
        """bool (H, W): valid points off the background plane (and in the largest component
        if configured). For RGB-only samples: all True."""
        cfg = self.config
        if sample.xyz is None:
            return np.ones(sample.size, dtype=bool)
        fg = sample.valid.copy()
        if cfg.remove_background:
            plane = fit_background_plane(sample.xyz, sample.valid, cfg.border,
                                         cfg.plane_threshold, cfg.ransac_iters,
                                         np.random.default_rng(cfg.seed))
            if plane is None:
                logger.warning("%s: fewer than %d valid points in the %d-pixel border ring; "
                               "background not removed", sample.key, MIN_RING_POINTS,
                               cfg.border)
            else:
                normal, d = plane
                dist = sample.xyz.astype(np.float64) @ normal
                dist += d
                np.abs(dist, out=dist)
                fg &= dist >= cfg.plane_threshold
        if cfg.largest_component and fg.any():
            labels, _ = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            fg = labels == int(np.argmax(counts))
        return fg

    def __call__(self, sample: Sample) -> Prepared:
        key = self._cache_key(sample)
        path = self._cache_path(key, sample) if key is not None else None
        if path is not None:
            arrays = self._read_cache(path, key, sample)  # type: ignore[arg-type]
            if arrays is not None:
                return self._assemble(sample, arrays)
        arrays = self._compute(sample)
        if path is not None:
            self._write_cache(path, key, arrays)  # type: ignore[arg-type]
        return self._assemble(sample, arrays)

    def prepare_many(self, samples: Iterable[Sample], progress: bool = True) -> list[Prepared]:
        """Preprocess several samples, in order."""
        items: Sequence[Sample] = list(samples)
        desc = f"{items[0].category} preprocess" if items and items[0].category else "preprocess"
        return [self(s) for s in progress_bar(items, desc=desc, unit="sample", enabled=progress)]

    def _compute(self, sample: Sample) -> dict[str, np.ndarray]:
        h, w = sample.size
        geom = make_geometry(h, w, self.config.size)
        fg = self.foreground(sample)
        arrays = {
            "valid": to_working(sample.valid, geom),
            "foreground": to_working(fg, geom),
            "gt": to_working(sample.gt, geom),
        }
        if sample.rgb is not None:
            arrays["rgb"] = to_working(sample.rgb, geom, nearest=False,
                                       interp=self.config.rgb_interp)
        if sample.xyz is not None:
            xyz = np.where(fg[:, :, None], sample.xyz, np.float32(0)).astype(np.float32, copy=False)
            arrays["xyz"] = to_working(xyz, geom)
        return arrays

    def _assemble(self, sample: Sample, arrays: dict[str, np.ndarray]) -> Prepared:
        h, w = sample.size
        return Prepared(
            rgb=arrays.get("rgb"), xyz=arrays.get("xyz"), valid=arrays["valid"],
            foreground=arrays["foreground"], gt=arrays["gt"], gt_orig=sample.gt,
            geometry=make_geometry(h, w, self.config.size), label=sample.label,
            defect_type=sample.defect_type, stem=sample.stem, category=sample.category,
            split=sample.split, paths=sample.paths,
        )

    def _cache_key(self, sample: Sample) -> str | None:
        if self.cache_dir is None:
            return None
        files: list[Any] = []
        for p in (sample.paths.rgb, sample.paths.xyz, sample.paths.gt):
            if p is None:
                files.append(None)
                continue
            try:
                files.append(file_digest(p))
            except OSError:
                return None
        if all(f is None for f in files):
            return None
        key: dict[str, Any] = {"version": CODE_VERSION, "files": files, "shape": sample.size,
                               "config": self.config.digest()}
        try:
            reader = reader_identity(sample.paths)
        except OSError:
            return None
        if reader is not None:
            key["reader"] = reader
        return key_of(key)

    def _cache_path(self, key: str, sample: Sample) -> Path:
        cache = self.cache_dir.resolve()  # type: ignore[union-attr]
        for p in (sample.paths.rgb, sample.paths.xyz, sample.paths.gt):
            if p is None:
                continue
            parents = Path(p).resolve().parents
            in_layout = (len(parents) > 4 and parents[0].name in ("rgb", "xyz", "gt")
                         and parents[2].name in ("train", "validation", "test"))
            if in_layout and (cache == parents[3] or parents[3] in cache.parents):
                raise ConfigError(f"cache folder {cache} lies inside the dataset folder "
                                  f"{parents[3]}; choose a folder outside the dataset")
        return entry_path(cache, "preprocess", key)

    def _read_cache(self, path: Path, key: str, sample: Sample) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # noqa: BLE001 - any damage to the entry: recompute it
            logger.warning("%s: unreadable cache entry, recomputing (%s)", path, exc)
            return None
        s = self.config.size
        expected = {"valid": (s, s), "foreground": (s, s), "gt": (s, s)}
        if sample.rgb is not None:
            expected["rgb"] = (s, s, 3)
        if sample.xyz is not None:
            expected["xyz"] = (s, s, 3)
        shapes_ok = set(arrays) == set(expected) and all(
            arrays[k].shape == shape for k, shape in expected.items())
        if meta.get("key") != key or not shapes_ok:
            logger.warning("%s: stale or damaged cache entry, recomputing", path)
            return None
        return arrays

    def _write_cache(self, path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
        data = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                       metadata={"key": key, "version": CODE_VERSION,
                                 "config": json.dumps(self.config.to_dict(), sort_keys=True)})
        try:
            write_bytes_atomic(path, data)
        except OSError as exc:
            logger.warning("%s: cannot write cache entry (%s)", path, exc)
