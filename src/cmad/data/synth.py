"""Realistic synthetic RGB + 3D anomaly data in the MVTec 3D-AD layout.

Each sample is rendered from one scene: a part described as a height field (millimetres)
lying on a slightly tilted table, seen by a pinhole camera about 0.4 m away. Rays are cast
through the height field, so the organized point cloud and the RGB image come from the
same geometry: the point cloud has sensor noise and the invalid points of a structured-light
scanner (projector occlusion, grazing angles, specks, image borders), the RGB image is shaded
from the true normals (Lambert + Blinn-Phong, soft cast shadows, cavity darkening) with
photographic textures from scikit-image's data set modulating several materials that follow
the part's shape. Defects change the height field (dent), the albedo (stain: the colour of
another material of the part), or both (hole, cut, contamination); ground truth is exactly
the altered region as seen by the camera.

Every random choice comes from a generator seeded by (seed, category, split, folder, index),
so a sample does not depend on which other samples are generated, and the same seed gives
byte-identical files.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from numba import njit
from scipy import ndimage

from cmad.data.io import write_atomic, write_bytes_atomic, write_png_atomic, write_tiff_atomic
from cmad.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORY_NAMES",
    "CLASS_IDS",
    "DEFECT_TYPES",
    "SIZES",
    "Rendered",
    "generate",
    "montage",
    "render_sample",
]

# Defect folders and their gt values (class_ids.json); `combined` holds several of them.
DEFECT_TYPES: list[str] = ["contamination", "cut", "dent", "hole", "stain"]
CLASS_IDS: dict[str, int] = {"good": 0, **{d: 255 - i for i, d in enumerate(DEFECT_TYPES)}}
_COMBINED = "combined"

SIZES: dict[str, dict] = {
    "tiny": {"scale": 0.2, "n_categories": 2, "train": 4, "validation": 2,
             "test_good": 2, "test_per_defect": 1,
             "description": "about 64 x 48 px, 2 categories, 4/2/8 samples: for unit tests"},
    "small": {"scale": 0.5, "n_categories": 3, "train": 12, "validation": 4,
              "test_good": 4, "test_per_defect": 2,
              "description": "about 160 x 120 px, 3 categories, 12/4/16 samples"},
    "default": {"scale": 1.0, "n_categories": 5, "train": 40, "validation": 10,
                "test_good": 10, "test_per_defect": 5,
                "description": "about 320 x 240 px, 5 categories, 40/10/40 samples"},
}

_F0 = 1300.0          # focal length in pixels at scale 1 (about 0.31 mm per pixel at 0.4 m)
_Z0 = 400.0           # working distance in mm
_BASELINE = 100.0     # projector offset from the camera in mm (structured-light occlusion)
_OVERSAMPLE = 1.0     # height-field samples per pixel footprint


# --------------------------------------------------------------------------- textures

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


class _TexSampler:
    """Samples textures at points given in millimetres, blurred for the sampling spacing."""

    def __init__(self, spacing_mm: float) -> None:
        self.spacing = spacing_mm

    def __call__(self, name: str, a: np.ndarray, b: np.ndarray, mm_per_texel: float,
                 offset: tuple[float, float] = (0.0, 0.0), angle: float = 0.0,
                 stretch: float = 1.0) -> np.ndarray:
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


# --------------------------------------------------------------------------- categories

@dataclass(frozen=True)
class _Material:
    name: str
    color: tuple[float, float, float]     # sRGB albedo in [0, 1]
    texture: str
    tex_mm: float                         # millimetres per texel
    contrast: float
    ks: float = 0.05                      # specular strength
    shininess: float = 12.0
    metal: float = 0.0                    # 1: highlights take the albedo's colour
    tex_stretch: float = 1.0


@dataclass(frozen=True)
class _Category:
    name: str
    size: tuple[int, int]                 # (W, H) at scale 1
    radius: float                         # bound of the part's footprint in mm
    materials: tuple[_Material, ...]
    table: _Material
    cut_color: tuple[float, float, float]
    shape: Callable[..., tuple[np.ndarray, np.ndarray]]
    rotation: str = "free"                # "free" or "small" (long parts in wide images)
    desc: str = ""


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _fourier_ring(phi: np.ndarray, rng: np.random.Generator, orders: range,
                  amp: float) -> np.ndarray:
    """A smooth random periodic function of the angle, zero mean, amplitude about `amp`."""
    table = np.linspace(-4 * np.pi, 4 * np.pi, 4097)
    vals = np.zeros_like(table)
    for m in orders:
        vals += rng.uniform(0, amp / m ** 0.5) * np.cos(m * table + rng.uniform(0, 2 * np.pi))
    return np.interp(phi, table, vals)


def _local(a: np.ndarray, b: np.ndarray, ca: float, cb: float, r: float
           ) -> tuple[slice, slice]:
    """Index window of the grid (a, b affine in the indices) around (ca, cb), radius r mm."""
    ai, aj = a[1, 0] - a[0, 0], a[0, 1] - a[0, 0]
    bi, bj = b[1, 0] - b[0, 0], b[0, 1] - b[0, 0]
    det = ai * bj - aj * bi
    da, db = ca - a[0, 0], cb - b[0, 0]
    i = (da * bj - aj * db) / det
    j = (ai * db - da * bi) / det
    n = r / np.hypot(ai, bi) + 2
    n0, n1 = a.shape
    return (slice(int(np.clip(i - n, 0, n0)), int(np.clip(np.ceil(i + n) + 1, 0, n0))),
            slice(int(np.clip(j - n, 0, n1)), int(np.clip(np.ceil(j + n) + 1, 0, n1))))


def _shape_gland(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                 tex: _TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Cable gland: steel flange with four bolt holes and a dark rim, brass hex body with
    chamfered corners, a bright threaded collar, a black plastic dome nut and rubber seal."""
    rho = np.hypot(a, b)
    phi = np.arctan2(b, a)
    rf = 27.0 * rng.uniform(0.985, 1.015)
    h = np.where(rho <= rf, np.minimum(7.5, 5.8 + 1.3 * (rf - rho)), 0.0)
    holes = np.zeros_like(rho, dtype=bool)
    for k in range(4):
        ang = np.pi / 4 + k * np.pi / 2
        holes |= np.hypot(a - 21.0 * np.cos(ang), b - 21.0 * np.sin(ang)) < 2.6
    h = np.where(holes, 0.0, h)
    dist_hex = np.max(np.stack([np.abs(a * np.cos(t) + b * np.sin(t))
                                for t in (0.0, np.pi / 3, 2 * np.pi / 3)]), axis=0)
    hex_h = 13.0 + rng.uniform(-0.2, 0.2)
    hex_top = np.minimum(hex_h, hex_h - 1.2 * (rho - 14.6))
    in_hex = dist_hex <= 14.0
    h = np.where(in_hex, np.maximum(h, hex_top), h)
    collar = rho <= 12.3
    thread = hex_h + 1.6 + 0.28 * np.cos(2 * np.pi * rho / 0.85)
    h = np.where(collar, thread, h)
    dome = rho <= 10.0
    dome_h = hex_h + 2.0 + 3.5 * np.sqrt(np.clip(1.0 - ((rho - 6.8) / 3.3) ** 2, 0.0, 1.0))
    h = np.where(dome, dome_h, h)
    seal = rho <= 3.9
    h = np.where(seal, hex_h - 1.0 + 0.3 * np.cos(6 * phi) * (rho > 1.8), h)
    h = np.where(rho <= 1.8, hex_h - 4.0, h)
    on = h > 0
    w_rim = (on & ~in_hex & (rho > 23.8)).astype(np.float64)
    w_steel = (on & ~in_hex & (rho <= 23.8)).astype(np.float64)
    w_brass = (in_hex & ~collar).astype(np.float64)
    w_thread = (collar & ~dome).astype(np.float64)
    w_cap = (dome & ~seal).astype(np.float64)
    w_seal = seal.astype(np.float64)
    return h, np.stack([w_steel, w_rim, w_brass, w_thread, w_cap, w_seal])


