"""Inputs and outputs of `cmad predict`: user files in, maps, overlays and scores out."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from cmad.model.decision import Decision
from cmad.runtime import pause_point
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
class Verdict:
    """The verdict on one prediction: what `cmad predict` (scores.json, its printed lines,
    masks) and `cmad serve` (the /predict answer) both report, from `decide` alone.

    `mask`: the predicted defect mask (bool, original size) from the model's pixel threshold.
    """

    score: float
    anomalous: bool
    threshold: float
    pixel_threshold: float
    mask: np.ndarray

    def row(self) -> dict:
        """The JSON fields of this verdict (scores.json rows, the /predict answer)."""
        return {"score": self.score, "verdict": "anomalous" if self.anomalous else "normal",
                "anomalous": self.anomalous, "threshold": self.threshold,
                "pixel_threshold": self.pixel_threshold, "defect_area_px": int(self.mask.sum())}


def decide(pred: Prediction, decision: Decision) -> Verdict:
    """The verdict on one prediction under the model's decision rule (image threshold, pixel
    threshold); the one place `cmad predict` and `cmad serve` get it from."""
    return Verdict(score=float(pred.score), anomalous=bool(decision.anomalous(pred.score)),
                   threshold=float(decision.threshold),
                   pixel_threshold=float(decision.pixel_threshold),
                   mask=decision.mask(pred.anomaly_map, pred.score))


OUTLINE = (0, 230, 255)   # predicted defect mask outline: cyan, apart from the heat colours
OVERLAY_CMAP = "inferno"
MIN_WIDTH = 480            # overlays narrower than this are enlarged (whole pixels) for the text


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a boolean mask, `width` pixels thick, inside the mask."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    inner = binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def overlay_scale(width: int) -> int:
    """The whole-pixel enlargement factor of an overlay of an image `width` pixels wide."""
    return max(1, -(-MIN_WIDTH // max(int(width), 1)))


def overlay(rgb: np.ndarray | None, amap: np.ndarray, decision: Decision, score: float
            ) -> np.ndarray:
    """The image with the map in a perceptual colour scale relative to the threshold (no
    colour below half of it), the predicted defect mask outlined, and a legend strip under it:
    verdict, score, threshold and a colour bar in score units. Images narrower than
    MIN_WIDTH are enlarged by whole pixels first."""
    from matplotlib import colormaps

    from cmad.model.decision import heat

    k = overlay_scale(amap.shape[1])
    up = (lambda a: np.repeat(np.repeat(a, k, axis=0), k, axis=1)) if k > 1 else (lambda a: a)
    base = rgb.astype(np.float32) if rgb is not None else np.full(amap.shape + (3,), 128.0)
    c, alpha = heat(amap, decision.threshold)
    # the colour map's own 256-entry table indexed as matplotlib indexes it (the same
    # colours as calling it on the array, several times faster at 800 x 800)
    cmap = colormaps[OVERLAY_CMAP]
    lut = cmap(np.arange(cmap.N))[:, :3].astype(np.float32) * 255.0
    col = lut[np.minimum((c * cmap.N).astype(np.intp), cmap.N - 1)]
    img = base * (1.0 - alpha[..., None]) + col * alpha[..., None]
    img = up(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    edge = outline(up(decision.mask(amap, score)), width=max(1, k // 2 + 1))
    img[edge] = OUTLINE
    return np.concatenate([img, legend_strip(img.shape[1], decision, score)], axis=0)


LEGEND_HEIGHT = 96
# drawn legend strips without their two per-sample text lines, by (width, decision): a
# matplotlib figure per sample cost about 140 ms, a strip from the template about 18 ms
_LEGENDS: dict[tuple, tuple] = {}
_LEGENDS_LOCK = threading.Lock()


def _legend_template(width: int, decision: Decision) -> tuple:
    """(canvas, background, verdict text, score text) of one legend strip layout."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colorbar import Colorbar
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from cmad.model.decision import colour_range

    key = (int(width), float(decision.threshold), decision.target_fpr, decision.rule)
    if key in _LEGENDS:
        return _LEGENDS[key]
    dpi, height = 100, LEGEND_HEIGHT
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    t = decision.threshold
    fs = 10 if width >= 560 else 8.5
    # the per-sample lines: animated, so not in the background; drawn over it per sample
    verdict = fig.text(6 / width, 1 - 6 / height, "", fontsize=fs + 2, fontweight="bold",
                       ha="left", va="top", animated=True)
    line = fig.text(6 / width, 1 - 26 / height, "", fontsize=fs, color="#222222",
                    ha="left", va="top", animated=True)
    lo, hi = colour_range(t)
    cax = fig.add_axes((18 / width, 1 - 60 / height, 0.6, 14 / height))
    cb = Colorbar(cax, cmap=colormaps[OVERLAY_CMAP], norm=Normalize(lo, hi),
                  orientation="horizontal")
    ticks = [lo, t, hi] if lo < t < hi else [lo, hi]
    cb.set_ticks(ticks, labels=[f"{v:.2f}" + (" = thr" if v == t else "") for v in ticks])
    cb.ax.tick_params(labelsize=fs - 1.5, length=2, pad=1)
    if lo < t < hi:
        cb.ax.axvline(t, color="white", linewidth=1.5)
    fig.text(6 / width, 2 / height, "anomaly score (no colour below the left end)",
             fontsize=fs - 2, color="#555555", ha="left", va="bottom")
    x0 = 0.66 + 6 / width
    fig.patches.append(Rectangle((x0, 1 - 60 / height), 14 / width, 12 / height,
                                 transform=fig.transFigure, fill=False,
                                 edgecolor=np.array(OUTLINE) / 255.0, linewidth=2))
    fig.text(x0 + 20 / width, 1 - 54 / height, "predicted defect", fontsize=fs - 1.5,
             color="#222222", ha="left", va="center")
    canvas.draw()
    entry = (canvas, canvas.copy_from_bbox(fig.bbox), verdict, line)
    if len(_LEGENDS) >= 8:
        _LEGENDS.pop(next(iter(_LEGENDS)))
    _LEGENDS[key] = entry
    return entry


