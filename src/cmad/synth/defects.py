"""Defects placed on a scene's part: each a change of height and/or albedo over the
height-field grid, with its support as the ground-truth region."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmad.errors import ConfigError
from cmad.synth.fields import fourier_ring, smoothstep
from cmad.synth.scene import Scene, srgb_to_linear

_RADIUS_MM: dict[str, tuple[float, float]] = {
    "dent": (2.6, 8.5), "stain": (2.2, 9.5), "hole": (1.6, 3.8),
    "contamination": (1.6, 6.0), "cut": (8.0, 22.0),   # cut: length
}


_FOREIGN_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.16, 0.36, 0.70), (0.22, 0.55, 0.28), (0.92, 0.92, 0.90), (0.05, 0.05, 0.06),
    (0.70, 0.22, 0.62), (0.85, 0.78, 0.12))


@dataclass
class Defect:
    """One placed defect over the height-field grid of its scene."""

    kind: str
    support: np.ndarray           # bool over the grid: the gt region
    dh: np.ndarray                # height change (mm) over the grid
    alpha: np.ndarray             # colour blend weight over the grid
    color: tuple[float, float, float] | None = None


def _blob(a: np.ndarray, b: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Normalised depth inside an irregular blob: 1 at the centre, 0 at its edge, < 0 out."""
    ell = rng.uniform(0.6, 1.0)
    o = rng.uniform(0, np.pi)
    da = a * np.cos(o) + b * np.sin(o)
    db = (-a * np.sin(o) + b * np.cos(o)) / ell
    ang = np.arctan2(db, da)
    rr = radius * (1 + fourier_ring(ang, rng, range(2, 6), 0.18))
    return 1.0 - np.hypot(da, db) / rr


def _placeable(scene: Scene) -> np.ndarray:
    """Where a defect centre may go: on the part, on surfaces that face the camera."""
    hw = scene.hgrid
    gy, gx = np.gradient(ndimage.gaussian_filter(hw, 0.8 / scene.ds), scene.ds)
    return (hw > 0.8) & (np.hypot(gx, gy) < 0.9)


def _make_defect(kind: str, scene: Scene, rng: np.random.Generator,
                 dist: np.ndarray, taken: np.ndarray) -> Defect | None:
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
        return Defect(kind, support, dh, alpha, scene.cat.cut_color)
    m = _blob(a, b, size, rng)
    support = (m > 0) & on
    mc = np.clip(m, 0.0, 1.0)
    if kind == "dent":
        # a gentle bowl: the slope stays small, so it shows only through shading
        depth = min(rng.uniform(0.5, 1.5), max(0.5, 0.2 * size))
        dh = -depth * smoothstep(0.0, 1.0, mc) * support
        return Defect(kind, support, dh, zero)
    if kind == "stain":
        local = scene.weights[:, ci, cj]
        here = int(np.argmax(local))
        lin = scene.colors[:-1]
        others = [k for k in range(len(lin)) if k != here]
        dist_c = [float(np.abs(lin[k] - lin[here]).sum()) for k in others]
        k = others[int(rng.choice(len(others), p=np.array(dist_c) / sum(dist_c)))]
        color = tuple(float(x) for x in np.power(lin[k], 1 / 2.2))
        alpha = (rng.uniform(0.7, 0.95) * smoothstep(0.0, 0.25, mc)) * support
        alpha = np.where(support, np.maximum(alpha, 0.25), 0.0)
        return Defect(kind, support, zero, alpha, color)
    if kind == "hole":
        depth = rng.uniform(4.0, 9.0)
        dh = -np.minimum(hw, depth * smoothstep(0.0, 0.2, mc)) * support
        alpha = smoothstep(0.0, 0.35, mc) * support
        return Defect(kind, support, dh, alpha, (0.03, 0.025, 0.02))
    if kind == "contamination":
        local = scene.colors[:-1].mean(axis=0)
        ranked = sorted(_FOREIGN_COLORS, key=lambda c: -float(
            np.abs(srgb_to_linear(np.array(c)) - local).sum()))
        color = ranked[int(rng.integers(0, 3))]
        height = rng.uniform(0.5, 1.8)
        rough = scene.tex("gravel", a, b, 0.07, tuple(rng.uniform(0, 300, 2)))
        dh = (height * np.sqrt(mc) * (1 + 0.1 * rough)) * support
        alpha = np.where(support, np.maximum(smoothstep(0.0, 0.1, mc), 0.3), 0.0)
        return Defect(kind, support, dh, alpha, color)
    raise ConfigError(f"unknown defect type {kind!r}")


def place_defects(scene: Scene, kinds: list[str], rng: np.random.Generator
                  ) -> list[Defect]:
    """One defect of each of `kinds` on the part, apart from each other; kinds that do not
    fit are left out."""
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
