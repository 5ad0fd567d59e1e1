"""Patch features of both modalities on one grid: `FeatureExtractor.extract(prepared)`.

- rgb: pretrained CNN features (see `cmad.features.rgb`), (B, C2, h, w)
- xyz: FPFH pooled per patch (see `cmad.features.xyz`), (B, 33, h, w)
- colour: per-patch colour statistics (mean and std of R, G, B in [0, 1]), (B, 6, h, w)
- context: per-patch geometric context the local FPFH lacks (height over the part's median
  depth in mm, distance to the part's centre relative to its radius, depth-gradient
  magnitude), (B, 3, h, w). Rotation about the view axis does not change any of them.
- valid: (B, h, w) patches with enough foreground points (3D) or inside the image (RGB-only)
- image: (B, h, w) patches inside the original image (not padding)

The submodules are imported lazily so that RGB-only or 3D-only use loads one of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cmad.types import Prepared

log = logging.getLogger(__name__)

GEOMETRY_CONTEXT = ("height_mm", "radial", "slope")


@dataclass
class FeatureMaps:
    """Features of a batch on one patch grid (torch tensors, float32 / bool)."""

    rgb: torch.Tensor | None
    xyz: torch.Tensor | None
    colour: torch.Tensor | None
    context: torch.Tensor | None
    valid: torch.Tensor
    image: torch.Tensor
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return (int(self.valid.shape[1]), int(self.valid.shape[2]))

    def index(self, i: int | slice) -> FeatureMaps:
        """A sub-batch (keeps the batch dimension)."""
        sl = slice(i, i + 1) if isinstance(i, int) else i
        pick = lambda t: None if t is None else t[sl]  # noqa: E731
        return FeatureMaps(
            pick(self.rgb), pick(self.xyz), pick(self.colour), pick(self.context),
            self.valid[sl], self.image[sl],
        )

    @staticmethod
    def cat(items: Sequence[FeatureMaps]) -> FeatureMaps:
        """Concatenate batches."""
        if not items:
            raise ValueError("nothing to concatenate")
        join = lambda name: (  # noqa: E731
            None if getattr(items[0], name) is None
            else torch.cat([getattr(x, name) for x in items], 0)
        )
        return FeatureMaps(
            join("rgb"), join("xyz"), join("colour"), join("context"), join("valid"), join("image")
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"valid": self.valid, "image": self.image}
        for name in ("rgb", "xyz", "colour", "context"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.contiguous()
        return out

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor]) -> FeatureMaps:
        return FeatureMaps(
            t.get("rgb"), t.get("xyz"), t.get("colour"), t.get("context"), t["valid"], t["image"]
        )


def pool_cells(arr: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean of (S, S, C) over the cells of an (h, w) grid -> (h, w, C)."""
    s = arr.shape[0]
    h, w = grid
    return arr.reshape(h, s // h, w, s // w, -1).mean(axis=(1, 3))


def colour_stats(rgb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(6, h, w): per-patch mean and standard deviation of R, G, B in [0, 1]."""
    x = rgb.astype(np.float32) / 255.0
    mean = pool_cells(x, grid)
    sq = pool_cells(x * x, grid)
    std = np.sqrt(np.clip(sq - mean * mean, 0.0, None))
    return np.concatenate([mean, std], axis=2).transpose(2, 0, 1).astype(np.float32)


def geometry_context(xyz: np.ndarray, foreground: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(3, h, w): height over the part's median depth (mm), radial position, slope."""
    h, w = grid
    fg = foreground.astype(np.float32)[..., None]
    count = pool_cells(fg, grid)[..., 0]
    sums = pool_cells(xyz * fg, grid)
    has = count > 0
    mean = np.where(has[..., None], sums / np.maximum(count, 1e-9)[..., None], 0.0)
    out = np.zeros((3, h, w), dtype=np.float32)
    if has.sum() < 2:
        return out
    z = mean[..., 2]
    zmed = float(np.median(z[has]))
    out[0] = np.where(has, (zmed - z) * 1000.0, 0.0)
    cxy = mean[has][:, :2].mean(0)
    r = np.linalg.norm(mean[..., :2] - cxy, axis=2)
    rmax = float(np.percentile(r[has], 95)) + 1e-9
    out[1] = np.where(has, r / rmax, 0.0)
    zf = np.where(has, z, zmed)
    gy, gx = np.gradient(zf)
    out[2] = np.where(has, np.hypot(gx, gy) * 1000.0, 0.0)
    return out


@dataclass(frozen=True)
class ExtractorConfig:
    """Which modalities to extract and how."""

    use_rgb: bool = True
    use_xyz: bool = True
    rgb: dict = field(default_factory=dict)
    xyz: dict = field(default_factory=dict)
    min_foreground: float = 0.1

    def to_dict(self) -> dict:
        return {
            "use_rgb": self.use_rgb, "use_xyz": self.use_xyz, "rgb": dict(self.rgb),
            "xyz": dict(self.xyz), "min_foreground": self.min_foreground,
        }


class FeatureExtractor:
    """Both modalities' patch features on one grid, with an optional on-disk cache."""

    def __init__(
        self,
        cfg: ExtractorConfig,
        size: int = 224,
        cache_dir: Path | None = None,
        rgb_runtime: str = "torch",
    ) -> None:
        self.cfg = cfg
        self.size = size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.rgb = None
        self.xyz = None
        default_grid = (size // 8, size // 8)
        if cfg.use_rgb:
            from cmad.features.rgb import RGBConfig, RGBExtractor

            self.rgb = RGBExtractor(RGBConfig(size=size, **cfg.rgb), runtime=rgb_runtime)
        if cfg.use_xyz:
            from cmad.features.xyz import FPFHConfig, FPFHExtractor

            self.xyz = FPFHExtractor(FPFHConfig(**{"grid": default_grid, **cfg.xyz}))
        self.grid = tuple(self.rgb.grid) if self.rgb is not None else default_grid
        if self.xyz is not None and tuple(self.xyz.cfg.grid) != tuple(self.grid):
            raise ValueError(f"RGB grid {self.grid} and 3D grid {self.xyz.cfg.grid} differ")

    def identity(self) -> dict:
        """What a saved model needs to match before it may be loaded."""
        return {
            "size": self.size,
            "grid": list(self.grid),
            "rgb": None if self.rgb is None else self.rgb.identity(),
            "xyz": None if self.xyz is None else self.xyz.identity(),
        }

    @property
    def digest(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def _cache_path(self, p: Prepared, prep_digest: str) -> Path | None:
        if self.cache_dir is None:
            return None
        stat = []
        for f in (p.paths.rgb, p.paths.xyz):
            if f is not None:
                st = Path(f).stat()
                stat.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
        key = hashlib.sha1("|".join([p.key, *stat, prep_digest, self.digest]).encode()).hexdigest()
        return self.cache_dir / "features" / p.category / f"{key}.safetensors"

    def extract(
        self, batch: Sequence[Prepared], prep_digest: str | None = None
    ) -> FeatureMaps:
        """Features of a batch of prepared samples; cached per sample when a cache is set."""
        if not batch:
            raise ValueError("empty batch")
        cached: list[FeatureMaps | None] = [None] * len(batch)
        paths: list[Path | None] = [None] * len(batch)
        if prep_digest is not None and self.cache_dir is not None:
            for i, p in enumerate(batch):
                paths[i] = self._cache_path(p, prep_digest)
                if paths[i] is not None and paths[i].exists():
                    try:
                        cached[i] = FeatureMaps.from_tensors(load_file(str(paths[i])))
                    except Exception as exc:  # a corrupt cache entry is recomputed
                        log.warning("ignoring unreadable feature cache %s: %s", paths[i], exc)
        todo = [i for i, c in enumerate(cached) if c is None]
        if todo:
            fresh = self._compute([batch[i] for i in todo])
            for j, i in enumerate(todo):
                cached[i] = fresh.index(j)
                if paths[i] is not None:
                    _save_atomic(cached[i].tensors(), paths[i])
            timings = fresh.timings_ms
        else:
            timings = {}
        out = FeatureMaps.cat(cached)  # type: ignore[arg-type]
        out.timings_ms = timings
        return out

    def _compute(self, batch: Sequence[Prepared]) -> FeatureMaps:
        grid = self.grid
        timings: dict[str, float] = {}
        rgb = xyz = colour = context = None
        t0 = time.perf_counter()
        if self.rgb is not None:
            if any(p.rgb is None for p in batch):
                raise ValueError("RGB features requested but a sample has no RGB image")
            images = np.stack([p.rgb for p in batch])
            rgb = self.rgb.extract(images).float()
            colour = torch.from_numpy(np.stack([colour_stats(p.rgb, grid) for p in batch]))
        t1 = time.perf_counter()
        image = torch.from_numpy(
            np.stack([p.geometry.image_mask(*grid) for p in batch])
        )
        if self.xyz is not None:
            if any(p.xyz is None for p in batch):
                raise ValueError("3D features requested but a sample has no point cloud")
            feats, valids = [], []
            for p in batch:
                f, v = self.xyz.extract(p.xyz, p.foreground)
                feats.append(f)
                valids.append(v)
            xyz = torch.from_numpy(np.stack(feats)).float()
            valid = torch.from_numpy(np.stack(valids)).bool()
            context = torch.from_numpy(
                np.stack([geometry_context(p.xyz, p.foreground, grid) for p in batch])
            )
        else:
            fg = np.stack([pool_cells(p.foreground.astype(np.float32)[..., None], grid)[..., 0]
                           for p in batch])
            valid = torch.from_numpy(fg >= self.cfg.min_foreground)
        t2 = time.perf_counter()
        n = len(batch)
        timings["rgb_features"] = (t1 - t0) * 1000.0 / n
        timings["xyz_features"] = (t2 - t1) * 1000.0 / n
        return FeatureMaps(rgb, xyz, colour, context, valid, image, timings)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{id(tensors)}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