def _shape_bagel(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                 tex: _TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Bagel: a flattened, lumpy torus; glossy brown glazed top over a pale floury flank,
    with sesame seeds on the glaze."""
    ell = rng.uniform(0.95, 1.05)
    rho = np.hypot(a * ell, b / ell)
    phi = np.arctan2(b, a)
    big_r = 24.0 * rng.uniform(0.96, 1.04) * (1 + _fourier_ring(phi, rng, range(2, 6), 0.03))
    tube = 12.0 * rng.uniform(0.95, 1.05) * (1 + _fourier_ring(phi, rng, range(2, 7), 0.08))
    q = (rho - big_r) / tube
    off = rng.uniform(0, 300, 2)
    lumps = tex("moon", a, b, 0.35, tuple(off))
    prof = np.sqrt(np.clip(1.0 - q ** 2, 0.0, 1.0))
    h = (1.2 + 11.0 * prof ** 0.8) * (1.0 + 0.03 * lumps) * (prof > 0)
    glaze_edge = 0.62 + 0.12 * _fourier_ring(phi * 3, rng, range(1, 5), 1.0)
    w_glaze = _smoothstep(glaze_edge + 0.08, glaze_edge - 0.08, np.abs(q)) * (prof > 0)
    w_seed = np.zeros_like(h)
    n_seeds = int(rng.integers(22, 38))
    for _ in range(n_seeds):
        ang = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(-0.5, 0.5)
        sa = np.mean(big_r) + rr * np.mean(tube)
        ca, cb = sa * np.cos(ang), sa * np.sin(ang)
        o = rng.uniform(0, np.pi)
        sl = _local(a, b, ca, cb, 1.6)
        la, lb = a[sl] - ca, b[sl] - cb
        da = la * np.cos(o) + lb * np.sin(o)
        db = -la * np.sin(o) + lb * np.cos(o)
        e = (da / 1.5) ** 2 + (db / 0.75) ** 2
        seed = np.clip(1.0 - e, 0.0, 1.0) * (prof[sl] > 0.3)
        h[sl] = h[sl] + 0.45 * np.sqrt(seed)
        w_seed[sl] = np.maximum(w_seed[sl], seed > 0)
    w_glaze = w_glaze * (1 - w_seed)
    on = (h > 0).astype(np.float64)
    w_flank = on * (1 - w_glaze - w_seed)
    return h, np.stack([w_glaze, w_flank, w_seed])


def _shape_rope(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                tex: _TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Rope: a three-strand laid rope lying on the table, whipped with red tape near both
    ends, frayed pale fibres at the ends."""
    r = 7.2 * rng.uniform(0.96, 1.04)
    half = 50.0 * rng.uniform(0.97, 1.03)
    pitch = 48.0 * rng.uniform(0.95, 1.05)
    psi = np.arcsin(np.clip(b / r, -1.0, 1.0))
    inside = np.abs(b) < r
    body = np.where(inside, r + np.sqrt(np.clip(r * r - b * b, 0.0, None)), 0.0)
    w = 3.0 * (a / pitch + psi / (2 * np.pi)) + rng.uniform(0, 3)
    qq = w - np.floor(w)
    strand = 1.0 - np.sqrt(np.clip(1.0 - (2 * qq - 1) ** 2, 0.0, 1.0))
    fib = tex("fibre", a, b, 0.10, tuple(rng.uniform(0, 300, 2)),
              angle=np.arctan2(2 * np.pi * r, pitch) * 0.6)
    h = body - (2.4 * strand ** 1.3 + 0.15 * fib) * np.cos(psi)
    aa = np.abs(a)
    tape_lo, tape_hi = half - 14.0, half - 5.0
    tape = (aa >= tape_lo) & (aa <= tape_hi) & inside
    tape_h = 0.5 + r + np.sqrt(np.clip((r + 0.5) ** 2 - b * b, 0.0, None))
    h = np.where(tape, np.maximum(tape_h - 0.5 * (np.abs(b) > r - 0.5), h), h)
    fray = (aa > tape_hi) & inside
    taper = np.clip((half + 2.0 - aa) / 7.0, 0.0, 1.0)
    h = np.where(fray, (body - 0.6 * np.abs(fib) - 1.2 * strand) * (0.55 + 0.45 * taper), h)
    h = np.where(aa > half + rng.uniform(0, 2), 0.0, h)
    h = np.clip(h, 0.0, None) * inside
    on = (h > 0.05).astype(np.float64)
    w_tape = tape * on
    w_fray = fray * on
    w_fibre = on * (1 - w_tape - w_fray)
    return h, np.stack([w_fibre, w_tape, w_fray])


def _shape_cookie(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                  tex: _TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Cookie: a rough irregular disc with a domed top, a darker baked rim and raised
    glossy chocolate chips."""
    rho = np.hypot(a, b)
    phi = np.arctan2(b, a)
    rc = 26.0 * rng.uniform(0.96, 1.04) * (1 + _fourier_ring(phi, rng, range(3, 9), 0.035))
    edge = 4.5
    top = 9.5 + 1.2 * (1 - (rho / rc) ** 2)
    d_in = rc - rho
    prof = np.where(d_in >= edge, 1.0,
                    np.sqrt(np.clip(1.0 - ((edge - d_in) / edge) ** 2, 0.0, 1.0)))
    off = tuple(rng.uniform(0, 300, 2))
    rough = tex("gravel", a, b, 0.09, off)
    lumps = tex("moon", a, b, 0.3, tuple(rng.uniform(0, 300, 2)))
    h = (top * prof + 0.22 * rough + 0.35 * lumps) * (d_in > 0)
    w_chip = np.zeros_like(h)
    for _ in range(int(rng.integers(9, 15))):
        rr = np.sqrt(rng.uniform(0, 1)) * (np.mean(rc) - 7.0)
        ang = rng.uniform(0, 2 * np.pi)
        ca, cb = rr * np.cos(ang), rr * np.sin(ang)
        size = rng.uniform(1.6, 3.0)
        sl = _local(a, b, ca, cb, size * 1.3)
        la, lb = a[sl] - ca, b[sl] - cb
        cphi = np.arctan2(lb, la)
        cr = size * (1 + 0.12 * np.cos(3 * cphi + rng.uniform(0, 6)) + 0.12 * np.cos(
            2 * cphi + rng.uniform(0, 6)))
        e = np.hypot(la, lb) / cr
        bump = np.sqrt(np.clip(1.0 - e ** 2, 0.0, 1.0))
        h[sl] = np.maximum(h[sl], (top[sl] * prof[sl] + rng.uniform(0.8, 1.4) * bump) * (bump > 0))
        w_chip[sl] = np.maximum(w_chip[sl], (bump > 0).astype(np.float64))
    h = np.clip(h, 0.0, None) * (d_in > 0)
    on = (h > 0).astype(np.float64)
    w_rim = _smoothstep(7.5, 2.5, d_in) * on * (1 - w_chip)
    w_dough = on * (1 - w_rim - w_chip)
    return h, np.stack([w_dough, w_rim, w_chip * on])


def _shape_tire(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                tex: _TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Toy tyre lying flat: black rubber sidewall with a rib and raised lettering, a tread
    with radial grooves on the shoulder, a silver rim with five holes and a red hub cap."""
    rho = np.hypot(a, b)
    phi = np.arctan2(b, a)
    r_in, r_out = 14.5, 31.0 * rng.uniform(0.99, 1.01)
    u = (rho - r_in) / (r_out - r_in)
    ring = (u >= 0) & (u <= 1)
    h_side = 8.0 + 7.5 * np.sqrt(np.clip(1.0 - ((u - 0.5) / 0.62) ** 2, 0.0, 1.0))
    h_side = h_side + 0.45 * np.exp(-((rho - 19.5) / 0.35) ** 2)
    letters = np.zeros_like(rho, dtype=bool)
    for _ in range(int(rng.integers(10, 16))):
        c = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.04, 0.12)
        dphi = np.angle(np.exp(1j * (phi - c)))
        letters |= (np.abs(dphi) < width / 2) & (np.abs(rho - 22.6) < 1.0)
    h_side = h_side + 0.35 * letters
    n_tread = 30
    tphase = phi * n_tread / (2 * np.pi) + 0.3 * np.sin(rho * 0.9)
    groove = ((tphase - np.floor(tphase)) < 0.28) | (np.abs(rho - 28.9) < 0.45)
    tread = (rho > 27.3) & groove
    h_side = h_side - 1.7 * tread
    h = np.where(ring, h_side, 0.0)
    rim = rho < r_in
    h_rim = np.full_like(rho, 6.2)
    holes = np.zeros_like(rim)
    for k in range(5):
        ang = 2 * np.pi * k / 5
        holes |= np.hypot(a - 9.6 * np.cos(ang), b - 9.6 * np.sin(ang)) < 2.6
    h_rim = np.where(holes, 0.0, h_rim)
    hub = rho < 4.2
    h_rim = np.where(hub, 6.2 + 2.8 * np.sqrt(np.clip(1 - (rho / 4.2) ** 2, 0.0, 1.0)), h_rim)
    h = np.where(rim, h_rim, h)
    w_side = (ring & ~tread & (rho <= 27.3)).astype(np.float64)
    w_tread = (ring & ((rho > 27.3) | tread)).astype(np.float64)
    w_rim = (rim & ~hub & ~holes).astype(np.float64)
    w_hub = hub.astype(np.float64)
    return h, np.stack([w_side, w_tread, w_rim, w_hub])


_TABLE_GREY = _Material("table", (0.50, 0.50, 0.52), "gravel", 0.25, 0.035, 0.02, 8.0)
_TABLE_DARK = _Material("table", (0.16, 0.16, 0.17), "gravel", 0.25, 0.05, 0.03, 8.0)

_CATEGORIES: dict[str, _Category] = {c.name: c for c in [
    _Category(
        "gland", (320, 240), 28.5,
        (_Material("steel", (0.46, 0.47, 0.49), "brushed", 0.08, 0.10, 0.35, 30.0, 1.0),
         _Material("rim", (0.25, 0.25, 0.27), "brushed", 0.08, 0.10, 0.25, 20.0, 1.0),
         _Material("brass", (0.70, 0.54, 0.26), "moon", 0.12, 0.06, 0.45, 40.0, 1.0),
         _Material("thread", (0.86, 0.74, 0.46), "brushed", 0.05, 0.06, 0.5, 40.0, 1.0),
         _Material("cap", (0.13, 0.13, 0.14), "gravel", 0.06, 0.10, 0.15, 25.0),
         _Material("seal", (0.06, 0.06, 0.06), "gravel", 0.06, 0.15, 0.05, 10.0)),
        _TABLE_GREY, (0.85, 0.85, 0.86), _shape_gland,
        desc="cable gland: flange with bolt holes, brass hex, threaded collar, black dome nut"),
    _Category(
        "rope", (400, 160), 53.0,
        (_Material("fibre", (0.62, 0.50, 0.33), "fibre", 0.10, 0.22, 0.03, 8.0),
         _Material("tape", (0.62, 0.10, 0.08), "moon", 0.3, 0.05, 0.30, 35.0),
         _Material("frayed", (0.82, 0.74, 0.58), "fibre", 0.10, 0.30, 0.02, 6.0)),
        _TABLE_DARK, (0.88, 0.82, 0.66), _shape_rope, rotation="small",
        desc="three-strand rope with red tape whippings and frayed ends, in a wide image"),
    _Category(
        "tire", (256, 320), 31.5,
        (_Material("rubber", (0.09, 0.09, 0.095), "gravel", 0.08, 0.10, 0.10, 14.0),
         _Material("tread", (0.12, 0.115, 0.11), "gravel", 0.06, 0.15, 0.05, 8.0),
         _Material("rim", (0.72, 0.73, 0.76), "brushed", 0.06, 0.06, 0.45, 35.0, 1.0),
         _Material("hub", (0.72, 0.14, 0.10), "moon", 0.3, 0.05, 0.35, 40.0)),
        _TABLE_GREY, (0.35, 0.34, 0.33), _shape_tire,
        desc="toy tyre lying flat: rubber sidewall, treaded shoulder, silver rim, red hub, in a "
             "tall image"),
    _Category(
        "bagel", (288, 240), 38.5,
        (_Material("glaze", (0.60, 0.38, 0.15), "gravel", 0.15, 0.12, 0.25, 22.0, 0.3),
         _Material("flank", (0.84, 0.70, 0.48), "gravel", 0.10, 0.18, 0.03, 6.0),
         _Material("seed", (0.93, 0.88, 0.72), "moon", 0.2, 0.05, 0.15, 20.0)),
        _TABLE_DARK, (0.93, 0.86, 0.68), _shape_bagel,
        desc="bagel: lumpy torus, glossy brown glaze on top, pale flank, sesame seeds"),
    _Category(
        "cookie", (272, 256), 28.5,
        (_Material("dough", (0.83, 0.64, 0.38), "gravel", 0.09, 0.22, 0.03, 6.0),
         _Material("baked", (0.55, 0.32, 0.14), "gravel", 0.09, 0.22, 0.04, 6.0),
         _Material("chip", (0.27, 0.15, 0.08), "moon", 0.2, 0.10, 0.45, 30.0)),
        _TABLE_GREY, (0.93, 0.80, 0.58), _shape_cookie,
        desc="cookie: rough irregular disc, darker baked rim, raised glossy chocolate chips"),
]}

CATEGORY_NAMES: list[str] = list(_CATEGORIES)

_FOREIGN_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.16, 0.36, 0.70), (0.22, 0.55, 0.28), (0.92, 0.92, 0.90), (0.05, 0.05, 0.06),
    (0.70, 0.22, 0.62), (0.85, 0.78, 0.12))


