"""What the generator can make: the part families (materials, image size, height field),
the defect kinds and their gt values (class_ids.json)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cmad.errors import ConfigError
from cmad.synth.parts import shape_bagel, shape_cookie, shape_gland, shape_rope, shape_tire

# Defect folders and their gt values (class_ids.json); `combined` holds several of them.
DEFECT_TYPES: list[str] = ["contamination", "cut", "dent", "hole", "stain"]
CLASS_IDS: dict[str, int] = {"good": 0, **{d: 255 - i for i, d in enumerate(DEFECT_TYPES)}}
COMBINED = "combined"


@dataclass(frozen=True)
class Material:
    """A surface material: albedo, photographic texture and specular response."""

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
class CategorySpec:
    """One synthetic part family: image size, materials, table and height-field function."""

    name: str
    size: tuple[int, int]                 # (W, H) at scale 1
    radius: float                         # bound of the part's footprint in mm
    materials: tuple[Material, ...]
    table: Material
    cut_color: tuple[float, float, float]
    shape: Callable[..., tuple[np.ndarray, np.ndarray]]
    rotation: str = "free"                # "free" or "small" (long parts in wide images)
    desc: str = ""


_TABLE_GREY = Material("table", (0.50, 0.50, 0.52), "gravel", 0.25, 0.035, 0.02, 8.0)
_TABLE_DARK = Material("table", (0.16, 0.16, 0.17), "gravel", 0.25, 0.05, 0.03, 8.0)

CATEGORIES: dict[str, CategorySpec] = {c.name: c for c in [
    CategorySpec(
        "gland", (320, 240), 28.5,
        (Material("steel", (0.46, 0.47, 0.49), "brushed", 0.08, 0.10, 0.35, 30.0, 1.0),
         Material("rim", (0.25, 0.25, 0.27), "brushed", 0.08, 0.10, 0.25, 20.0, 1.0),
         Material("brass", (0.70, 0.54, 0.26), "moon", 0.12, 0.06, 0.45, 40.0, 1.0),
         Material("thread", (0.86, 0.74, 0.46), "brushed", 0.05, 0.06, 0.5, 40.0, 1.0),
         Material("cap", (0.13, 0.13, 0.14), "gravel", 0.06, 0.10, 0.15, 25.0),
         Material("seal", (0.06, 0.06, 0.06), "gravel", 0.06, 0.15, 0.05, 10.0)),
        _TABLE_GREY, (0.85, 0.85, 0.86), shape_gland,
        desc="cable gland: flange with bolt holes, brass hex, threaded collar, black dome nut"),
    CategorySpec(
        "rope", (400, 160), 53.0,
        (Material("fibre", (0.62, 0.50, 0.33), "fibre", 0.10, 0.22, 0.03, 8.0),
         Material("tape", (0.62, 0.10, 0.08), "moon", 0.3, 0.05, 0.30, 35.0),
         Material("frayed", (0.82, 0.74, 0.58), "fibre", 0.10, 0.30, 0.02, 6.0)),
        _TABLE_DARK, (0.88, 0.82, 0.66), shape_rope, rotation="small",
        desc="three-strand rope with red tape whippings and frayed ends, in a wide image"),
    CategorySpec(
        "tire", (256, 320), 31.5,
        (Material("rubber", (0.09, 0.09, 0.095), "gravel", 0.08, 0.10, 0.10, 14.0),
         Material("tread", (0.12, 0.115, 0.11), "gravel", 0.06, 0.15, 0.05, 8.0),
         Material("rim", (0.72, 0.73, 0.76), "brushed", 0.06, 0.06, 0.45, 35.0, 1.0),
         Material("hub", (0.72, 0.14, 0.10), "moon", 0.3, 0.05, 0.35, 40.0)),
        _TABLE_GREY, (0.35, 0.34, 0.33), shape_tire,
        desc="toy tyre lying flat: rubber sidewall, treaded shoulder, silver rim, red hub, in a "
             "tall image"),
    CategorySpec(
        "bagel", (288, 240), 38.5,
        (Material("glaze", (0.60, 0.38, 0.15), "gravel", 0.15, 0.12, 0.25, 22.0, 0.3),
         Material("flank", (0.84, 0.70, 0.48), "gravel", 0.10, 0.18, 0.03, 6.0),
         Material("seed", (0.93, 0.88, 0.72), "moon", 0.2, 0.05, 0.15, 20.0)),
        _TABLE_DARK, (0.93, 0.86, 0.68), shape_bagel,
        desc="bagel: lumpy torus, glossy brown glaze on top, pale flank, sesame seeds"),
    CategorySpec(
        "cookie", (272, 256), 28.5,
        (Material("dough", (0.83, 0.64, 0.38), "gravel", 0.09, 0.22, 0.03, 6.0),
         Material("baked", (0.55, 0.32, 0.14), "gravel", 0.09, 0.22, 0.04, 6.0),
         Material("chip", (0.27, 0.15, 0.08), "moon", 0.2, 0.10, 0.45, 30.0)),
        _TABLE_GREY, (0.93, 0.80, 0.58), shape_cookie,
        desc="cookie: rough irregular disc, darker baked rim, raised glossy chocolate chips"),
]}

CATEGORY_NAMES: list[str] = list(CATEGORIES)


def get_category(name: str) -> CategorySpec:
    """The part family called `name`; ConfigError for an unknown name."""
    if name not in CATEGORIES:
        raise ConfigError(f"unknown synthetic category {name!r}; expected one of "
                          f"{CATEGORY_NAMES}")
    return CATEGORIES[name]