def legend_strip(width: int, decision: Decision, score: float) -> np.ndarray:
    """(h, width, 3) uint8: the verdict, score and threshold, and the colour bar."""
    height = LEGEND_HEIGHT
    bad = decision.anomalous(score)
    rate = (f" ({100 * decision.target_fpr:.3g}% of normal parts above it)"
            if decision.target_fpr is not None else f" ({decision.rule})")
    with _LEGENDS_LOCK:  # one figure per layout, shared by `cmad serve`'s threads
        canvas, background, verdict, line = _legend_template(width, decision)
        canvas.restore_region(background)
        verdict.set_text("ANOMALOUS" if bad else "normal")
        verdict.set_color("#c62828" if bad else "#2e7d32")
        line.set_text(f"score {score:.3f}   threshold {decision.threshold:.3f}{rate}")
        canvas.figure.draw_artist(verdict)
        canvas.figure.draw_artist(line)
        strip = np.asarray(canvas.buffer_rgba())[:height, :width, :3].copy()
    out = np.full((height, width, 3), 255, dtype=np.uint8)  # in case Agg rounds a pixel off
    out[: strip.shape[0], : strip.shape[1]] = strip
    return out


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


# samples handed to the writer thread and not yet written, at most
WRITE_AHEAD = 16
# zlib level of the mask and overlay PNGs (`cmad predict` and `cmad serve`): level 1 is
# about 3x faster to write than PIL's default 6 (RESULTS.md, round 5)
PNG_LEVEL = 1


def _write_sample(tmp: Path, s: Sample, p: Prediction, decision: Decision) -> dict:
    """One sample's map, mask and overlay under `tmp`; its scores.json row."""
    v = decide(p, decision)
    write_tiff_atomic(tmp / "maps" / f"{s.stem}.tiff", p.anomaly_map.astype(np.float32))
    write_png_atomic(tmp / "masks" / f"{s.stem}.png", v.mask.astype(np.uint8) * 255,
                     compress_level=PNG_LEVEL)
    write_png_atomic(tmp / "overlays" / f"{s.stem}.png",
                     overlay(s.rgb, p.anomaly_map, decision, p.score), compress_level=PNG_LEVEL)
    pause_point("predict:sample-written")
    return {"stem": s.stem, **v.row(),
            "map": f"maps/{s.stem}.tiff", "mask": f"masks/{s.stem}.png",
            "overlay": f"overlays/{s.stem}.png",
            "rgb": str(s.paths.rgb) if s.paths.rgb else None,
            "xyz": str(s.paths.xyz) if s.paths.xyz else None}




def write_outputs(out: Path, pairs: Iterable[tuple[Sample, Prediction]],
                  decision: Decision) -> tuple[Path, list[dict]]:
    """maps/<stem>.tiff (float32, original size), masks/<stem>.png (the predicted defect,
    original size, 255 = defect), overlays/<stem>.png and scores.json, for each (sample,
    prediction) pair as it comes (a stream: `Detector.iter_predict`). The files are
    written by one worker thread while the next predictions are computed. The folder is
    built whole, then put in place (an earlier output there is replaced; nothing is put in
    place if the stream or a write raises). Returns the folder and the scores.json rows."""
    out = Path(out)
    with atomic_folder(out, is_predict_output) as tmp:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmad-write") as pool:
            jobs = []
            for s, p in pairs:
                jobs.append(pool.submit(_write_sample, tmp, s, p, decision))
                if len(jobs) > WRITE_AHEAD:
                    jobs[-WRITE_AHEAD - 1].result()  # bounded memory; a write error now
            rows = [j.result() for j in jobs]
        write_bytes_atomic(tmp / "scores.json", json.dumps(
            {"threshold": decision.threshold, "pixel_threshold": decision.pixel_threshold,
             "decision": {k: v for k, v in decision.to_dict().items() if k != "pixel_table"},
             "samples": rows}, indent=2).encode())
    return out, rows
