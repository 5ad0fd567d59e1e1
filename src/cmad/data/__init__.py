"""Reading, indexing and preprocessing MVTec 3D-AD style data."""
from __future__ import annotations

from cmad.data.info import dataset_info, format_info
from cmad.data.io import read_gt, read_rgb, read_xyz, write_png_atomic, write_tiff_atomic
from cmad.data.mvtec3d import SPLITS, Category, Dataset, SampleRef
from cmad.data.preprocess import (
    PreprocessConfig,
    Preprocessor,
    fit_background_plane,
    to_original,
    to_working,
)

__all__ = [
    "SPLITS",
    "Category",
    "Dataset",
    "PreprocessConfig",
    "Preprocessor",
    "SampleRef",
    "dataset_info",
    "fit_background_plane",
    "format_info",
    "read_gt",
    "read_rgb",
    "read_xyz",
    "to_original",
    "to_working",
    "write_png_atomic",
    "write_tiff_atomic",
]
