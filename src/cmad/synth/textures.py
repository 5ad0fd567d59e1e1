"""Photographic textures (scikit-image's example images) sampled at points in millimetres."""
from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit
from scipy import ndimage

_TEXTURE_SOURCES: dict[str, tuple[str, tuple[float, float]]] = {
    # name: (skimage.data function, anisotropic blur (rows, cols) applied before use)
    "gravel": ("gravel", (0.0, 0.0)),
    "moon": ("moon", (0.0, 0.0)),
    "brushed": ("grass", (0.6, 10.0)),
    "fibre": ("grass", (6.0, 0.6)),
}


@cache
def _texture(name: str, sigma: float) -> np.ndarray:
    """A zero-mean, unit-variance grey texture from scikit-image's photographs, pre-blurred by
    `sigma` texels (anti-aliasing for coarse sampling)."""
    import skimage.data

    src, aniso = _TEXTURE_SOURCES[name]
    img = getattr(skimage.data, src)().astype(np.float32)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    img = img - ndimage.gaussian_filter(img, 24.0, mode="mirror")
    if aniso != (0.0, 0.0):
        img = ndimage.gaussian_filter(img, aniso, mode="mirror")
    if sigma > 0.3:
        img = ndimage.gaussian_filter(img, sigma, mode="mirror")
    img = img / (img.std() + 1e-6)
    return np.clip(img, -3.0, 3.0).astype(np.float32)


class TexSampler:
    """Samples textures at points given in millimetres, blurred for the sampling spacing."""

    def __init__(self, spacing_mm: float) -> None:
        self.spacing = spacing_mm

    def __call__(self, name: str, a: np.ndarray, b: np.ndarray, mm_per_texel: float,
                 offset: tuple[float, float] = (0.0, 0.0), angle: float = 0.0,
                 stretch: float = 1.0) -> np.ndarray:
        """Texture `name` at part-frame points (a, b) in mm, rotated by `angle` and
        stretched along a."""
        # quantised so that the blurred textures are cached across samples
        want = max(0.5 * self.spacing / mm_per_texel, 0.25)
        sigma = round(float(2.0 ** (np.round(np.log2(want) * 4) / 4)), 4)
        tex = _texture(name, sigma)
        ca, sa = np.cos(angle), np.sin(angle)
        x = (ca * a - sa * b) / (mm_per_texel * stretch) + offset[0]
        y = (sa * a + ca * b) / mm_per_texel + offset[1]
        return _tex_lookup(tex, np.ravel(y), np.ravel(x)).reshape(np.shape(a))


@njit(cache=True)
def _mirror(x: float, n: int) -> float:
    """`x` folded into [0, n - 1] by mirrored repetition."""
    period = 2.0 * (n - 1)
    x = abs(x) % period
    return period - x if x > n - 1 else x


@njit(cache=True)
def _tex_lookup(tex: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear texture samples at (y, x) with mirrored repetition."""
    n0, n1 = tex.shape
    out = np.empty(y.shape[0], dtype=np.float32)
    for p in range(y.shape[0]):
        yy = _mirror(y[p], n0)
        xx = _mirror(x[p], n1)
        i = min(int(yy), n0 - 2)
        j = min(int(xx), n1 - 2)
        fy = yy - i
        fx = xx - j
        out[p] = ((tex[i, j] * (1 - fx) + tex[i, j + 1] * fx) * (1 - fy)
                  + (tex[i + 1, j] * (1 - fx) + tex[i + 1, j + 1] * fx) * fy)
    return out
