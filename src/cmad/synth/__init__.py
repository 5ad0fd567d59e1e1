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

Modules: `catalog` (part families, defect kinds, class ids), `parts` (their height fields),
`textures`, `fields` (shared 2-D helpers), `scene` (camera, table, pose, light), `defects`,
`raycast` (numba kernels), `render` (shading and the scanner's point cloud), `sample` (the
seeded generators of one sample), `presets` (sizes and split counts), `writer` (`generate`).
"""
from __future__ import annotations

from cmad.synth.catalog import CATEGORY_NAMES, CLASS_IDS, DEFECT_TYPES
from cmad.synth.presets import SIZES, get_preset
from cmad.synth.render import Rendered
from cmad.synth.sample import render_sample
from cmad.synth.writer import generate

__all__ = [
    "CATEGORY_NAMES",
    "CLASS_IDS",
    "DEFECT_TYPES",
    "SIZES",
    "Rendered",
    "generate",
    "get_preset",
    "render_sample",
]
