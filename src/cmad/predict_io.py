"""Inputs and outputs of `cmad predict`: user files in, maps, overlays and scores out."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmad.data.io import atomic_folder, write_bytes_atomic, write_png_atomic, write_tiff_atomic
from cmad.errors import DataError
from cmad.types import Prediction, Sample, SamplePaths


def read_sample(rgb: Path | None, xyz: Path | None, stem: str, rgb_data: bytes | None = None,
                xyz_data: bytes | None = None) -> Sample:
    """One unlabelled sample from its files, or from their bytes (`rgb_data`, `xyz_data`: an
    upload; the paths then only name the files in errors). Raises `DataError`."""
    from cmad.data.io import read_rgb, read_xyz

    img = read_rgb(rgb, rgb_data) if rgb is not None else None
    cloud, valid = read_xyz(xyz, xyz_data) if xyz is not None else (None, None)
    if img is not None and cloud is not None and img.shape[:2] != cloud.shape[:2]:
        raise DataError(xyz, f"point cloud is {cloud.shape[1]}x{cloud.shape[0]} (WxH) but the "
                             f"RGB image {rgb} is {img.shape[1]}x{img.shape[0]}")
    shape = (img if img is not None else cloud).shape[:2]
    if valid is None:
        valid = np.ones(shape, dtype=bool)
    return Sample(rgb=img, xyz=cloud, valid=valid, gt=np.zeros(shape, dtype=bool), label=0,
                  defect_type="unknown", stem=stem, category="input", split="predict",
                  paths=SamplePaths(rgb, xyz, None))


def input_files(rgb: Path | None, xyz: Path | None, input_dir: Path | None,
                modalities: Sequence[str]) -> list[tuple[Path | None, Path | None, str]]:
    """(rgb path, xyz path, stem) of the one sample given by --rgb/--xyz, or of every stem of
    an input folder with rgb/ and xyz/, sorted; nothing is read yet."""
    need_rgb, need_xyz = "rgb" in modalities, "xyz" in modalities
    if input_dir is None:
        if (need_rgb and rgb is None) or (need_xyz and xyz is None):
            raise DataError(None, f"the model needs {' and '.join(modalities)}: pass "
                                  + " and ".join(f"--{m}" for m in modalities))
        stem = Path(rgb or xyz).stem  # type: ignore[arg-type]
        return [(rgb if need_rgb else None, xyz if need_xyz else None, stem)]
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
    return [(rgb_files.get(s), xyz_files.get(s), s) for s in stems]


def collect_inputs(rgb: Path | None, xyz: Path | None, input_dir: Path | None,
                   modalities: Sequence[str]) -> list[Sample]:
    """One sample from --rgb/--xyz, or every stem of an input folder with rgb/ and xyz/."""
    return [read_sample(*f) for f in input_files(rgb, xyz, input_dir, modalities)]


def _load_for_worker(model_dir: str, threads: int | None):
    """A Ray worker's state: the model, loaded once (see `predict_distributed`)."""
    from cmad.pipeline import Detector
    from cmad.runtime import set_threads

    set_threads(threads)
    return Detector.load(model_dir)


def _predict_chunk(det, files: list[tuple[Path | None, Path | None, str]]
                   ) -> tuple[list[Sample], list[Prediction]]:
    samples = [read_sample(*f) for f in files]
    return samples, det.predict(samples, branch_maps=False)


def predict_distributed(model_dir: Path, files: Sequence[tuple[Path | None, Path | None, str]],
                        batch_size: int, threads: int | None = None, address: str | None = None,
                        workers: int | None = None, batches_per_chunk: int = 2
                        ) -> tuple[list[Sample], list[Prediction]]:
    """Read and score `files` on a Ray cluster: chunks of whole batches (so each batch holds
    the samples it holds in a local run, and the scores are the local run's bit for bit) on
    a pool of actors that each load the model once; samples and predictions in file order."""
    from cmad.executor import map_with_state, ray_session

    chunk = max(1, int(batch_size)) * max(1, int(batches_per_chunk))
    chunks = [list(files[i : i + chunk]) for i in range(0, len(files), chunk)]
    with ray_session(address) as ray:
        parts = map_with_state(ray, _load_for_worker, (str(model_dir), threads), _predict_chunk,
                               chunks, workers=workers, cpus_per_worker=threads or 1)
    samples = [s for ss, _ in parts for s in ss]
    preds = [p for _, pp in parts for p in pp]
    return samples, preds


@dataclass(frozen=True)
class Decision:
    """The verdict on one prediction: what `cmad predict` (scores.json and its printed lines)
    and `cmad serve` (the /predict answer) both report, from `decide` alone.

    `mask`: a predicted defect mask (bool, original size) where the decision rule makes one;
    None today. serve returns it when present (PNG, on request), predict can write it.
    """

    score: float
    anomalous: bool
    threshold: float
    mask: np.ndarray | None = None

    def row(self) -> dict:
        """The JSON fields of this decision (scores.json rows, the /predict answer)."""
        return {"score": self.score, "anomalous": self.anomalous}


def decide(pred: Prediction, threshold: float) -> Decision:
    """The decision for one prediction against the model's threshold; the one place both
    `cmad predict` and `cmad serve` get it from (change the rule here, both follow)."""
    return Decision(score=float(pred.score), anomalous=bool(pred.score > threshold),
                    threshold=float(threshold))


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
            rows.append({"stem": s.stem, **decide(p, threshold).row(),
                         "rgb": str(s.paths.rgb) if s.paths.rgb else None,
                         "xyz": str(s.paths.xyz) if s.paths.xyz else None})
        write_bytes_atomic(tmp / "scores.json", json.dumps(
            {"threshold": threshold, "samples": rows}, indent=2).encode())
    return out
