"""Inputs and outputs of `cmad predict`: user files in, maps, overlays and scores out."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmad.data.io import (
    atomic_folder,
    recover_folder,
    write_bytes_atomic,
    write_png_atomic,
    write_tiff_atomic,
)
from cmad.errors import DataError, OutputError
from cmad.runtime import pause_point
from cmad.types import Prediction, Sample, SamplePaths


def _sample(rgb: Path | None, xyz: Path | None, stem: str) -> Sample:
    from cmad.data.io import read_rgb, read_xyz

    img = read_rgb(rgb) if rgb is not None else None
    cloud, valid = read_xyz(xyz) if xyz is not None else (None, None)
    if img is not None and cloud is not None and img.shape[:2] != cloud.shape[:2]:
        raise DataError(xyz, f"point cloud is {cloud.shape[1]}x{cloud.shape[0]} (WxH) but the "
                             f"RGB image {rgb} is {img.shape[1]}x{img.shape[0]}")
    shape = (img if img is not None else cloud).shape[:2]
    if valid is None:
        valid = np.ones(shape, dtype=bool)
    return Sample(rgb=img, xyz=cloud, valid=valid, gt=np.zeros(shape, dtype=bool), label=0,
                  defect_type="unknown", stem=stem, category="input", split="predict",
                  paths=SamplePaths(rgb, xyz, None))


def collect_inputs(rgb: Path | None, xyz: Path | None, input_dir: Path | None,
                   modalities: Sequence[str]) -> list[Sample]:
    """One sample from --rgb/--xyz, or every stem of an input folder with rgb/ and xyz/."""
    need_rgb, need_xyz = "rgb" in modalities, "xyz" in modalities
    if input_dir is None:
        if (need_rgb and rgb is None) or (need_xyz and xyz is None):
            raise DataError(None, f"the model needs {' and '.join(modalities)}: pass "
                                  + " and ".join(f"--{m}" for m in modalities))
        stem = Path(rgb or xyz).stem  # type: ignore[arg-type]
        return [_sample(rgb if need_rgb else None, xyz if need_xyz else None, stem)]
    d = Path(input_dir)
    rgb_files = {p.stem: p for p in sorted((d / "rgb").glob("*.png"))} if need_rgb else {}
    xyz_files = {p.stem: p for p in sorted((d / "xyz").glob("*.tif*"))} if need_xyz else {}
    stems = sorted(set(rgb_files) | set(xyz_files))
    if not stems:
        raise DataError(d, "no input files: expected rgb/*.png and/or xyz/*.tiff inside")
    for s in stems:
        if need_rgb and s not in rgb_files:
            raise DataError(d / "rgb" / f"{s}.png", "missing: the point cloud has no RGB image")
        if need_xyz and s not in xyz_files:
            raise DataError(d / "xyz" / f"{s}.tiff", "missing: the RGB image has no point cloud")
    return [_sample(rgb_files.get(s), xyz_files.get(s), s) for s in stems]


def overlay(rgb: np.ndarray | None, amap: np.ndarray, threshold: float) -> np.ndarray:
    """RGB image with the anomaly map in a heat colour where it exceeds half the threshold."""
    from matplotlib import colormaps

    lo = 0.5 * threshold if np.isfinite(threshold) else float(np.percentile(amap, 50))
    hi = max(2.0 * threshold if np.isfinite(threshold) else float(amap.max()), lo + 1e-6)
    t = np.clip((amap - lo) / (hi - lo), 0.0, 1.0)
    heat = (colormaps["jet"](t)[..., :3] * 255).astype(np.float32)
    base = rgb.astype(np.float32) if rgb is not None else np.full(amap.shape + (3,), 128.0)
    alpha = (0.6 * (t > 0))[..., None]
    return np.clip(base * (1 - alpha) + heat * alpha, 0, 255).astype(np.uint8)


def is_predict_output(folder: Path) -> bool:
    """True for a folder written by `write_outputs` (nothing else in it)."""
    names = {p.name for p in folder.iterdir()}
    return "scores.json" in names and names <= {"scores.json", "maps", "overlays", "masks"}


def check_output_dir(out: Path) -> Path:
    """Refuse an output path that `write_outputs` would refuse, before any work."""
    out = Path(out)
    recover_folder(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_predict_output(out))):
        raise OutputError(out, "exists and is not an earlier output of `cmad predict`; "
                               "choose a new or empty folder")
    return out


def write_outputs(out: Path, samples: Sequence[Sample], preds: Sequence[Prediction],
                  threshold: float) -> Path:
    """maps/<stem>.tiff (float32, original size), overlays/<stem>.png, scores.json; the
    folder is built whole, then put in place (an earlier output there is replaced)."""
    out = Path(out)
    rows = []
    with atomic_folder(out, is_predict_output) as tmp:
        for s, p in zip(samples, preds):
            write_tiff_atomic(tmp / "maps" / f"{s.stem}.tiff", p.anomaly_map.astype(np.float32))
            write_png_atomic(tmp / "overlays" / f"{s.stem}.png", overlay(s.rgb, p.anomaly_map, threshold))
            pause_point("predict:sample-written")
            rows.append({"stem": s.stem, "score": p.score, "anomalous": bool(p.score > threshold),
                         "rgb": str(s.paths.rgb) if s.paths.rgb else None,
                         "xyz": str(s.paths.xyz) if s.paths.xyz else None})
        write_bytes_atomic(tmp / "scores.json", json.dumps(
            {"threshold": threshold, "samples": rows}, indent=2).encode())
    return out
