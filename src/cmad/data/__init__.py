"""Reading, indexing and preprocessing MVTec 3D-AD style and Eyecandies data."""
from __future__ import annotations

from cmad.data.eyecandies import EyecandiesCategory, EyecandiesDataset, EyecandiesOptions
from cmad.data.info import dataset_info, format_info
from cmad.data.io import read_gt, read_rgb, read_xyz, write_png_atomic, write_tiff_atomic
from cmad.data.layout import detect_layout, open_dataset
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
    "EyecandiesCategory",
    "EyecandiesDataset",
    "EyecandiesOptions",
    "PreprocessConfig",
    "Preprocessor",
    "SampleRef",
    "dataset_info",
    "detect_layout",
    "fit_background_plane",
    "format_info",
    "open_dataset",
    "read_gt",
    "read_rgb",
    "read_xyz",
    "to_original",
    "to_working",
    "write_png_atomic",
    "write_tiff_atomic",
]
