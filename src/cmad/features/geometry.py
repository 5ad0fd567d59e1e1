"""The prepared point cloud rendered as a camera-view image a pretrained RGB CNN can read.

`render_geometry(xyz, foreground, GeometryConfig())` turns an organized cloud at working
resolution into a uint8 (S, S, 3) image; the RGB backbone (`cmad.features.rgb`) then
gives geometry patch features on the same grid as the RGB features (the CPMF / AST idea:
ImageNet filters respond to shading and edges of shape as well as to texture).

Normals are estimated on the pixel grid: each foreground point is replaced by the mean of
the foreground points in a small box around it (background points never leak in), the two tangents are central
differences along the rows and columns (one-sided at the edge of the foreground), and the
normal is their cross product, turned toward the camera at the origin. Every rendering is
built from the unit normals alone, so it does not change when the cloud is scaled (parts of
another size or at another distance): no per-sample normalisation is needed.

Renderings (`kind`):
- "normals": the normal map, (nx, -ny, -nz) in [-1, 1] -> 0..255 (a surface facing the
  camera is (128, 128, 255)).
- "shading": Lambertian shading max(0, n . l) by three fixed lights, one per channel.
- "curvature": the divergence of the normal field per pixel (mean curvature times the
  pixel pitch, so scale-free), compressed by tanh, in all three channels.
- "shading_curvature": the first two lights' shading and the curvature.

Pixels without 3D (not foreground, or foreground pixels without a foreground neighbour to
take a difference with) get the constant `background` value in every channel. Patches with
no 3D should not be scored by a geometry branch: `patch_coverage` gives the share of
foreground pixels per patch, and a branch treats patches below its minimum share as
invalid, as the FPFH branch does.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numba import njit

from cmad.errors import ConfigError

# Bump when a rendering changes for the same config (caches of features keyed on
# `GeometryConfig.identity()` are then invalidated).
CODE_VERSION = 1
KINDS = ("normals", "shading", "curvature", "shading_curvature")


def light_direction(elevation_deg: float, azimuth_deg: float) -> tuple[float, float, float]:
    """Unit vector from the surface toward a light, in the camera frame (x right, y down,
    z forward): `elevation_deg` from the viewing axis, `azimuth_deg` counter-clockwise in
    the image from the +x axis (0 = light from the right, 90 = from the top)."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    return (math.sin(e) * math.cos(a), -math.sin(e) * math.sin(a), -math.cos(e))


DEFAULT_LIGHTS = tuple(light_direction(45.0, az) for az in (90.0, 210.0, 330.0))


