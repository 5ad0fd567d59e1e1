"""One sample's scene: camera, tilted table, the part's pose, height field, materials and
light, all drawn from the scene's random generator."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmad.synth.catalog import CategorySpec
from cmad.synth.textures import TexSampler

_F0 = 1300.0          # focal length in pixels at scale 1 (about 0.31 mm per pixel at 0.4 m)
_Z0 = 400.0           # working distance in mm
BASELINE = 100.0     # projector offset from the camera in mm (structured-light occlusion)
_OVERSAMPLE = 1.0     # height-field samples per pixel footprint


@dataclass
class Scene:
    """Everything fixed for one sample before defects: camera, table, part and light."""

    cat: CategorySpec
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
    tex: TexSampler


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB values in [0, 1] to linear light (gamma 2.2)."""
    return np.power(np.clip(c, 0.0, 1.0), 2.2)


def _image_size(cat: CategorySpec, scale: float) -> tuple[int, int]:
    """(W, H) of a category's images at `scale`."""
    return max(16, round(cat.size[0] * scale)), max(16, round(cat.size[1] * scale))


def camera(cat: CategorySpec, scale: float) -> dict[str, float]:
    """Pinhole intrinsics and image size of a category at `scale`."""
    w, h = _image_size(cat, scale)
    f = _F0 * w / cat.size[0]
    return {"fx": f, "fy": f, "cx": (w - 1) / 2.0 + 0.013 * w, "cy": (h - 1) / 2.0 - 0.011 * h,
            "width": w, "height": h}


def _rot(axis: np.ndarray, ang: float) -> np.ndarray:
    """Rotation matrix about `axis` by `ang` radians (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


def build_scene(cat: CategorySpec, scale: float, rng: np.random.Generator) -> Scene:
    """Draw one scene of `cat` at image `scale` from `rng`."""
    cam = camera(cat, scale)
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
    hw, ww = cat.shape(a, b, rng, TexSampler(ds / scale_part))
    hgrid = hw * scale_part
    weights = ndimage.gaussian_filter(ww, (0, 0.6, 0.6))
    mats = list(cat.materials) + [cat.table]
    jitter = rng.normal(1.0, 0.02, (len(mats), 3)) * rng.normal(1.0, 0.04, (len(mats), 1))
    jitter[-1] = 1.0 + 0.3 * (jitter[-1] - 1.0)
    colors = srgb_to_linear(np.array([m.color for m in mats]) * jitter)
    el = np.deg2rad(rng.uniform(45, 72))
    az = rng.uniform(0, 2 * np.pi)
    light_t = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return Scene(cat=cat, width=w, height=h, f=f, cx=cx, cy=cy, e1=e1, e2=e2, nrm=nrm, c0=c0,
                 u0=u0, v0=v0, ds=ds, hgrid=hgrid, weights=weights, center=center,
                 theta=theta, scale=scale_part, colors=colors,
                 tex_offsets=rng.uniform(0, 400, (len(mats), 2)), light_t=light_t,
                 light_i=rng.uniform(0.85, 1.15), ambient=rng.uniform(0.22, 0.34),
                 exposure=rng.uniform(0.92, 1.08), tex=TexSampler(ds))