# --------------------------------------------------------------------------- ray casting

@njit(cache=True)
def _hsample(hg: np.ndarray, gi: float, gj: float) -> float:
    n0, n1 = hg.shape
    if gi < 0.0 or gj < 0.0 or gi > n0 - 1.0 or gj > n1 - 1.0:
        return 0.0
    i = int(gi)
    j = int(gj)
    i = min(i, n0 - 2)
    j = min(j, n1 - 2)
    fi = gi - i
    fj = gj - j
    return ((hg[i, j] * (1.0 - fj) + hg[i, j + 1] * fj) * (1.0 - fi)
            + (hg[i + 1, j] * (1.0 - fj) + hg[i + 1, j + 1] * fj) * fi)


@njit(cache=True)
def _clip(pu: float, pv: float, du: float, dv: float, s0: float, s1: float,
          box: np.ndarray) -> tuple[float, float]:
    """Clip the parameter range [s0, s1] of the line (pu, pv) + s (du, dv) to a box
    (u_min, u_max, v_min, v_max) (slab method); an empty range has s0 > s1."""
    for axis in range(2):
        p = pu if axis == 0 else pv
        d = du if axis == 0 else dv
        lo = box[2 * axis]
        hi = box[2 * axis + 1]
        if lo > hi:
            return 1.0, 0.0
        if abs(d) < 1e-12:
            if p < lo or p > hi:
                return 1.0, 0.0
            continue
        a = (lo - p) / d
        b = (hi - p) / d
        if a > b:
            a, b = b, a
        s0 = max(s0, a)
        s1 = min(s1, b)
    return s0, s1


