"""Reference FPFH through open3d (the optional `[open3d]` extra), on the same points and normals.

open3d's radius search is global (KD-tree) where the numba kernel searches a grid window:
the two agree when the window covers `feature_radius`.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from cmad.errors import ConfigError

if TYPE_CHECKING:
    from cmad.features.xyz import FPFHConfig


def require_open3d() -> ModuleType:
    """The open3d module, or a ConfigError saying how to install it."""
    try:
        import open3d as o3d
    except ImportError as exc:
        raise ConfigError(
            "the open3d FPFH backend needs the [open3d] extra: pip install 'cmad[open3d]'"
        ) from exc
    return o3d


def fpfh_open3d_points(points: np.ndarray, normals: np.ndarray, radius: float) -> np.ndarray:
    """(N, 33) FPFH of an (N, 3) cloud with (N, 3) normals by open3d's radius search."""
    o3d = require_open3d()
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64))
    pcd.normals = o3d.utility.Vector3dVector(np.asarray(normals, dtype=np.float64))
    feat = o3d.pipelines.registration.compute_fpfh_feature(
        pcd, o3d.geometry.KDTreeSearchParamRadius(float(radius))
    )
    return np.asarray(feat.data).T


def fpfh_open3d_grid(
    pts: np.ndarray, ok: np.ndarray, normals: np.ndarray, radius: float
) -> np.ndarray:
    """(S', S', 33) float32 FPFH of the valid grid points, zero elsewhere."""
    out = np.zeros(ok.shape + (33,), np.float32)
    if ok.any():
        out[ok] = fpfh_open3d_points(pts[ok], normals[ok], radius)
    return out


def fpfh_open3d(
    xyz: np.ndarray, mask: np.ndarray, normals: np.ndarray, cfg: FPFHConfig
) -> np.ndarray:
    """open3d's FPFH (S', S', 33) on the points `cmad.features.xyz` samples, same normals.

    `xyz`, `mask` at working resolution; `normals` on the sampled grid (from
    `compute_normals`).
    """
    from cmad.features.xyz import sample_grid

    pts, ok = sample_grid(xyz, mask, cfg.step)
    if normals.shape != pts.shape:
        raise ValueError(f"normals shape {normals.shape} must be the sampled grid {pts.shape}")
    return fpfh_open3d_grid(pts, ok, normals, cfg.feature_radius)