@dataclass(frozen=True)
class GeometryConfig:
    """How the cloud is rendered.

    kind: one of KINDS.
    smooth: radius in pixels of the box over which the foreground points are averaged
        before the normals (0 = none).
    lights: three unit light directions in the camera frame (see `light_direction`).
    curvature_scale: per-pixel normal divergence mapped to tanh(div / scale).
    background: the uint8 value of pixels without 3D.
    """

    kind: str = "shading"
    smooth: int = 2
    lights: tuple[tuple[float, float, float], ...] = DEFAULT_LIGHTS
    curvature_scale: float = 0.05
    background: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"geometry kind must be one of {list(KINDS)}, got {self.kind!r}")
        if int(self.smooth) != self.smooth or self.smooth < 0:
            raise ConfigError(f"geometry smooth must be an integer >= 0 pixels, got {self.smooth}")
        object.__setattr__(self, "smooth", int(self.smooth))
        lights = tuple(tuple(float(c) for c in v) for v in self.lights)
        if len(lights) != 3 or any(len(v) != 3 for v in lights):
            raise ConfigError(f"geometry lights must be three 3-vectors, got {self.lights}")
        norms = [math.sqrt(sum(c * c for c in v)) for v in lights]
        if any(abs(n - 1.0) > 1e-3 for n in norms):
            raise ConfigError(f"geometry lights must be unit vectors, got norms {norms}")
        object.__setattr__(self, "lights", lights)
        if not self.curvature_scale > 0:
            raise ConfigError(f"geometry curvature_scale must be > 0, got {self.curvature_scale}")
        if not 0 <= int(self.background) <= 255 or int(self.background) != self.background:
            raise ConfigError(f"geometry background must be an integer 0..255, got {self.background}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lights"] = [list(v) for v in self.lights]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeometryConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown geometry option(s): {sorted(unknown)}")
        d = dict(d)
        if "lights" in d:
            d["lights"] = tuple(tuple(v) for v in d["lights"])
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the rendering, for model checks and cache keys."""
        return {"name": "geometry", "code_version": CODE_VERSION, **self.to_dict()}


@njit(cache=True, nogil=True)
def _usable(xyz, fg):
    """Foreground pixels whose point is finite."""
    rows, cols = fg.shape
    out = np.zeros((rows, cols), np.bool_)
    for y in range(rows):
        for x in range(cols):
            out[y, x] = fg[y, x] and math.isfinite(xyz[y, x, 0] + xyz[y, x, 1] + xyz[y, x, 2])
    return out


@njit(cache=True, nogil=True)
def _integral(xyz, fg):
    """Summed-area table (S+1, S+1, 4) float64 of the foreground points and their count."""
    rows, cols = fg.shape
    out = np.zeros((rows + 1, cols + 1, 4))
    for y in range(rows):
        run0 = run1 = run2 = run3 = 0.0
        for x in range(cols):
            if fg[y, x]:
                run0 += xyz[y, x, 0]
                run1 += xyz[y, x, 1]
                run2 += xyz[y, x, 2]
                run3 += 1.0
            out[y + 1, x + 1, 0] = out[y, x + 1, 0] + run0
            out[y + 1, x + 1, 1] = out[y, x + 1, 1] + run1
            out[y + 1, x + 1, 2] = out[y, x + 1, 2] + run2
            out[y + 1, x + 1, 3] = out[y, x + 1, 3] + run3
    return out


@njit(cache=True, nogil=True)
def _box_smooth(xyz, fg, radius):
    """Mean of the foreground points in the (2r+1)^2 box around each foreground pixel."""
    rows, cols = fg.shape
    out = np.zeros((rows, cols, 3), np.float32)
    if radius <= 0:
        for y in range(rows):
            for x in range(cols):
                if fg[y, x]:
                    for c in range(3):
                        out[y, x, c] = xyz[y, x, c]
        return out
    sat = _integral(xyz, fg)
    for y in range(rows):
        y0 = max(y - radius, 0)
        y1 = min(y + radius + 1, rows)
        for x in range(cols):
            if not fg[y, x]:
                continue
            x0 = max(x - radius, 0)
            x1 = min(x + radius + 1, cols)
            cnt = sat[y1, x1, 3] - sat[y0, x1, 3] - sat[y1, x0, 3] + sat[y0, x0, 3]
            for c in range(3):
                s = sat[y1, x1, c] - sat[y0, x1, c] - sat[y1, x0, c] + sat[y0, x0, c]
                out[y, x, c] = s / cnt
    return out


@njit(cache=True, nogil=True)
def _normals_kernel(p, fg):
    """Unit normals from mask-aware central differences of the smoothed points `p`."""
    rows, cols = fg.shape
    n = np.zeros((rows, cols, 3), np.float32)
    ok = np.zeros((rows, cols), np.bool_)
    for y in range(rows):
        for x in range(cols):
            if not fg[y, x]:
                continue
            # d/dx: mean of the one-sided differences to foreground neighbours
            left = x > 0 and fg[y, x - 1]
            right = x + 1 < cols and fg[y, x + 1]
            if not (left or right):
                continue
            up = y > 0 and fg[y - 1, x]
            down = y + 1 < rows and fg[y + 1, x]
            if not (up or down):
                continue
            xa = x - 1 if left else x
            xb = x + 1 if right else x
            ya = y - 1 if up else y
            yb = y + 1 if down else y
            ux = p[y, xb, 0] - p[y, xa, 0]
            uy = p[y, xb, 1] - p[y, xa, 1]
            uz = p[y, xb, 2] - p[y, xa, 2]
            vx = p[yb, x, 0] - p[ya, x, 0]
            vy = p[yb, x, 1] - p[ya, x, 1]
            vz = p[yb, x, 2] - p[ya, x, 2]
            # v x u faces the camera for x right, y down, z forward
            nx = vy * uz - vz * uy
            ny = vz * ux - vx * uz
            nz = vx * uy - vy * ux
            length = math.sqrt(nx * nx + ny * ny + nz * nz)
            if length == 0.0:
                continue
            if nx * p[y, x, 0] + ny * p[y, x, 1] + nz * p[y, x, 2] > 0.0:
                length = -length  # turn it toward the camera at the origin
            n[y, x, 0] = nx / length
            n[y, x, 1] = ny / length
            n[y, x, 2] = nz / length
            ok[y, x] = True
    return n, ok


@njit(cache=True, nogil=True)
def _divergence_kernel(n, ok):
    """d(nx)/dx + d(ny)/dy per pixel step from mask-aware central differences."""
    rows, cols = ok.shape
    out = np.zeros((rows, cols), np.float32)
    for y in range(rows):
        for x in range(cols):
            if not ok[y, x]:
                continue
            left = x > 0 and ok[y, x - 1]
            right = x + 1 < cols and ok[y, x + 1]
            up = y > 0 and ok[y - 1, x]
            down = y + 1 < rows and ok[y + 1, x]
            if not (left or right) or not (up or down):
                continue
            xa = x - 1 if left else x
            xb = x + 1 if right else x
            ya = y - 1 if up else y
            yb = y + 1 if down else y
            out[y, x] = ((n[y, xb, 0] - n[y, xa, 0]) / (xb - xa)
                         + (n[yb, x, 1] - n[ya, x, 1]) / (yb - ya))
    return out


def _check(xyz: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xyz = np.asarray(xyz)
    fg = np.asarray(foreground)
    if xyz.ndim != 3 or xyz.shape[2] != 3 or fg.shape != xyz.shape[:2]:
        raise ValueError(f"need xyz (S, S, 3) and foreground (S, S); got {xyz.shape}, {fg.shape}")
    return np.ascontiguousarray(xyz, dtype=np.float32), np.ascontiguousarray(fg, dtype=bool)


def estimate_normals(xyz: np.ndarray, foreground: np.ndarray, smooth: int = 2
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (S, S, 3) float32 facing the camera, and where they exist (S, S) bool.

    The points are first averaged over the foreground in a (2 smooth + 1)^2 box.
    """
    xyz, fg = _check(xyz, foreground)
    fg = _usable(xyz, fg)
    return _normals_kernel(_box_smooth(xyz, fg, int(smooth)), fg)


