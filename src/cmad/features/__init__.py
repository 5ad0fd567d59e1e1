"""Patch features of both modalities on one grid: `FeatureExtractor(needs).extract(prepared)`.

Named features (each branch says which it needs; the extractor computes only their union):
- rgb: pretrained CNN features of the RGB image (see `cmad.features.rgb`), (B, C, h, w)
- colour: per-patch colour statistics (mean and std of R, G, B in [0, 1]), (B, 6, h, w)
- xyz: FPFH pooled per patch (see `cmad.features.xyz`), (B, 33, h, w); its patch validity
  (enough sampled points with FPFH neighbours) is `FeatureMaps.xyz_valid`
- context: per-patch geometric context the local FPFH lacks (height over the part's median
  depth in mm, distance to the part's centre relative to its radius, depth-gradient
  magnitude), (B, 3, h, w). Rotation about the view axis does not change any of them.
- geom: the prepared cloud rendered as an image (see `cmad.features.geometry`) through the
  same CNN as the RGB image, (B, C, h, w)

Masks, always present:
- valid: (B, h, w) patches with at least `min_foreground` of their pixels on the part (3D
  data; RGB-only data: inside the image)
- image: (B, h, w) patches inside the original image (not padding)

The submodules are imported lazily so that RGB-only or 3D-only use loads one of them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cmad.cache import entry_path, file_digest, key_of, reader_identity
from cmad.configs import DEFAULT_SIZE
from cmad.data.io import write_atomic
from cmad.errors import ConfigError, DataError
from cmad.types import Prepared

log = logging.getLogger(__name__)

# Bump when the code computes (slightly) different features under an unchanged identity:
# cached entries are then recomputed, while models saved before still load. "2": the CNN's
# 1 x 1 convolutions as matrix products (thread-independent; features move by <= 2.4e-5).
CACHE_VERSION = "2"

# Bump when colour statistics or geometric context change what they compute.
PATCH_STATS_VERSION = "1"
GEOMETRY_CONTEXT = ("height_mm", "radial", "slope")
# feature name -> the modality it is computed from
FEATURE_MODALITY = {"rgb": "rgb", "colour": "rgb", "xyz": "xyz", "context": "xyz", "geom": "xyz"}
FEATURES = tuple(FEATURE_MODALITY)
# feature name -> the timing stage it is charged to
FEATURE_STAGE = {"rgb": "rgb_features", "colour": "colour_stats", "xyz": "xyz_features",
                 "context": "geometry_context", "geom": "geometry_features"}


def modalities_of(needs: Iterable[str]) -> set[str]:
    """The modalities (rgb, xyz) a set of features is computed from."""
    return {FEATURE_MODALITY[n] for n in needs}


@dataclass
class FeatureMaps:
    """Features of a batch on one patch grid (torch tensors, float32 / bool)."""

    feats: dict[str, torch.Tensor]
    valid: torch.Tensor
    image: torch.Tensor
    xyz_valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.feats[name]
        except KeyError:
            raise KeyError(f"feature {name!r} was not extracted (have {sorted(self.feats)})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.feats

    @property
    def grid(self) -> tuple[int, int]:
        return (int(self.valid.shape[1]), int(self.valid.shape[2]))

    def mask3d(self) -> torch.Tensor:
        """Patches with FPFH (when extracted) or enough foreground, inside the image."""
        v = self.xyz_valid if self.xyz_valid is not None else self.valid
        return v & self.image

    def select(self, keep: torch.Tensor | slice | Sequence[int]) -> FeatureMaps:
        """The samples picked by a boolean mask, a slice or a list of indices."""
        if isinstance(keep, list | tuple):
            keep = torch.as_tensor(keep, dtype=torch.long)
        return FeatureMaps({k: v[keep] for k, v in self.feats.items()}, self.valid[keep],
                           self.image[keep],
                           None if self.xyz_valid is None else self.xyz_valid[keep])

    def index(self, i: int) -> FeatureMaps:
        """Sample i as a batch of one."""
        return self.select(slice(i, i + 1))

    @staticmethod
    def cat(items: Sequence[FeatureMaps]) -> FeatureMaps:
        """Concatenate batches (all with the same features)."""
        if not items:
            raise ValueError("nothing to concatenate")
        names = set(items[0].feats)
        if any(set(x.feats) != names for x in items):
            raise ValueError("batches hold different features")
        xv = None if items[0].xyz_valid is None else torch.cat([x.xyz_valid for x in items], 0)
        return FeatureMaps({n: torch.cat([x.feats[n] for x in items], 0) for n in sorted(names)},
                           torch.cat([x.valid for x in items], 0),
                           torch.cat([x.image for x in items], 0), xv)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"valid": self.valid, "image": self.image}
        if self.xyz_valid is not None:
            out["xyz_valid"] = self.xyz_valid
        out.update({f"feat.{k}": v.contiguous() for k, v in self.feats.items()})
        return out

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor]) -> FeatureMaps:
        feats = {k[5:]: v for k, v in t.items() if k.startswith("feat.")}
        return FeatureMaps(feats, t["valid"], t["image"], t.get("xyz_valid"))


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


class FeatureExtractor:
    """The named features a model needs, on one grid, with an optional on-disk cache.

    `needs`: feature names (see the module docstring); `rgb`, `xyz`, `geometry`: the
    settings of the CNN (`RGBConfig`), the FPFH (`FPFHConfig`) and the rendering
    (`GeometryConfig`); None takes the defaults.
    """

    def __init__(self, needs: Iterable[str], size: int = DEFAULT_SIZE, rgb=None, xyz=None, geometry=None,
                 cache_dir: Path | None = None, rgb_runtime: str = "torch",
                 min_foreground: float = 0.1) -> None:
        self.needs = tuple(sorted(set(needs)))
        bad = [n for n in self.needs if n not in FEATURE_MODALITY]
        if bad or not self.needs:
            raise ConfigError(f"unknown features {bad or '(none)'}; known: {list(FEATURES)}")
        self.size = size
        self.min_foreground = min_foreground
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.modalities = modalities_of(self.needs)
        self.grid = (size // 8, size // 8)
        self.cnn = self.fpfh = None
        self.geometry = None
        if {"rgb", "geom"} & set(self.needs):
            from dataclasses import replace

            from cmad.features.rgb import RGBConfig, RGBExtractor

            cfg = replace(rgb or RGBConfig(), size=size)
            self.cnn = RGBExtractor(cfg, runtime=rgb_runtime, cache_dir=self.cache_dir)
            self.grid = tuple(self.cnn.grid)
        if "xyz" in self.needs:
            from dataclasses import replace

            from cmad.features.xyz import FPFHConfig, FPFHExtractor

            self.fpfh = FPFHExtractor(replace(xyz or FPFHConfig(), grid=self.grid))
        if "geom" in self.needs:
            from cmad.features.geometry import GeometryConfig

            self.geometry = geometry or GeometryConfig()

    def identity(self, needs: Iterable[str] | None = None) -> dict:
        """What a saved model needs to match before it may be loaded: per needed feature, its
        code version and settings (`needs` restricts it to a subset of this extractor's)."""
        from cmad.data.preprocess import CODE_VERSION as PREP_VERSION

        names = self.needs if needs is None else tuple(sorted(set(needs)))
        missing = set(names) - set(self.needs)
        if missing:
            raise ValueError(f"features {sorted(missing)} are not extracted here")
        out: dict = {"size": self.size, "grid": list(self.grid), "preprocess": PREP_VERSION,
                     "min_foreground": self.min_foreground, "features": {}}
        for n in names:
            if n in ("rgb", "geom"):
                ident = self.cnn.identity()
                if n == "geom":
                    ident = {"cnn": ident, "render": self.geometry.identity()}
            elif n == "xyz":
                ident = self.fpfh.identity()
            else:
                ident = {"code": PATCH_STATS_VERSION}
            out["features"][n] = ident
        return out

    @property
    def digest(self) -> str:
        return key_of(self.identity())[:24]

    def _cache_path(self, p: Prepared, prep_digest: str) -> Path | None:
        if self.cache_dir is None:
            return None
        try:
            files = [file_digest(f) for f in (p.paths.rgb, p.paths.xyz) if f is not None]
            reader = reader_identity(p.paths) if files else None
            if reader is not None:
                files.append(reader)
        except OSError:
            return None
        if not files:
            return None
        key = key_of([p.key, files, prep_digest, self.identity(), CACHE_VERSION])
        return entry_path(self.cache_dir, "features", key)

    def extract(self, batch: Sequence[Prepared], prep_digest: str | None = None
                ) -> tuple[FeatureMaps, dict[str, float]]:
        """Features of prepared samples and the ms per sample of each stage computed here
        (cached per sample when a cache dir and `prep_digest` are given; cached samples cost
        nothing)."""
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
                    except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed
                        log.warning("ignoring unreadable feature cache %s: %s", paths[i], exc)
        todo = [i for i, c in enumerate(cached) if c is None]
        timings: dict[str, float] = {}
        if todo:
            fresh, timings = self._compute([batch[i] for i in todo])
            timings = {k: v * len(todo) / len(batch) for k, v in timings.items()}
            for j, i in enumerate(todo):
                cached[i] = fresh.index(j)
                if paths[i] is not None:
                    tensors = cached[i].tensors()
                    try:
                        write_atomic(paths[i], lambda tmp, t=tensors: save_file(t, str(tmp)))
                    except OSError as exc:
                        log.warning("%s: cannot write feature cache (%s)", paths[i], exc)
        return FeatureMaps.cat(cached), timings  # type: ignore[arg-type]

    def _compute(self, batch: Sequence[Prepared]) -> tuple[FeatureMaps, dict[str, float]]:
        grid, n = self.grid, len(batch)
        ms: dict[str, float] = {}
        feats: dict[str, torch.Tensor] = {}

        def timed(stage: str, t0: float) -> None:
            ms[stage] = ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0 / n

        for m, attr in (("rgb", "rgb"), ("xyz", "xyz")):
            if m in self.modalities and any(getattr(p, attr) is None for p in batch):
                raise DataError(next(p.paths.rgb or p.paths.xyz for p in batch
                                     if getattr(p, attr) is None),
                                f"the model needs {m} data; this sample has none")
        t = time.perf_counter()
        image = torch.from_numpy(np.stack([p.geometry.image_mask(*grid) for p in batch]))
        fg = np.stack([pool_cells(p.foreground.astype(np.float32)[..., None], grid)[..., 0]
                       for p in batch])
        valid = torch.from_numpy(fg >= self.min_foreground) & image
        images = []
        if "rgb" in self.needs:
            images.append(np.stack([p.rgb for p in batch]))
        if "geom" in self.needs:
            from cmad.features.geometry import render_geometry

            t = time.perf_counter()
            images.append(np.stack([render_geometry(p.xyz, p.foreground, self.geometry)
                                    for p in batch]))
            timed("geometry_render", t)
        if images:
            t = time.perf_counter()
            out = self.cnn.extract(np.concatenate(images, 0)).float()
            k = 0
            for name in ("rgb", "geom"):
                if name in self.needs:
                    feats[name] = out[k : k + n]
                    k += n
            # one CNN pass serves both: charge it by image count
            share = (time.perf_counter() - t) * 1000.0 / n / len(images)
            for name in ("rgb", "geom"):
                if name in self.needs:
                    ms[FEATURE_STAGE[name]] = ms.get(FEATURE_STAGE[name], 0.0) + share
        if "colour" in self.needs:
            t = time.perf_counter()
            feats["colour"] = torch.from_numpy(np.stack([colour_stats(p.rgb, grid) for p in batch]))
            timed("colour_stats", t)
        xyz_valid = None
        if "xyz" in self.needs:
            t = time.perf_counter()
            fs, vs = zip(*(self.fpfh.extract(p.xyz, p.foreground) for p in batch))
            feats["xyz"] = torch.from_numpy(np.stack(fs)).float()
            xyz_valid = torch.from_numpy(np.stack(vs)).bool()
            timed("xyz_features", t)
        if "context" in self.needs:
            t = time.perf_counter()
            feats["context"] = torch.from_numpy(
                np.stack([geometry_context(p.xyz, p.foreground, grid) for p in batch]))
            timed("geometry_context", t)
        return FeatureMaps(feats, valid, image, xyz_valid), ms