@njit(cache=True)
def _raycast(hg: np.ndarray, ds: float, u0: float, v0: float, hmax: float, box: np.ndarray,
             origin: np.ndarray, dirs: np.ndarray, proj: np.ndarray, light: np.ndarray,
             soft: float) -> np.ndarray:
    """Cast one ray per pixel through the height field (table frame, mm).

    The height field is zero outside `box`. Returns (N, 6): depth t (the ray has unit z in
    the camera frame, so t is z in mm), hit u, v, h, 1.0 where the projector cannot see the
    hit point, and the light's visibility in [0, 1] (soft shadow)."""
    n = dirs.shape[0]
    out = np.zeros((n, 6))
    ou, ov, oh = origin[0], origin[1], origin[2]
    for p in range(n):
        du, dv, dh = dirs[p, 0], dirs[p, 1], dirs[p, 2]
        t_bot = (0.0 - oh) / dh
        hit = t_bot
        t_a, t_b = _clip(ou, ov, du, dv, (hmax - oh) / dh, t_bot, box)
        if t_a < t_b:
            horiz = np.sqrt(du * du + dv * dv) * (t_b - t_a)
            nst = int(horiz / (0.6 * ds)) + 2
            dt = (t_b - t_a) / nst
            t_prev = t_a
            for k in range(nst + 1):
                t = t_a + k * dt
                ph = oh + t * dh
                hh = _hsample(hg, (ov + t * dv - v0) / ds, (ou + t * du - u0) / ds)
                if ph <= hh:
                    lo = t_prev
                    hi = t
                    for _ in range(10):
                        m = 0.5 * (lo + hi)
                        if oh + m * dh <= _hsample(hg, (ov + m * dv - v0) / ds,
                                                   (ou + m * du - u0) / ds):
                            hi = m
                        else:
                            lo = m
                    hit = hi
                    break
                t_prev = t
        pu = ou + hit * du
        pv = ov + hit * dv
        ph = oh + hit * dh
        out[p, 0] = hit
        out[p, 1] = pu
        out[p, 2] = pv
        out[p, 3] = ph
        # projector occlusion: march toward the projector while below the highest point
        qu = proj[0] - pu
        qv = proj[1] - pv
        qh = proj[2] - ph
        qn = np.sqrt(qu * qu + qv * qv + qh * qh)
        qu /= qn
        qv /= qn
        qh /= qn
        step = 0.8 * ds / max(np.sqrt(qu * qu + qv * qv), 1e-6)
        s_a, s_b = _clip(pu, pv, qu, qv, step, (hmax - ph) / qh, box)
        if s_a < s_b:
            s = s_a
            while s <= s_b:
                hh = _hsample(hg, (pv + s * qv - v0) / ds, (pu + s * qu - u0) / ds)
                if hh > ph + s * qh + 0.08:
                    out[p, 4] = 1.0
                    break
                s += step
        # soft shadow toward the (directional) light
        lu, lv, lh = light[0], light[1], light[2]
        step = 1.25 * ds / max(np.sqrt(lu * lu + lv * lv), 1e-6)
        vis = 1.0
        s_a, s_b = _clip(pu, pv, lu, lv, step, (hmax - ph) / lh, box)
        if s_a < s_b:
            s = s_a
            while s <= s_b:
                hh = _hsample(hg, (pv + s * lv - v0) / ds, (pu + s * lu - u0) / ds)
                d = (ph + s * lh - hh) * soft / s
                if d < vis:
                    vis = d
                    if vis <= 0.0:
                        vis = 0.0
                        break
                s += step
        out[p, 5] = vis
    return out


@njit(cache=True)
def _bilinear(grid: np.ndarray, gi: np.ndarray, gj: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) of a (Gh, Gw, C) grid, clamped at its borders."""
    n0, n1, c = grid.shape
    n = gi.shape[0]
    out = np.empty((n, c), dtype=grid.dtype)
    for p in range(n):
        y = min(max(gi[p], 0.0), n0 - 1.0)
        x = min(max(gj[p], 0.0), n1 - 1.0)
        i = min(int(y), n0 - 2)
        j = min(int(x), n1 - 2)
        fy = y - i
        fx = x - j
        for k in range(c):
            out[p, k] = ((grid[i, j, k] * (1 - fx) + grid[i, j + 1, k] * fx) * (1 - fy)
                         + (grid[i + 1, j, k] * (1 - fx) + grid[i + 1, j + 1, k] * fx) * fy)
    return out


# --------------------------------------------------------------------------- scene

@dataclass
class _Scene:
    cat: _Category
    width: int
    height: int
    f: float
    cx: float
    cy: float
    e1: np.ndarray                # table axes in the camera frame
    e2: np.ndarray
    nrm: np.ndarray               # table normal, toward the camera
    c0: np.ndarray                # table origin (mm, camera frame)
    u0: float                     # grid origin and spacing in the table frame (mm)
    v0: float
    ds: float
    hgrid: np.ndarray             # (G, G) height above the table in mm (0 outside)
    weights: np.ndarray           # (K, Gh, Gw) material weights (table is what is left)
    center: np.ndarray            # part's position on the table (u, v)
    theta: float
    scale: float
    colors: np.ndarray            # (K + 1, 3) linear albedo, table last
    tex_offsets: np.ndarray       # (K + 1, 2)
    light_t: np.ndarray           # light direction in the table frame
    light_i: float
    ambient: float
    exposure: float
    tex: _TexSampler


@dataclass
class _Defect:
    kind: str
    support: np.ndarray           # bool over the grid: the gt region
    dh: np.ndarray                # height change (mm) over the grid
    alpha: np.ndarray             # colour blend weight over the grid
    color: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class Rendered:
    """One rendered sample: rgb uint8 (H, W, 3), xyz float32 (H, W, 3) in metres with
    invalid points exactly 0, gt uint8 (H, W) with class_ids values."""

    rgb: np.ndarray
    xyz: np.ndarray
    gt: np.ndarray


def _mul3(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x (N, 3) @ m (3, K) without BLAS."""
    return x[:, 0:1] * m[0][None, :] + x[:, 1:2] * m[1][None, :] + x[:, 2:3] * m[2][None, :]


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.power(np.clip(c, 0.0, 1.0), 2.2)


def _image_size(cat: _Category, scale: float) -> tuple[int, int]:
    return max(16, round(cat.size[0] * scale)), max(16, round(cat.size[1] * scale))


def _camera(cat: _Category, scale: float) -> dict[str, float]:
    w, h = _image_size(cat, scale)
    f = _F0 * w / cat.size[0]
    return {"fx": f, "fy": f, "cx": (w - 1) / 2.0 + 0.013 * w, "cy": (h - 1) / 2.0 - 0.011 * h,
            "width": w, "height": h}