def normal_divergence(normals: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """d(nx)/dx + d(ny)/dy per pixel step (positive on convex bumps); 0 where not ok."""
    return _divergence_kernel(np.ascontiguousarray(normals, dtype=np.float32),
                              np.ascontiguousarray(ok, dtype=bool))


_KIND_CODE = {kind: i for i, kind in enumerate(KINDS)}


@njit(cache=True, nogil=True)
def _encode_kernel(n, ok, div, kind, lights, curv_scale, background):
    """The uint8 image of one rendering kind (codes as in KINDS) from normals."""
    rows, cols = ok.shape
    out = np.empty((rows, cols, 3), np.uint8)
    val = np.empty(3)
    for y in range(rows):
        for x in range(cols):
            if not ok[y, x]:
                for c in range(3):
                    out[y, x, c] = background
                continue
            nx = n[y, x, 0]
            ny = n[y, x, 1]
            nz = n[y, x, 2]
            if kind == 0:
                val[0] = 0.5 * (1.0 + nx)
                val[1] = 0.5 * (1.0 - ny)
                val[2] = 0.5 * (1.0 - nz)
            else:
                if kind == 1 or kind == 3:
                    for c in range(3):
                        val[c] = max(nx * lights[c, 0] + ny * lights[c, 1] + nz * lights[c, 2], 0.0)
                if kind == 2 or kind == 3:
                    curv = 0.5 * (1.0 + math.tanh(div[y, x] / curv_scale))
                    val[2] = curv
                    if kind == 2:
                        val[0] = curv
                        val[1] = curv
            for c in range(3):
                out[y, x, c] = np.uint8(min(max(math.floor(val[c] * 255.0 + 0.5), 0.0), 255.0))
    return out


def render_geometry(xyz: np.ndarray, foreground: np.ndarray,
                    cfg: GeometryConfig | None = None) -> np.ndarray:
    """The cloud as a uint8 (S, S, 3) camera-view image (see the module docstring).

    xyz: float32 (S, S, 3) metres, zero where not foreground; foreground: bool (S, S).
    """
    cfg = GeometryConfig() if cfg is None else cfg
    n, ok = estimate_normals(xyz, foreground, cfg.smooth)
    if cfg.kind in ("curvature", "shading_curvature"):
        div = _divergence_kernel(n, ok)
    else:
        div = np.zeros((1, 1), np.float32)
    return _encode_kernel(n, ok, div, _KIND_CODE[cfg.kind], np.asarray(cfg.lights, np.float64),
                          float(cfg.curvature_scale), int(cfg.background))


def patch_coverage(foreground: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Share (h, w) float32 of foreground pixels in each cell of an (h, w) patch grid."""
    fg = np.asarray(foreground, dtype=np.float32)
    s0, s1 = fg.shape
    h, w = grid
    if s0 % h or s1 % w:
        raise ValueError(f"grid {grid} does not divide the image {fg.shape}")
    return fg.reshape(h, s0 // h, w, s1 // w).mean(axis=(1, 3)).astype(np.float32)
