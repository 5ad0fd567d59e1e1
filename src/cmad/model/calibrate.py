"""Synthetic defects pasted into normal validation samples: to choose fusion weights
(`weights: auto`) and to check each bank's local scale (`bank_density_check`).

No test data is used: the fusion sees only validation normals, some of them altered here
with the kinds of change real defects make:
- "colour": a blob whose albedo takes the colour of another place of the same part
  (a stain is a colour that is wrong for its place), shading kept;
- "bump" / "dent": the surface pushed out or in by 0.5 to 1.5 mm along the viewing ray,
  colour unchanged.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from cmad.types import Prepared

KINDS = ("colour", "bump", "dent")


def _blob(size: int, centre: tuple[int, int], radius: float, rng: np.random.Generator) -> np.ndarray:
    """A soft irregular blob in [0, 1] (an ellipse with a random axis ratio and angle)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.5, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(ang) + dy * np.sin(ang)
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ratio
    r = np.sqrt(u * u + v * v) / radius
    return np.exp(-0.5 * (r * 1.6) ** 4)


def paste_defect(p: Prepared, kind: str, rng: np.random.Generator) -> Prepared | None:
    """A copy of `p` with one synthetic defect of `kind`; None if `p` has too little part."""
    fg = p.foreground & p.valid if p.xyz is not None else p.foreground
    ys, xs = np.nonzero(fg)
    if len(ys) < 50:
        return None
    s = fg.shape[0]
    i = rng.integers(len(ys))
    centre = (int(ys[i]), int(xs[i]))
    radius = float(rng.uniform(0.02, 0.05) * s)
    soft = _blob(s, centre, radius, rng) * fg
    mask = soft > 0.5
    if mask.sum() < 4:
        return None
    rgb, xyz = p.rgb, p.xyz
    if kind == "colour":
        if rgb is None:
            return None
        j = rng.integers(len(ys))
        src = rgb[max(ys[j] - 2, 0) : ys[j] + 3, max(xs[j] - 2, 0) : xs[j] + 3].reshape(-1, 3).mean(0)
        here = rgb[mask].reshape(-1, 3).mean(0)
        if np.abs(src - here).sum() < 40:  # another place of the part has the same colour
            src = rng.uniform(20, 235, size=3)
        gain = (src + 5.0) / (here + 5.0)
        new = rgb.astype(np.float32) * (1.0 + soft[..., None] * (gain[None, None, :] - 1.0))
        rgb = np.clip(new, 0, 255).astype(np.uint8)
    elif kind in ("bump", "dent"):
        if xyz is None:
            return None
        amp = float(rng.uniform(0.0005, 0.0015)) * (-1.0 if kind == "bump" else 1.0)
        z = xyz[..., 2]
        dz = soft * amp
        scale = np.where(z > 0, (z + dz) / np.where(z > 0, z, 1.0), 1.0)
        xyz = (xyz * scale[..., None]).astype(np.float32)
    else:
        raise ValueError(f"unknown pasted defect kind {kind!r}")
    gt = mask & p.foreground
    return replace(p, rgb=rgb, xyz=xyz, gt=gt, label=1, defect_type=f"pasted_{kind}",
                   stem=f"{p.stem}_{kind}")


def calibration_set(
    normals: list[Prepared], seed: int = 0, per_sample: int = 2, has_rgb: bool = True,
    has_xyz: bool = True,
) -> list[Prepared]:
    """Validation normals plus pasted-defect copies, kinds balanced between colour and shape."""
    rng = np.random.default_rng(seed)
    kinds = [k for k in KINDS if (k == "colour" and has_rgb) or (k != "colour" and has_xyz)]
    if kinds == ["colour", "bump", "dent"]:
        kinds = ["colour", "bump", "colour", "dent"]  # as many colour as shape defects
    out = list(normals)
    n = 0
    for p in normals:
        for _ in range(per_sample):
            kind = kinds[n % len(kinds)]
            n += 1
            q = paste_defect(p, kind, rng)
            if q is not None:
                out.append(q)
    return out