def _rot(axis: np.ndarray, ang: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


def _build_scene(cat: _Category, scale: float, rng: np.random.Generator) -> _Scene:
    cam = _camera(cat, scale)
    w, h, f, cx, cy = cam["width"], cam["height"], cam["fx"], cam["cx"], cam["cy"]
    z0 = _Z0 * rng.uniform(0.975, 1.025)
    tilt_axis = np.array([np.cos(t := rng.uniform(0, 2 * np.pi)), np.sin(t), 0.0])
    nrm = _rot(tilt_axis, np.deg2rad(rng.uniform(1.0, 4.0))) @ np.array([0.0, 0.0, -1.0])
    e1 = np.array([1.0, 0.0, 0.0]) - nrm[0] * nrm
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e1, nrm)
    c0 = np.array([0.0, 0.0, z0])
    ds = z0 / f / _OVERSAMPLE
    # the part's pose on the table (the table origin is on the optical axis)
    if cat.rotation == "small":
        theta = rng.uniform(-0.09, 0.09) + np.pi * rng.integers(0, 2)
        center = np.array([rng.uniform(-4, 4), rng.uniform(-2.5, 2.5)])
    else:
        theta = rng.uniform(0, 2 * np.pi)
        center = rng.uniform(-3.5, 3.5, 2)
    scale_part = rng.uniform(0.96, 1.04)
    # the height-field grid covers the part and a margin (for contact shadows); the table
    # outside it is flat
    rb = cat.radius * scale_part + 9.0
    n = int(np.ceil(2 * rb / ds)) + 1
    u0, v0 = center[0] - rb, center[1] - rb
    uu, vv = np.meshgrid(u0 + ds * np.arange(n) - center[0], v0 + ds * np.arange(n) - center[1])
    ct, st = np.cos(theta), np.sin(theta)
    a = (ct * uu + st * vv) / scale_part
    b = (-st * uu + ct * vv) / scale_part
    hw, ww = cat.shape(a, b, rng, _TexSampler(ds / scale_part))
    hgrid = hw * scale_part
    weights = ndimage.gaussian_filter(ww, (0, 0.6, 0.6))
    mats = list(cat.materials) + [cat.table]
    jitter = rng.normal(1.0, 0.02, (len(mats), 3)) * rng.normal(1.0, 0.04, (len(mats), 1))
    jitter[-1] = 1.0 + 0.3 * (jitter[-1] - 1.0)
    colors = _srgb_to_linear(np.array([m.color for m in mats]) * jitter)
    el = np.deg2rad(rng.uniform(45, 72))
    az = rng.uniform(0, 2 * np.pi)
    light_t = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return _Scene(cat=cat, width=w, height=h, f=f, cx=cx, cy=cy, e1=e1, e2=e2, nrm=nrm, c0=c0,
                  u0=u0, v0=v0, ds=ds, hgrid=hgrid, weights=weights, center=center,
                  theta=theta, scale=scale_part, colors=colors,
                  tex_offsets=rng.uniform(0, 400, (len(mats), 2)), light_t=light_t,
                  light_i=rng.uniform(0.85, 1.15), ambient=rng.uniform(0.22, 0.34),
                  exposure=rng.uniform(0.92, 1.08), tex=_TexSampler(ds))


# --------------------------------------------------------------------------- defects

_RADIUS_MM: dict[str, tuple[float, float]] = {
    "dent": (2.6, 8.5), "stain": (2.2, 9.5), "hole": (1.6, 3.8),
    "contamination": (1.6, 6.0), "cut": (8.0, 22.0),   # cut: length
}


def _blob(a: np.ndarray, b: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Normalised depth inside an irregular blob: 1 at the centre, 0 at its edge, < 0 out."""
    ell = rng.uniform(0.6, 1.0)
    o = rng.uniform(0, np.pi)
    da = a * np.cos(o) + b * np.sin(o)
    db = (-a * np.sin(o) + b * np.cos(o)) / ell
    ang = np.arctan2(db, da)
    rr = radius * (1 + _fourier_ring(ang, rng, range(2, 6), 0.18))
    return 1.0 - np.hypot(da, db) / rr


def _placeable(scene: _Scene) -> np.ndarray:
    """Where a defect centre may go: on the part, on surfaces that face the camera."""
    hw = scene.hgrid
    gy, gx = np.gradient(ndimage.gaussian_filter(hw, 0.8 / scene.ds), scene.ds)
    return (hw > 0.8) & (np.hypot(gx, gy) < 0.9)


def _make_defect(kind: str, scene: _Scene, rng: np.random.Generator,
                 dist: np.ndarray, taken: np.ndarray) -> _Defect | None:
    """One defect of `kind` at a random placeable spot of the part, or None."""
    hw = scene.hgrid
    lo, hi = _RADIUS_MM[kind]
    size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    while True:   # shrink the defect until it fits on the part
        need = (size if kind != "cut" else 1.5) * 0.75 / scene.ds
        cand = np.flatnonzero((dist >= need) & ~taken)
        if cand.size or size < 0.4 * lo:
            break
        size *= 0.85
    if cand.size == 0:
        return None
    ci, cj = np.unravel_index(cand[rng.integers(cand.size)], hw.shape)
    ii, jj = np.mgrid[0:hw.shape[0], 0:hw.shape[1]]
    a = (jj - cj) * scene.ds
    b = (ii - ci) * scene.ds
    on = hw > 0.3
    zero = np.zeros_like(hw)
    if kind == "cut":
        o = rng.uniform(0, np.pi)
        pa = a * np.cos(o) + b * np.sin(o)
        pb = -a * np.sin(o) + b * np.cos(o)
        curv = rng.uniform(-0.02, 0.02)
        pb = pb - curv * pa ** 2
        width = rng.uniform(0.9, 1.8)
        half_len = size / 2
        taper = np.sqrt(np.clip(1 - (pa / half_len) ** 2, 0.0, 1.0))
        m = 1.0 - np.abs(pb) / (0.5 * width * np.maximum(taper, 1e-6))
        m = np.where(taper > 0, m, -1.0)
        support = (m > 0) & on
        depth = rng.uniform(0.8, 2.0)
        dh = -depth * np.clip(m, 0, 1) ** 0.7 * np.minimum(1.0, 3 * taper) * support
        alpha = np.clip(2.5 * m, 0, 1) * 0.85 * support
        return _Defect(kind, support, dh, alpha, scene.cat.cut_color)
    m = _blob(a, b, size, rng)
    support = (m > 0) & on
    mc = np.clip(m, 0.0, 1.0)
    if kind == "dent":
        # a gentle bowl: the slope stays small, so it shows only through shading
        depth = min(rng.uniform(0.5, 1.5), max(0.5, 0.2 * size))
        dh = -depth * _smoothstep(0.0, 1.0, mc) * support
        return _Defect(kind, support, dh, zero)
    if kind == "stain":
        local = scene.weights[:, ci, cj]
        here = int(np.argmax(local))
        lin = scene.colors[:-1]
        others = [k for k in range(len(lin)) if k != here]
        dist_c = [float(np.abs(lin[k] - lin[here]).sum()) for k in others]
        k = others[int(rng.choice(len(others), p=np.array(dist_c) / sum(dist_c)))]
        color = tuple(float(x) for x in np.power(lin[k], 1 / 2.2))
        alpha = (rng.uniform(0.7, 0.95) * _smoothstep(0.0, 0.25, mc)) * support
        alpha = np.where(support, np.maximum(alpha, 0.25), 0.0)
        return _Defect(kind, support, zero, alpha, color)
    if kind == "hole":
        depth = rng.uniform(4.0, 9.0)
        dh = -np.minimum(hw, depth * _smoothstep(0.0, 0.2, mc)) * support
        alpha = _smoothstep(0.0, 0.35, mc) * support
        return _Defect(kind, support, dh, alpha, (0.03, 0.025, 0.02))
    if kind == "contamination":
        local = scene.colors[:-1].mean(axis=0)
        ranked = sorted(_FOREIGN_COLORS, key=lambda c: -float(
            np.abs(_srgb_to_linear(np.array(c)) - local).sum()))
        color = ranked[int(rng.integers(0, 3))]
        height = rng.uniform(0.5, 1.8)
        rough = scene.tex("gravel", a, b, 0.07, tuple(rng.uniform(0, 300, 2)))
        dh = (height * np.sqrt(mc) * (1 + 0.1 * rough)) * support
        alpha = np.where(support, np.maximum(_smoothstep(0.0, 0.1, mc), 0.3), 0.0)
        return _Defect(kind, support, dh, alpha, color)
    raise ConfigError(f"unknown defect type {kind!r}")


def _place_defects(scene: _Scene, kinds: list[str], rng: np.random.Generator
                   ) -> list[_Defect]:
    if not kinds:
        return []
    ok = _placeable(scene)
    dist = ndimage.distance_transform_edt(ok)
    taken = np.zeros_like(ok)
    out = []
    for kind in kinds:
        d = None
        for _ in range(6):
            d = _make_defect(kind, scene, rng, dist, taken)
            if d is not None:
                break
        if d is None:
            continue
        out.append(d)
        taken |= ndimage.binary_dilation(d.support, iterations=max(1, int(2.0 / scene.ds)))
    return out


# --------------------------------------------------------------------------- rendering

def _render(scene: _Scene, defects: list[_Defect], rng: np.random.Generator) -> Rendered:
    cat = scene.cat
    w, h, ds = scene.width, scene.height, scene.ds
    k_mat = len(cat.materials)
    hgrid = scene.hgrid.copy()
    gh, gw = hgrid.shape
    gt_grid = np.zeros((gh, gw), dtype=np.uint8)
    # defect channels: stain, cut, contamination alphas and colours; hole alpha
    n_def = len(defects)
    d_alpha = np.zeros((max(n_def, 1), gh, gw))
    hole_a = np.zeros((gh, gw))
    for idx, d in enumerate(defects):
        hgrid += d.dh
        gt_grid[d.support] = CLASS_IDS[d.kind]
        if d.kind == "hole":
            hole_a = np.maximum(hole_a, d.alpha)
        else:
            d_alpha[idx] = d.alpha
    hgrid = np.clip(hgrid, 0.0, None)
    gy, gx = np.gradient(hgrid, ds)
    c1 = ndimage.gaussian_filter(hgrid, 0.8 / ds) - hgrid
    coarse = ndimage.gaussian_filter(hgrid[::4, ::4], 1.0 / ds)
    ii, jj = np.mgrid[0:gh, 0:gw]
    c2 = ndimage.map_coordinates(coarse, [ii / 4.0, jj / 4.0], order=1, mode="nearest") - hgrid
    ao = np.clip(1.0 - 0.25 * np.clip(c1, 0, None) - 0.06 * np.clip(c2, 0, None), 0.25, 1.0)
    chans = [gx, gy, ao, hole_a] + list(scene.weights) + list(d_alpha)
    grid = np.ascontiguousarray(np.stack(chans, axis=2).astype(np.float32))

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dcam = np.stack([(xs.ravel() - scene.cx) / scene.f, (ys.ravel() - scene.cy) / scene.f,
                     np.ones(w * h)], axis=1)
    basis = np.stack([scene.e1, scene.e2, scene.nrm])
    # explicit products: a BLAS call on (N, 3) arrays is slow and threads needlessly
    dirs = _mul3(dcam, basis.T)
    origin = basis @ (-scene.c0)
    proj = basis @ (np.array([_BASELINE, 0.0, 0.0]) - scene.c0)
    # march limits from the defect-free part too, so that a defect changes nothing else
    hmax = float(max(hgrid.max(), scene.hgrid.max())) + 0.5
    occupied = (hgrid > 0) | (scene.hgrid > 0)
    rows = np.flatnonzero(occupied.any(axis=1))
    cols = np.flatnonzero(occupied.any(axis=0))
    if rows.size:
        box = np.array([scene.u0 + (cols[0] - 1.5) * ds, scene.u0 + (cols[-1] + 1.5) * ds,
                        scene.v0 + (rows[0] - 1.5) * ds, scene.v0 + (rows[-1] + 1.5) * ds])
    else:
        box = np.array([0.0, -1.0, 0.0, -1.0])
    rc = _raycast(hgrid, ds, scene.u0, scene.v0, hmax, box, origin,
                  np.ascontiguousarray(dirs), proj, scene.light_t, 8.0)
    t, pu, pv = rc[:, 0], rc[:, 1], rc[:, 2]
    gi = (pv - scene.v0) / ds
    gj = (pu - scene.u0) / ds
    s = _bilinear(grid, gi, gj).astype(np.float64)
    hu, hv, ao_p, hole_p = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
    wmat = s[:, 4:4 + k_mat]
    dal = s[:, 4 + k_mat:]
    ni = np.clip(np.rint(gi).astype(np.int64), 0, gh - 1)
    nj = np.clip(np.rint(gj).astype(np.int64), 0, gw - 1)
    gt = gt_grid[ni, nj].reshape(h, w)

    # normals (camera frame) and view vectors
    nrm = scene.nrm[None, :] - hu[:, None] * scene.e1[None, :] - hv[:, None] * scene.e2[None, :]
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    view = -dcam / np.linalg.norm(dcam, axis=1, keepdims=True)
    cos_v = np.einsum("ij,ij->i", nrm, view)

    # albedo: materials with textures in the part's frame, the table in its own frame
    ct, st = np.cos(scene.theta), np.sin(scene.theta)
    ru, rv = pu - scene.center[0], pv - scene.center[1]
    oa = (ct * ru + st * rv) / scene.scale
    ob = (-st * ru + ct * rv) / scene.scale
    mats = list(cat.materials) + [cat.table]
    w_table = np.clip(1.0 - wmat.sum(axis=1), 0.0, 1.0)
    wall = np.concatenate([wmat, w_table[:, None]], axis=1)
    albedo = np.zeros((w * h, 3))
    props = np.zeros((w * h, 3))      # specular strength, shininess, metalness
    for k, m in enumerate(mats):
        sel = np.flatnonzero(wall[:, k] > 1e-3)
        if sel.size == 0:
            continue
        ta, tb = (pu, pv) if k == k_mat else (oa, ob)
        tx = scene.tex(m.texture, ta[sel], tb[sel], m.tex_mm, tuple(scene.tex_offsets[k]),
                       stretch=m.tex_stretch)
        wk = wall[sel, k]
        albedo[sel] += (wk * np.clip(1.0 + m.contrast * tx, 0.2, 2.0))[:, None] * scene.colors[k]
        props[sel] += wk[:, None] * np.array([m.ks, m.shininess, m.metal])
    ks, shin, metal = props[:, 0], props[:, 1], props[:, 2]
    for idx, d in enumerate(defects):
        if d.kind == "hole" or d.color is None:
            continue
        al = np.clip(dal[:, idx], 0.0, 1.0)
        sel = al > 1e-4
        if not sel.any():
            continue
        col = _srgb_to_linear(np.array(d.color))
        tx = scene.tex("gravel", oa[sel], ob[sel], 0.08, (idx * 97.0, 13.0))
        tint = col[None, :] * np.clip(1.0 + 0.15 * tx, 0.5, 1.5)[:, None]
        if d.kind == "stain":
            # a stain keeps the texture's shading: multiply by the ratio of colours
            base = albedo[sel].mean(axis=1, keepdims=True) + 1e-3
            tint = tint * np.clip(albedo[sel] / base, 0.5, 1.5) ** 0.3
        albedo[sel] = (1 - al[sel, None]) * albedo[sel] + al[sel, None] * tint
        if d.kind == "contamination":
            ks[sel] = (1 - al[sel]) * ks[sel] + al[sel] * 0.12
            metal[sel] *= 1 - al[sel]
    albedo *= (1.0 - 0.85 * hole_p)[:, None]
    ks *= 1.0 - hole_p

    # shading: ambient with cavity occlusion, Lambert with soft shadows, Blinn-Phong
    light = scene.light_t @ np.stack([scene.e1, scene.e2, scene.nrm])
    vis = np.clip(rc[:, 5], 0.0, 1.0)
    lam = np.clip(_mul3(nrm, light[:, None])[:, 0], 0.0, None)
    half = light[None, :] + view
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = np.clip(np.einsum("ij,ij->i", nrm, half), 0.0, 1.0) ** np.maximum(shin, 1.0)
    spec *= (shin + 2) / 8.0 * 0.25
    shade = scene.ambient * ao_p * (0.6 + 0.4 * np.clip(nrm[:, 2] * -1.0, 0, 1)) + (
        scene.light_i * (1 - scene.ambient) * lam * (0.25 + 0.75 * vis))
    spec_col = (1 - metal)[:, None] + metal[:, None] * albedo / (
        albedo.max(axis=1, keepdims=True) + 1e-3)
    lin = albedo * shade[:, None] + (ks * scene.light_i * spec * vis * lam ** 0.2)[:, None] * (
        spec_col)
    rr = ((xs.ravel() - w / 2) ** 2 + (ys.ravel() - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    lin *= (scene.exposure * 1.25 * (1.0 - 0.22 * rr))[:, None]
    img = np.power(np.clip(lin, 0.0, 1.0), 1 / 2.2).reshape(h, w, 3)
    img = ndimage.gaussian_filter(img, (0.55, 0.55, 0), mode="nearest")
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * (0.008 + 0.012 * np.sqrt(img))
    rgb = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    # point cloud: noise along the ray, then the scanner's invalid points
    sigma = rng.uniform(0.10, 0.25)
    noise = rng.normal(0.0, 1.0, w * h) * sigma / np.clip(np.abs(cos_v), 0.3, 1.0)
    z = t + noise
    xyz = (dcam * z[:, None]).reshape(h, w, 3) / 1000.0
    invalid = rc[:, 4] > 0.5
    invalid |= np.abs(cos_v) < rng.uniform(0.12, 0.3, w * h)
    invalid |= (hole_p > 0.3) & (rng.random(w * h) < 0.55)
    invalid |= rng.random(w * h) < rng.uniform(0.001, 0.004)
    invalid = invalid.reshape(h, w)
    zz = t.reshape(h, w)
    jump = np.zeros((h, w), dtype=bool)
    dz_x = np.abs(np.diff(zz, axis=1)) > 1.5
    dz_y = np.abs(np.diff(zz, axis=0)) > 1.5
    jump[:, 1:] |= dz_x
    jump[:, :-1] |= dz_x
    jump[1:, :] |= dz_y
    jump[:-1, :] |= dz_y
    invalid |= jump & (rng.random((h, w)) < 0.6)
    for _ in range(int(rng.integers(2, 6))):
        ci, cj = rng.integers(0, h), rng.integers(0, w)
        rad = rng.uniform(0.8, 2.2) * max(1.0, w / 320)
        yy, xx = np.ogrid[0:h, 0:w]
        invalid |= (yy - ci) ** 2 + (xx - cj) ** 2 <= rad ** 2
    bw = max(1, round(w / 160))
    sides = rng.integers(0, bw + 1, 4)
    invalid[:sides[0], :] = True
    invalid[h - sides[1]:, :] = True
    invalid[:, :sides[2]] = True
    invalid[:, w - sides[3]:] = True
    xyz[invalid] = 0.0
    return Rendered(rgb=rgb, xyz=np.ascontiguousarray(xyz, dtype=np.float32), gt=gt)


# --------------------------------------------------------------------------- sample plan

_SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}


def _rngs(seed: int, category: str, split: str, folder: str, index: int
          ) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    ss = np.random.SeedSequence([seed, zlib.crc32(category.encode()), _SPLIT_CODES[split],
                                 zlib.crc32(folder.encode()), index])
    a, b, c = ss.spawn(3)
    return np.random.default_rng(a), np.random.default_rng(b), np.random.default_rng(c)


def _folder_kinds(folder: str, rng: np.random.Generator) -> list[str]:
    if folder == "good":
        return []
    if folder == _COMBINED:
        n = int(rng.integers(2, 4))
        return list(rng.choice(DEFECT_TYPES, size=n, replace=False))
    return [folder]


def _sample(cat: _Category, scale: float, seed: int, split: str, folder: str, index: int,
            with_defects: bool = True) -> Rendered:
    r_scene, r_def, r_noise = _rngs(seed, cat.name, split, folder, index)
    scene = _build_scene(cat, scale, r_scene)
    kinds = _folder_kinds(folder, r_def)
    min_px = max(3, int(0.0008 * scene.width * scene.height))
    best: tuple[int, list[_Defect], Rendered] | None = None
    for _ in range(8):
        defects = _place_defects(scene, kinds, r_def)
        out = _render(scene, defects, np.random.default_rng(r_noise.bit_generator.seed_seq))
        if not kinds:
            return out
        counts = [int((out.gt == CLASS_IDS[d.kind]).sum()) for d in defects]
        worst = min(counts) if len(defects) == len(kinds) else 0
        if best is None or worst > best[0]:
            best = (worst, defects, out)
        if worst >= min_px and (out.gt > 0).mean() <= 0.035:
            break
    assert best is not None
    if best[0] == 0:
        raise RuntimeError(f"could not place {kinds} on {cat.name} {split}/{folder}/{index}")
    if not with_defects:
        return _render(scene, [], np.random.default_rng(r_noise.bit_generator.seed_seq))
    return best[2]


def render_sample(category: str, defect: str | None = None, seed: int = 0,
                  size: str = "tiny", index: int = 0, with_defect: bool = True) -> Rendered:
    """Render one test sample of `category` with `defect` (a DEFECT_TYPES name, "combined" or
    None for a good one). With `with_defect=False` the same scene, pose, lighting and noise
    are rendered without the defect, so the two differ only by what the defect changes."""
    cat = _category(category)
    folder = defect if defect is not None else "good"
    if folder not in DEFECT_TYPES + [_COMBINED, "good"]:
        raise ConfigError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")
    return _sample(cat, _preset(size)["scale"], seed, "test", folder, index, with_defect)


def _category(name: str) -> _Category:
    if name not in _CATEGORIES:
        raise ConfigError(f"unknown synthetic category {name!r}; expected one of "
                          f"{CATEGORY_NAMES}")
    return _CATEGORIES[name]


def _preset(size: str) -> dict:
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    return SIZES[size]


# --------------------------------------------------------------------------- writing

_README = """Synthetic data generated by cmad (cmad.data.synth), not a real scan.

Category: {name} - {desc}.
Generated with seed {seed}, size preset "{size}" ({w} x {h} px, W x H).

Layout as in MVTec 3D-AD: rgb/NNN.png (8-bit RGB), xyz/NNN.tiff (float32 H x W x 3
organized point cloud in metres, invalid points exactly 0), gt/NNN.png (mode L; values
from class_ids.json, 0 = good). The folder `combined` holds samples with several defect
types, each region with its own value.

Scene: pinhole camera (calibration/camera_parameters.json) about 0.4 m above a slightly
tilted table; the part is a height field rendered by ray casting, the RGB image shaded
from the true normals with textures from scikit-image's example photographs; depth noise
of 0.1-0.25 mm; invalid points from projector occlusion, grazing angles, specks and the
image border. Defects: dent (geometry only), stain (colour only: the colour of another
material of the part), hole, cut, contamination (both).
"""

_LICENSE = """This synthetic data was generated by cmad and is released under the same licence as
cmad (Apache-2.0). Its textures derive from scikit-image's example images
(skimage.data: grass, gravel, moon), which scikit-image distributes under
permissive licences (see skimage/data/README.txt of scikit-image).
"""


def _plan(preset: dict) -> list[tuple[str, str, int]]:
    jobs = [("train", "good", i) for i in range(preset["train"])]
    jobs += [("validation", "good", i) for i in range(preset["validation"])]
    jobs += [("test", "good", i) for i in range(preset["test_good"])]
    for folder in DEFECT_TYPES + [_COMBINED]:
        jobs += [("test", folder, i) for i in range(preset["test_per_defect"])]
    return jobs


def _is_ours(folder: Path) -> bool:
    readme = folder / "readme.txt"
    try:
        return readme.read_text(encoding="utf-8").startswith("Synthetic data generated by cmad")
    except OSError:
        return False


def _write_sample(job: tuple[str, float, int, str, str, int, str]) -> None:
    """Render one sample and write its files (runs in a worker process when parallel)."""
    name, scale, seed, split, folder, idx, tmp = job
    r = _sample(_CATEGORIES[name], scale, seed, split, folder, idx)
    base = Path(tmp) / split / folder
    stem = f"{idx:03d}"
    # low compression: the sensor noise makes PNGs nearly incompressible anyway
    write_png_atomic(base / "rgb" / f"{stem}.png", r.rgb, compress_level=1)
    write_tiff_atomic(base / "xyz" / f"{stem}.tiff", r.xyz)
    if split == "test":
        write_png_atomic(base / "gt" / f"{stem}.png", r.gt)


def _write_meta(tmp: Path, cat: _Category, seed: int, size: str, scale: float) -> None:
    cam = _camera(cat, scale)
    write_bytes_atomic(tmp / "class_ids.json", (json.dumps(CLASS_IDS, indent=2) + "\n").encode())
    pix = 5e-6
    params = {
        "model": "pinhole", "units": "pixels (fx, fy, cx, cy); metres (focus, sx, sy)",
        "fx": cam["fx"], "fy": cam["fy"], "cx": cam["cx"], "cy": cam["cy"],
        "image_width": cam["width"], "image_height": cam["height"],
        "focus": cam["fx"] * pix, "sx": pix, "sy": pix, "kappa": 0.0,
        "synthetic": True,
    }
    write_bytes_atomic(tmp / "calibration" / "camera_parameters.json",
                       (json.dumps(params, indent=2) + "\n").encode())
    write_bytes_atomic(tmp / "readme.txt", _README.format(
        name=cat.name, desc=cat.desc, seed=seed, size=size, w=cam["width"],
        h=cam["height"]).encode())
    write_bytes_atomic(tmp / "license.txt", _LICENSE.encode())


def _install(tmp: Path, final: Path) -> None:
    """Move a finished category folder into place, replacing an older synthetic one."""
    if final.exists():
        old = final.with_name(f".{final.name}.synth-old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def generate(out: Path, categories: int | list[str] | None = None, seed: int = 0,
             size: str = "default", progress: bool = True, workers: int | None = None) -> Path:
    """Write a synthetic dataset in the MVTec 3D-AD layout under `out` and return `out`.

    categories: None for the preset's number, an int N for the first N of CATEGORY_NAMES,
    or a list of names. Each category is written to a hidden temporary folder and renamed
    into place when complete; an existing category folder is replaced only if it is cmad
    synthetic data. workers: processes to render with (default: the CPUs available; small
    jobs run in this process). The files do not depend on the number of workers."""
    from tqdm import tqdm

    preset = _preset(size)
    if categories is None:
        names = CATEGORY_NAMES[:preset["n_categories"]]
    elif isinstance(categories, int):
        if not 1 <= categories <= len(CATEGORY_NAMES):
            raise ConfigError(f"categories must be 1..{len(CATEGORY_NAMES)}, got {categories}")
        names = CATEGORY_NAMES[:categories]
    else:
        names = list(dict.fromkeys(categories))
        if not names:
            raise ConfigError("no categories given")
    cats = [_category(n) for n in names]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for cat in cats:
        final = out / cat.name
        if final.exists() and not _is_ours(final):
            raise DataError(final, "exists and is not cmad synthetic data; refusing to overwrite")
    scale = preset["scale"]
    plan = _plan(preset)
    jobs = []
    tmps = {}
    for cat in cats:
        tmp = out / f".{cat.name}.synth-tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmps[cat.name] = tmp
        jobs += [(cat.name, scale, seed, split, folder, idx, str(tmp))
                 for split, folder, idx in plan]
    n_workers = _default_workers() if workers is None else max(1, int(workers))
    # fork only: forkserver/spawn would re-run the caller's main module
    if len(jobs) < 48 or sys.platform != "linux" or "fork" not in mp.get_all_start_methods():
        n_workers = 1
    with tqdm(total=len(jobs), desc="synth", unit="sample", disable=not progress) as bar:
        if n_workers == 1:
            for job in jobs:
                _write_sample(job)
                bar.update(1)
        else:
            _write_sample(jobs[0])   # compiles (or loads) the numba kernels before forking
            bar.update(1)
            with mp.get_context("fork").Pool(n_workers) as pool:
                for _ in pool.imap_unordered(_write_sample, jobs[1:], chunksize=2):
                    bar.update(1)
    for cat in cats:
        _write_meta(tmps[cat.name], cat, seed, size, scale)
        _install(tmps[cat.name], out / cat.name)
    logger.info("wrote %d synthetic samples of %d categories to %s", len(jobs), len(cats), out)
    return out


# --------------------------------------------------------------------------- montage

def montage(root: Path, out_png: Path, per_category: int = 4) -> Path:
    """Save a figure with one row per category under `root`: for a good training sample and
    test samples of different defect types, rgb | depth (invalid points black) | gt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmad.data.io import read_gt, read_rgb, read_xyz

    root = Path(root)
    rows: list[list[tuple[str, Path, Path, Path | None]]] = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        picks: list[tuple[str, Path, Path, Path | None]] = []
        tr = sorted((cat_dir / "train" / "good" / "rgb").glob("*.png"))
        if tr:
            picks.append((f"{cat_dir.name} train/good/{tr[0].stem}", tr[0],
                          tr[0].parent.parent / "xyz" / f"{tr[0].stem}.tiff", None))
        test = cat_dir / "test"
        prefer = [_COMBINED, "stain", "dent", "hole", "cut", "contamination"]
        folders = sorted((d for d in test.iterdir() if d.is_dir() and d.name != "good"),
                         key=lambda d: (prefer.index(d.name) if d.name in prefer else 99,
                                        d.name)) if test.is_dir() else []
        for d in folders:
            files = sorted((d / "rgb").glob("*.png"))
            if files:
                f = files[0]
                picks.append((f"{d.name}/{f.stem}", f, d / "xyz" / f"{f.stem}.tiff",
                              d / "gt" / f"{f.stem}.png"))
        if picks:
            rows.append(picks[:per_category])
    if not rows:
        raise DataError(root, "no samples found for a montage")
    ncol = 3 * max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, 2.0 * len(rows)),
                             squeeze=False)
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="black")
    for r, picks in enumerate(rows):
        for c, (title, rgb_p, xyz_p, gt_p) in enumerate(picks):
            rgb = read_rgb(rgb_p)
            xyz, valid = read_xyz(xyz_p)
            z = xyz[..., 2]
            lo, hi = np.percentile(z[valid], [1, 99]) if valid.any() else (0.0, 1.0)
            ax_rgb, ax_z, ax_gt = axes[r, 3 * c], axes[r, 3 * c + 1], axes[r, 3 * c + 2]
            ax_rgb.imshow(rgb)
            ax_rgb.set_title(title, fontsize=7)
            ax_z.imshow(np.ma.masked_where(~valid, z), cmap=cmap, vmin=lo, vmax=hi)
            ax_z.set_title(f"z {lo * 1000:.0f}-{hi * 1000:.0f} mm", fontsize=7)
            gt = read_gt(gt_p) if gt_p is not None else np.zeros(rgb.shape[:2], np.uint8)
            ax_gt.imshow(gt, cmap="gray", vmin=0, vmax=255)
            vals = sorted(int(v) for v in np.unique(gt) if v)
            ax_gt.set_title(f"gt {vals}" if vals else "gt: normal", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_axis_off()
    fig.tight_layout()
    out_png = Path(out_png)
    write_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out_png
