"""`cmad bench`, `cmad features` and `cmad demo`: accuracy, speed and memory in one run.

All methods of a category share one preprocessing and one feature extraction per sample;
each method's own fitting and scoring is timed separately, and its end-to-end inference time
is the shared stages it needs plus its own.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmad.cache import default_cache_dir
from cmad.configs import DEFAULT_SIZE
from cmad.data.io import atomic_folder
from cmad.data.splits import select_shots, split_source
from cmad.errors import ConfigError, OutputError
from cmad.evaluate import TARGET_RATES, target_key
from cmad.features import FEATURE_STAGE, FeatureExtractor, FeatureMaps
from cmad.metrics import METRIC_KEYS as METRICS
from cmad.model.branches import branch_class
from cmad.model.calibrate import calibration_set
from cmad.model.config import DetectorConfig
from cmad.model.core import active_branches, feature_needs
from cmad.model.decision import Decision
from cmad.pipeline import Detector
from cmad.progress import progress as progress_bar
from cmad.runtime import set_threads
from cmad.types import Prepared

log = logging.getLogger(__name__)

# name -> (config overrides, description)
METHODS: dict[str, tuple[dict, str]] = {
    "cmad": ({}, "full method: dense cross-modal mapping (RGB CNN features <-> CNN features of "
                 "the rendered geometry) + light joint RGB+FPFH bank + light RGB bank, equal "
                 "weights, int4 banks scored over their entries' local scale where it does "
                 "better on defects pasted into the validation normals; the RGB bank "
                 "counts toward the score, not the map"),
    "cmad-plain-banks": ({"bank_density": None},
                         "cmad with banks that score the plain nearest distance (PatchCore; "
                         "the default up to round 15)"),
    "cmad-scaled-banks": ({"bank_density_check": False},
                          "cmad with every bank scored over its local scale, unchecked (the "
                          "default of round 16)"),
    "cmad-map-all": ({"map_exclude": ()},
                     "cmad with every branch in the map (as up to round 6)"),
    "cmad-v1": ({"branches": ("align", "joint_bank", "rgb_bank", "xyz_bank"), "weights": "joint",
                 "map_exclude": (), "bank_fraction": 0.015, "joint_fraction": 0.06,
                 "bank_density": None},
                "the default before round 4: latent alignment + joint bank (half) + RGB and FPFH banks"),
    "cmad-mse": ({"mapping": {"loss": "mse"}},
                 "cmad with the mapping trained on plain squared errors, no predicted "
                 "variance (as up to round 8)"),
    "mapping": ({"branches": ("mapping",)},
                "dense cross-modal mapping alone: RGB CNN features <-> CNN features of the "
                "rendered geometry, both directions; scores over the predicted variance, map "
                "of the plain errors"),
    "mapping-mse": ({"branches": ("mapping",), "mapping": {"loss": "mse"}},
                    "the mapping alone as up to round 8 (plain squared errors)"),
    "joint-bank": ({"branches": ("joint_bank",)},
                   "light joint RGB+FPFH bank alone (cross-modal co-occurrence), 3.6% coreset, int4, "
                   "local scale where it localises pasted defects better"),
    "rgb-bank": ({"branches": ("rgb_bank",)}, "light RGB memory bank alone"),
    "geom-bank": ({"branches": ("geom_bank",)},
                  "light bank of the rendered geometry's CNN features alone (3D only)"),
    "xyz-bank": ({"branches": ("xyz_bank",)}, "light FPFH memory bank alone (3D only)"),
    "align": ({"branches": ("align",)},
              "learned cross-modal alignment alone (shared latent, colour vs FPFH+context)"),
    "cmad-no-mapping": ({"branches": ("joint_bank", "rgb_bank")}, "cmad without the mapping"),
    "cmad-no-joint": ({"branches": ("mapping", "rgb_bank")},
                      "cmad without the joint bank (no FPFH at all)"),
    "cmad-no-rgb": ({"branches": ("mapping", "joint_bank")}, "cmad without the RGB bank"),
    "cmad+geom": ({"branches": ("mapping", "joint_bank", "rgb_bank", "geom_bank")},
                  "cmad with the geometry bank as a fourth branch"),
    "cmad+xyz": ({"branches": ("mapping", "joint_bank", "rgb_bank", "xyz_bank")},
                 "cmad with the FPFH bank as a fourth branch"),
    "cmad-auto": ({"weights": "auto"},
                  "cmad with weights chosen on validation normals with pasted defects"),
    "mapping-fpfh": ({"branches": ("mapping",), "mapping_b": ("geom", "xyz")},
                     "the mapping with FPFH beside the geometry features"),
    "align-map": ({"branches": ("align",), "align": {"variant": "mapping", "hidden": 256},
                   "align_app": ("rgb", "colour")},
                  "CFM-style MLP mapping between CNN+colour and FPFH+context features, alone"),
    "btf": ({"branches": ("joint_bank",), "joint_fraction": 0.1, "bank_dtype": "float32",
             "bank_density": None},
            "BTF baseline: RGB+FPFH concatenated, one bank, 10% coreset (as in BTF's code), float32"),
    "full-banks": ({"branches": ("rgb_bank", "xyz_bank"), "bank_fraction": 1.0,
                    "bank_max_entries": None, "bank_min_entries": 0, "bank_dtype": "float32",
                    "bank_density": None},
                   "cmad's two per-modality banks at 100% (no coreset), float32"),
}
# BTF with no coreset (the full bank): slow to search, so only on request (--methods)
METHODS["btf-full"] = ({"branches": ("joint_bank",), "joint_fraction": 1.0, "bank_max_entries": None,
                        "bank_min_entries": 0, "bank_dtype": "float32", "bank_density": None},
                       "BTF with its full bank (no coreset), float32")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "btf-full")
SHOT_METHODS = ("cmad", "btf", "rgb-bank", "xyz-bank")
DEMO_METHODS = ("cmad", "mapping", "joint-bank", "rgb-bank", "btf")


class PeakRSS:
    """Peak resident memory (MB) of this process while the context is open (sampled)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current_mb())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS does not say)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int) -> dict:
    return {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
        "load_average_start": load_average(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
    }


def check_method(name: str) -> None:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}")


def method_config(name: str, seed: int, size: int, base: DetectorConfig | None = None) -> DetectorConfig:
    check_method(name)
    return (base or DetectorConfig()).with_overrides({**METHODS[name][0], "seed": seed, "size": size})


def config_as_run(base: DetectorConfig | None, seed: int, size: int) -> dict:
    """What results.json records: the base configuration with the run's size and seed (each
    method then sets its own fields, named in "descriptions")."""
    return (base or DetectorConfig()).with_overrides({"size": size, "seed": seed}).to_dict()


def _runnable(cfg: DetectorConfig, modalities: Sequence[str]) -> bool:
    """True if at least one of the method's branches can run on these modalities."""
    return bool(active_branches(cfg.branches, modalities, cfg))


def stages_of(needs: set[str]) -> list[str]:
    """The feature stages a model with these feature needs pays for, in order."""
    out = [FEATURE_STAGE[n] for n in sorted(needs)]
    if "geom" in needs:
        out.append("geometry_render")
    return out


@dataclass
class CategoryData:
    """Everything shared by the methods of one category."""

    name: str
    modalities: list[str]
    train: list[Prepared]
    train_fm: FeatureMaps
    calib: list[Prepared]
    calib_fm: FeatureMaps
    test: list[Prepared]
    test_fm: FeatureMaps
    gts: list[np.ndarray]
    shared_ms: dict[str, float]
    shared_fit_s: float
    # the test samples' references in the dataset and how to read one (`time_stream`)
    test_refs: list | None = None
    load: Callable[[Any], Any] | None = None


def timed_features(ext: FeatureExtractor, prepared: Sequence[Prepared], desc: str,
                   progress: bool) -> tuple[FeatureMaps, dict[str, list[float]]]:
    """Features one sample at a time, uncached, with each sample's ms per stage."""
    parts, times = [], {}
    for p in progress_bar(prepared, desc=desc, unit="sample", enabled=progress):
        fm, ms = ext.extract([p], prep_digest=None)
        for k, v in ms.items():
            times.setdefault(k, []).append(v)
        parts.append(fm)
    return FeatureMaps.cat(parts), times


def load_category(data: Path, name: str, size: int, seed: int, cache_dir: Path | None,
                  progress: bool, methods: Sequence[str], base: DetectorConfig | None = None
                  ) -> tuple[CategoryData, FeatureExtractor]:
    """Read, preprocess and extract one category once for all methods (the union of the
    features they need)."""
    from cmad.data import open_dataset

    cat = open_dataset(data).category(name)
    cfg = method_config("cmad", seed, size, base)
    t0 = time.perf_counter()
    train_s, val_s = split_source(cat, seed)
    modalities = [m for m in ("rgb", "xyz") if getattr(train_s[0], m) is not None]
    configs = [method_config(m, seed, size, base) for m in (*methods, *SHOT_METHODS)]
    needs: set[str] = set()
    for c in configs:
        needs |= feature_needs(c, modalities)
    if not needs:
        raise ConfigError(f"{name}: none of the methods can run on modalities {modalities}")
    ext = FeatureExtractor(needs, size=size, rgb=cfg.rgb, xyz=cfg.xyz, geometry=cfg.geometry,
                           cache_dir=cache_dir)
    det = Detector(cfg, cache_dir=cache_dir, extractor=ext)
    train = det.prepare(train_s, progress)
    val = det.prepare(val_s, progress)
    train_fm, _ = det.features(train, progress, desc=f"{name} train features")
    per = max((c.calib_per_sample for c in configs if c.pastes_defects), default=0)
    calib = calibration_set(val, seed=seed, per_sample=per,
                            has_rgb="rgb" in modalities, has_xyz="xyz" in modalities)
    calib_fm, _ = det.features(calib, progress, desc=f"{name} validation features", cache=False)
    shared_fit_s = time.perf_counter() - t0
    test_s = cat.samples("test")
    # timed without the cache: a new part is never in it
    fresh = Detector(cfg, cache_dir=None, extractor=ext)
    prep_ms = []
    test = []
    for s in test_s:
        t = time.perf_counter()
        test.extend(fresh.prepare([s]))
        prep_ms.append((time.perf_counter() - t) * 1000.0)
    # warm-up (compilation, allocator), then time each test sample's features
    ext.extract(test[:1], prep_digest=None)
    test_fm, times = timed_features(ext, test, f"{name} test features", progress)
    shared_ms = {"preprocess": float(np.median(prep_ms))}
    shared_ms.update({k: float(np.median(v)) for k, v in times.items()})
    gts = [s.gt for s in test_s]
    return CategoryData(name, modalities, train, train_fm, calib, calib_fm, test, test_fm, gts,
                        shared_ms, shared_fit_s, cat.refs("test"), cat.load), ext


def run_method(name: str, cd: CategoryData, seed: int, size: int, ext: FeatureExtractor,
               shots: int | None = None, base: DetectorConfig | None = None,
               evaluate: bool = True, progress: bool = False) -> tuple[dict, Detector, list]:
    """Fit one method on shared features and evaluate it on the test split (`progress`:
    the fit's own bars, such as training epochs and coreset selection)."""
    from cmad.evaluate import decision_rates, evaluate_predictions, image_labels

    cfg = method_config(name, seed, size, base)
    det = Detector(cfg, extractor=ext)
    train_idx = select_shots(list(range(len(cd.train))), shots, seed)
    train_fm = cd.train_fm if shots is None else cd.train_fm.select(train_idx)
    load_before = load_average()
    with PeakRSS() as mem:
        t = time.perf_counter()
        det.fit_features(train_fm, cd.calib_fm, cd.calib, cd.modalities, category=cd.name,
                         progress=progress)
        fit_s = time.perf_counter() - t
        own_ms: dict[str, list[float]] = {}
        preds = []
        det.predict_features(cd.test_fm.index(0), cd.test[:1], branch_maps=False)  # warm-up
        for i, p in enumerate(cd.test):
            pr, ms = det.predict_features(cd.test_fm.index(i), [p], branch_maps=False)
            preds.extend(pr)
            for k, v in ms.items():
                own_ms.setdefault(k, []).append(v)
    load_after = load_average()
    stages = {"preprocess": cd.shared_ms["preprocess"]}
    for k in stages_of(det.core.needs):
        stages[k] = cd.shared_ms.get(k, 0.0)
    stages.update({k: float(np.median(v)) for k, v in own_ms.items()})
    with tempfile.TemporaryDirectory() as tmp:
        det.save(Path(tmp) / "model")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "model").iterdir())
    ev = evaluate_predictions(cd.name, preds, cd.gts) if evaluate else None
    row = {
        "decision": decision_rates(det.decision, preds, cd.gts),
        "category": cd.name,
        # per test part, in the split's order: the paired comparison of methods
        "test_scores": [float(p.score) for p in preds],
        "test_labels": [int(v) for v in image_labels(preds, cd.gts)],
        "metrics": None if ev is None else ev.metrics,
        "per_defect": None if ev is None else ev.per_defect,
        "fit_s": cd.shared_fit_s + fit_s,
        "method_fit_s": fit_s,
        "infer_ms_per_sample": float(sum(stages.values())),
        "stages_ms": stages,
        "model_bytes": int(disk),
        "tensor_bytes": det.model_bytes,
        "bank_entries": det.bank_entries,
        "bank_bytes": det.bank_bytes,
        "peak_rss_mb": mem.peak,
        "weights": det.weights,
        # bank -> the local scale's check on the pasted defects (`bank_density_check`)
        "bank_scale": dict(det.report.bank_scale),
        # 1-minute load average as this method's timing started and ended: a load above the
        # CPU count means other work shared the CPUs and every time here is inflated
        "load_average": [None if x is None else x[0] for x in (load_before, load_after)],
    }
    return row, det, preds


DECISION_KEYS = ("fpr", "fnr", "pixel_fpr", "pixel_tpr", "tpr_at_fpr10",
                 *(target_key(r, k) for r in TARGET_RATES for k in ("fpr", "tpr")))


def _mean_decision(rows: dict[str, dict]) -> dict:
    """Mean of the decision rates over the categories that have them."""
    out = {}
    for k in DECISION_KEYS:
        vals = [r[k] for r in rows.values() if r and r.get(k) is not None and np.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def time_runtimes(det: Detector, cd: CategoryData, folder: Path) -> dict:
    """Torch against ONNX Runtime on the same prepared test samples, one sample at a time,
    the two runtimes alternating (so that a change in machine load reaches both): median ms
    per sample from the prepared sample to the score and map at working resolution
    (preprocessing and the resize to the original size are the same Python for both and
    left out; FPFH, when the model uses it, is numba in both), after one warm-up each. Also
    the largest score and map differences and the size of the exported file."""
    from cmad.export import OnnxDetector, export_onnx

    path = export_onnx(det, folder / "model.onnx")
    onnx_det = OnnxDetector(path)
    # an extractor of exactly this model's features (the bench's shared one has more)
    ext = Detector(det.config).extractor_for(cd.modalities)
    torch_ms, onnx_ms, d_score, d_map = [], [], [], []
    for i, p in enumerate([cd.test[0], *cd.test]):
        t = time.perf_counter()
        fm, _ = ext.extract([p], prep_digest=None)
        (ref,), _ = det.predict_features(fm, [p], branch_maps=False)
        t_torch = (time.perf_counter() - t) * 1000.0
        t = time.perf_counter()
        scores, maps, _ = onnx_det.run([p])
        t_onnx = (time.perf_counter() - t) * 1000.0
        if i == 0:
            continue  # warm-up
        torch_ms.append(t_torch)
        onnx_ms.append(t_onnx)
        d_score.append(abs(float(scores[0]) - ref.score))
        d_map.append(float(np.abs(maps[0] - ref.anomaly_map_work).max()))
    return {"torch_ms": float(np.median(torch_ms)), "onnx_ms": float(np.median(onnx_ms)),
            "onnx_bytes": int(path.stat().st_size), "n": len(torch_ms),
            "max_score_diff": float(max(d_score)), "max_map_diff": float(max(d_map))}


def time_stream(det: Detector, cd: CategoryData, folder: Path) -> dict:
    """End to end as `cmad predict --input` runs: the method saved and loaded back, then
    every test sample read from its files, preprocessed, featured and scored, its map
    brought to the original size, the batches overlapping on the worker threads
    (`Detector.iter_predict`; nothing written). Samples per second over the test split,
    after one warm-up batch, and the load average before and after."""
    refs = cd.test_refs or []
    if not refs or cd.load is None:
        raise ConfigError(f"{cd.name}: no test files to stream")
    det.save(folder / "model")
    live = Detector.load(folder / "model")
    list(live.iter_predict(refs[: live.config.batch_size], load=cd.load))
    before = load_average()
    t = time.perf_counter()
    n = sum(1 for _ in live.iter_predict(refs, load=cd.load))
    wall = time.perf_counter() - t
    after = load_average()
    return {"samples_per_s": n / wall, "ms_per_sample": 1000.0 * wall / n, "n": n,
            "wall_s": wall, "load_average": [None if x is None else x[0] for x in (before, after)]}


# replicates of the paired bootstraps of `compare_methods`; measured for five categories of
# 100 test parts: 55 ms for I-AUROC and 0.3 s for AUPRO per pair of methods, and 0.64 s to
# summarise one method's 100 maps of 800 x 800 (`_pro_summary`)
BOOTSTRAP_REPLICATES = 2000


def _mean(rows: list[dict]) -> dict:
    """Mean over categories, ignoring categories a method could not run on (NaN)."""
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows if r[m] is not None and np.isfinite(r[m])]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    return out


def _pro_summary(gts: Sequence[np.ndarray], preds: Sequence[Any]) -> Any:
    """The test maps' `ProSummary` at AUPRO@30%, or None without defect or normal pixels."""
    from cmad.metrics import pro_summary

    if not any(np.any(g) for g in gts) or all(np.all(g) for g in gts):
        return None
    return pro_summary(gts, [p.anomaly_map for p in preds], limit=0.3)


def compare_methods(results: dict, summaries: dict | None = None, reference: str = "cmad",
                    seed: int = 0) -> dict | None:
    """The reference method (cmad, else the first method) against each other method, on
    the categories both ran on: the mean I-AUROC difference with a 95% paired bootstrap
    interval over the test parts (`cmad.metrics.image_auroc_difference`), and the same for
    AUPRO@30% where `summaries` ({method: {category: ProSummary}}) has both methods
    (`cmad.metrics.aupro_difference`; its mean is the exact metrics' difference). None with
    fewer than two methods or no per-part scores."""
    from cmad.metrics import aupro_difference, has_regions, image_auroc_difference

    scored = {m: e["test_scores"] for m, e in results["methods"].items() if e.get("test_scores")}
    labels = results.get("test_labels") or {}
    summaries = summaries or {}
    if len(scored) < 2:
        return None
    if reference not in scored:
        first = next(iter(scored))
        log.info("comparison: %s has no test scores; comparing against %s", reference, first)
        reference = first
    out: dict = {"reference": reference, "level": 0.95, "n_boot": BOOTSTRAP_REPLICATES,
                 "methods": {}}
    ref = scored[reference]
    for m, per in scored.items():
        if m == reference:
            continue
        cats = [c for c in ref if c in per]
        if not cats:
            continue
        row = {"I-AUROC": image_auroc_difference(
            [labels[c] for c in cats], [ref[c] for c in cats], [per[c] for c in cats],
            n_boot=BOOTSTRAP_REPLICATES, seed=seed)}
        sa, sb = summaries.get(reference, {}), summaries.get(m, {})
        both = [c for c in cats if sa.get(c) is not None and sb.get(c) is not None]
        if both:
            d = aupro_difference([sa[c] for c in both], [sb[c] for c in both], limit=0.3,
                                 n_boot=BOOTSTRAP_REPLICATES, seed=seed)
            used = [c for c in both if has_regions(sa[c])]  # the categories compared
            exact = [results["methods"][reference]["categories"][c]["AUPRO@30%"]
                     - results["methods"][m]["categories"][c]["AUPRO@30%"] for c in used]
            if d["categories"]:
                row["AUPRO@30%"] = {**d, "mean": float(np.mean(exact))}
        out["methods"][m] = row
    return out


def _panel_indices(test: Sequence[Prepared], per_type: int = 2) -> list[int]:
    """The first `per_type` test samples of each defect type (good included)."""
    idx, seen = [], {}
    for i, p in enumerate(test):
        if seen.get(p.defect_type, 0) < per_type:
            seen[p.defect_type] = seen.get(p.defect_type, 0) + 1
            idx.append(i)
    return idx


def _panels(cd: CategoryData, idx: list[int], preds: list, decision: Decision) -> list[dict]:
    out = []
    for i, pr in zip(idx, preds):
        p = cd.test[i]
        groups: dict[str, list[np.ndarray]] = {}
        for b, m in pr.branch_maps.items():
            groups.setdefault(branch_class(b).panel, []).append(m)
        maps = {g: sum(ms) / len(ms) for g, ms in groups.items()}
        maps["fused"] = pr.anomaly_map_work
        depth = p.xyz[..., 2] if p.xyz is not None else np.zeros(p.gt.shape, np.float32)
        out.append({"category": cd.name, "defect_type": p.defect_type, "stem": p.stem,
                    "score": pr.score, "label": p.label, "threshold": decision.threshold,
                    "pixel_threshold": decision.pixel_threshold,
                    "rgb": p.rgb if p.rgb is not None else np.zeros(p.gt.shape + (3,), np.uint8),
                    "depth": depth, "gt": p.gt, "maps": maps})
    return out


def _time_into(row: dict, key: str, timer: Callable[[Detector, CategoryData, Path], dict],
               det: Detector, cd: CategoryData, method: str, what: str,
               keep_error: bool) -> None:
    """row[key] = timer(det, cd, a scratch folder); a `ConfigError` is logged (and kept in
    the row as {"error": ...} when `keep_error`)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            row[key] = timer(det, cd, Path(tmp))
    except ConfigError as exc:
        log.warning("%s: %s not %s: %s", cd.name, method, what, exc)
        if keep_error:
            row[key] = {"error": str(exc)}


def bench_category(data: Path, category: str, size: int, seed: int, cache_dir: Path | None,
                   methods: Sequence[str], shots: Sequence[int], base: DetectorConfig | None,
                   panels_per_type: int, threads: int, run_methods: bool = True,
                   progress: bool = False, tick: Callable[..., None] | None = None,
                   onnx: bool = False, stream: bool = False) -> dict:
    """One category's part of the bench: every method (unless `run_methods` is False) and
    every few-shot count in `shots`, on features extracted once (for all of `methods`).
    Plain data out, so that it can run as a Ray task: {"rows": {method: row or None},
    "panels": [...], "shots": {"K": {method: metrics}}}."""
    set_threads(threads)
    cd, ext = load_category(data, category, size, seed, cache_dir, progress, methods, base)
    c = category
    out: dict = {"rows": {}, "panels": [], "shots": {}}
    for m in methods if run_methods else []:
        if not _runnable(method_config(m, seed, size, base), cd.modalities):
            log.warning("%s: skipping %s, which needs modalities this category lacks", c, m)
            out["rows"][m] = None
        else:
            row, det, preds = run_method(m, cd, seed, size, ext, base=base)
            # the maps reduced to what AUPRO needs, for the paired comparison (not saved)
            row["pro_summary"] = _pro_summary(cd.gts, preds)
            if onnx:
                _time_into(row, "runtime", time_runtimes, det, cd, m, "timed in ONNX Runtime",
                           keep_error=True)
            if stream:
                _time_into(row, "stream", time_stream, det, cd, m, "streamed", keep_error=False)
            out["rows"][m] = row
            if m == "cmad":  # per-branch maps for the figures, outside the timed loop
                idx = _panel_indices(cd.test, panels_per_type)
                preds, _ = det.predict_features(cd.test_fm.select(idx), [cd.test[i] for i in idx],
                                                branch_maps=True)
                out["panels"].extend(_panels(cd, idx, preds, det.decision))
        if tick is not None:
            tick(c, m)
    for k in shots:
        for m in SHOT_METHODS:
            if _runnable(method_config(m, seed, size, base), cd.modalities):
                row, _, _ = run_method(m, cd, seed, size, ext, shots=k, base=base)
                out["shots"].setdefault(str(k), {})[m] = row["metrics"]
            if tick is not None:
                tick(c, f"{m}@{k}")
    return out


@dataclass
class BenchResult:
    results: dict
    out_dir: Path
    summary: str


def run_bench(
    data: Path,
    out: Path,
    categories: list[str] | None = None,
    methods: list[str] | None = None,
    shots: list[int] | None = None,
    size: int = DEFAULT_SIZE,
    cache_dir: Path | None = None,
    seed: int = 0,
    threads: int = 2,
    progress: bool = True,
    base: DetectorConfig | None = None,
    panels_per_type: int = 2,
    executor: str = "local",
    address: str | None = None,
    onnx: bool = False,
    stream: bool = False,
) -> BenchResult:
    """Fit and evaluate every method on every category; write the report folder.

    `executor="ray"`: each category's methods, and each of its few-shot counts, run as a
    Ray task (`address`: an existing cluster, see `cmad.executor`); the metrics are the
    local run's, the timings are those of the workers (which share their machines).
    `onnx`: also export each fitted method to ONNX and time it beside torch on the same
    test samples (`time_runtimes`; the "Runtimes" table). `stream`: also time each fitted
    method end to end on the test files as `cmad predict` streams them (`time_stream`; the
    "Throughput" table)."""
    from cmad.data import open_dataset
    from cmad.executor import check_executor
    from cmad.report import summary_text, write_report

    check_executor(executor, address)
    set_threads(threads)
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        cfg = method_config(m, seed, size, base)  # fail early on unknown names
        if onnx:
            cfg.rgb.require_float32(f"{m}'s", where="--onnx: ")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: report folder exists and is not empty; each run writes a new one")
    cats = categories or open_dataset(data).categories
    if cache_dir is None:
        cache_dir = default_cache_dir()
    results: dict = {"methods": {m: {"categories": {}, "per_defect": {}} for m in methods},
                     "shots": {}, "machine": machine_info(threads),
                     "config": config_as_run(base, seed, size),
                     "created": _dt.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), "descriptions": {m: METHODS[m][1] for m in methods}}
    per_method_eff: dict[str, list[dict]] = {m: [] for m in methods}
    summaries: dict[str, dict] = {}  # method -> category -> ProSummary (the comparison's)
    panels: list[dict] = []
    shot_rows: dict[str, dict[str, dict]] = {}
    bar = progress_bar(total=len(cats) * (len(methods) + len(shots or []) * len(SHOT_METHODS)),
                       desc="bench", unit="fit", enabled=progress, leave=True)
    common = {"data": data, "size": size, "seed": seed, "cache_dir": cache_dir, "methods": methods,
              "base": base, "panels_per_type": panels_per_type, "threads": threads,
              "onnx": onnx, "stream": stream}
    if executor == "local":
        outs = [bench_category(category=c, shots=shots or [], progress=progress,
                               tick=lambda c=c, m="": (bar.set_postfix(category=c, method=m),
                                                       bar.update(1)), **common)
                for c in cats]
    else:  # one task per category for the methods, one per category and few-shot count
        from cmad.executor import map_tasks, ray_session

        jobs = [{"category": c, "shots": [], **common} for c in cats]
        jobs += [{"category": c, "shots": [k], "run_methods": False, **common}
                 for c in cats for k in shots or []]
        with ray_session(address) as ray:
            parts = map_tasks(ray, bench_category, jobs, cpus_per_task=threads)
        by_cat: dict[str, dict] = {}
        for job, part in zip(jobs, parts):  # in the local run's order: methods, then shots
            got = by_cat.setdefault(job["category"], {"rows": {}, "panels": [], "shots": {}})
            got["rows"].update(part["rows"])
            got["panels"].extend(part["panels"])
            got["shots"].update(part["shots"])
        outs = [by_cat[c] for c in cats]
        bar.update(bar.total - bar.n)
    for c, got in zip(cats, outs):
        for m in methods:
            row = got["rows"][m]
            res = results["methods"][m]
            if row is None:  # the method needs modalities this category lacks
                res["categories"][c] = {k: float("nan") for k in METRICS}
                continue
            res["categories"][c] = row["metrics"]
            res["per_defect"][c] = row["per_defect"]
            res.setdefault("decision", {})[c] = row["decision"]
            res.setdefault("test_scores", {})[c] = row["test_scores"]
            summaries.setdefault(m, {})[c] = row.pop("pro_summary", None)
            results.setdefault("test_labels", {})[c] = row["test_labels"]
            per_method_eff[m].append(row)
        panels.extend(got["panels"])
        for k, by_method in got["shots"].items():
            for m, metrics in by_method.items():
                shot_rows.setdefault(k, {}).setdefault(m, {})[c] = metrics
    bar.close()
    for m in methods:
        res = results["methods"][m]
        rows = per_method_eff[m]
        res["mean"] = _mean(list(res["categories"].values()))
        if res.get("decision"):
            res["decision_mean"] = _mean_decision(res["decision"])
        if not rows:
            continue
        stages = sorted({k for r in rows for k in r["stages_ms"]})
        res["fit_s"] = float(np.mean([r["fit_s"] for r in rows]))
        res["method_fit_s"] = float(np.mean([r["method_fit_s"] for r in rows]))
        res["infer_ms_per_sample"] = float(np.mean([r["infer_ms_per_sample"] for r in rows]))
        res["stages_ms"] = {s: float(np.mean([r["stages_ms"].get(s, 0.0) for r in rows])) for s in stages}
        res["model_bytes"] = int(np.mean([r["model_bytes"] for r in rows]))
        res["bank_entries"] = int(np.mean([r["bank_entries"] for r in rows]))
        res["bank_bytes"] = int(np.mean([r["bank_bytes"] for r in rows]))
        res["peak_rss_mb"] = float(max(r["peak_rss_mb"] for r in rows))
        res["weights"] = {r["category"]: r["weights"] for r in rows}
        res["bank_scale"] = {r["category"]: r["bank_scale"] for r in rows if r.get("bank_scale")}
        timed = [r["runtime"] for r in rows if "torch_ms" in r.get("runtime", {})]
        if timed:
            res["runtime"] = {k: float(np.mean([t[k] for t in timed]))
                              for k in ("torch_ms", "onnx_ms", "onnx_bytes")}
            res["runtime"].update({k: float(max(t[k] for t in timed))
                                   for k in ("max_score_diff", "max_map_diff")})
            res["runtime"]["n"] = int(sum(t["n"] for t in timed))
            res["runtime"]["categories"] = {r["category"]: r["runtime"] for r in rows}
        elif any("runtime" in r for r in rows):
            res["runtime"] = {"error": next(r["runtime"]["error"] for r in rows if "runtime" in r)}
        streamed = [r["stream"] for r in rows if "stream" in r]
        if streamed:
            n_all, wall_all = sum(t["n"] for t in streamed), sum(t["wall_s"] for t in streamed)
            res["stream"] = {"samples_per_s": n_all / wall_all,  # over all categories' samples
                             "ms_per_sample": 1000.0 * wall_all / n_all, "n": int(n_all),
                             "load_average": [x for t in streamed for x in t["load_average"]],
                             "categories": {r["category"]: r["stream"] for r in rows
                                            if "stream" in r}}
        loads = [x for r in rows for x in r["load_average"] if x is not None]
        res["load_average"] = [min(loads), max(loads)] if loads else None
    results["comparison"] = compare_methods(results, summaries, seed=seed)
    for k, by_method in shot_rows.items():
        results["shots"][k] = {m: {"categories": cats_, "mean": _mean(list(cats_.values()))}
                               for m, cats_ in by_method.items()}
    # built whole in a hidden sibling, then renamed into place: a killed run leaves no
    # half-written report (and the next run clears the sibling)
    results["machine"]["load_average_end"] = load_average()
    with atomic_folder(out, lambda _: False) as tmp:
        write_report(tmp, results, panels, quiet=not progress)
    summary = summary_text(results)
    for m in methods:
        rt = results["methods"][m].get("runtime") or {}
        if "torch_ms" in rt:
            summary += (f"{m}: torch {rt['torch_ms']:.1f} ms/sample, ONNX Runtime "
                        f"{rt['onnx_ms']:.1f} ms/sample (max score difference "
                        f"{rt['max_score_diff']:.1e}; file {rt['onnx_bytes'] / 1e6:.2f} MB)\n")
    for m in methods:
        st = results["methods"][m].get("stream")
        if st:
            summary += (f"{m}: {st['samples_per_s']:.1f} samples/s end to end, streamed "
                        f"({st['ms_per_sample']:.1f} ms/sample over {st['n']} test samples)\n")
    log.info("report written to %s (%d panels)", out / "index.html", len(panels))
    return BenchResult(results, out, summary)


def time_features(data: Path, category: str, limit: int = 30, size: int = DEFAULT_SIZE,
                  runtime: str = "torch", threads: int = 2, progress: bool = True,
                  config: DetectorConfig | None = None) -> dict:
    """Median ms per sample of preprocessing and of each feature stage the config needs
    (after warm-up)."""
    from cmad.data import open_dataset

    set_threads(threads)
    load_before = load_average()
    cat = open_dataset(data).category(category)
    refs = []
    for split in ("test", "train", "validation"):
        refs.extend(cat.samples(split))
        if len(refs) >= limit + 1:
            break
    samples = refs[: limit + 1]
    cfg = (config or DetectorConfig()).with_overrides({"size": size})
    det = Detector(cfg, rgb_runtime=runtime)
    modalities = [m for m in ("rgb", "xyz") if getattr(samples[0], m) is not None]
    ext = det.extractor_for(modalities)
    prep_ms, prepared = [], []
    for s in samples:
        t = time.perf_counter()
        prepared.extend(det.prepare([s]))
        prep_ms.append((time.perf_counter() - t) * 1000.0)
    t = time.perf_counter()
    first, _ = ext.extract(prepared[:1])
    first_ms = (time.perf_counter() - t) * 1000.0
    _, times = timed_features(ext, prepared[1:], "features", progress)
    out = {"category": category, "n": len(prepared) - 1, "size": size, "threads": threads,
           "runtime": runtime, "preprocess_ms": float(np.median(prep_ms[1:]))}
    out.update({f"{k}_ms": float(np.median(v)) for k, v in sorted(times.items())})
    out.update({
        "rgb_ms": float(np.median(times["rgb_features"])) if "rgb_features" in times else None,
        "xyz_ms": float(np.median(times["xyz_features"])) if "xyz_features" in times else None,
        "first_call_ms": first_ms,
        "rgb_dim": int(first["rgb"].shape[1]) if "rgb" in first else None,
        "xyz_dim": int(first["xyz"].shape[1]) if "xyz" in first else None,
        "grid": list(first.grid),
        # where the times were measured: above the CPU count, other work slowed them
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "load_average_start": load_before, "load_average_end": load_average(),
    })
    return out


def category_table(results: dict, method: str) -> str:
    """Plain-text table of one method's I-AUROC, P-AUROC and AUPRO@30% per category."""
    row = results["methods"][method]
    keys = ("I-AUROC", "P-AUROC", "AUPRO@30%")
    lines = [f"{method}: per category", f"{'category':<14}" + "".join(f"{k:>11}" for k in keys)]
    for c, m in [*row["categories"].items(), ("Mean", row["mean"])]:
        lines.append(f"{c:<14}" + "".join(f"{m[k]:>11.3f}" for k in keys))
    return "\n".join(lines)


def run_demo(out: Path, size: str = "demo", seed: int = 0, threads: int = 2,
             categories: int | list[str] | None = None, methods: Sequence[str] | None = None,
             progress: bool = True) -> BenchResult:
    """`make demo`: synthetic data (the `size` preset), then a bench of cmad against BTF and
    its single branches (`methods`, default DEMO_METHODS)."""
    from cmad import synth

    out = Path(out)
    # every choice checked before any work: a bad one leaves nothing behind
    synth.get_preset(size)
    for m in methods or ():
        check_method(m)
    if isinstance(categories, list):
        unknown = [c for c in categories if c not in synth.CATEGORY_NAMES]
        if unknown:
            raise ConfigError(f"unknown synthetic categories {unknown}; choose from "
                              f"{list(synth.CATEGORY_NAMES)}")
    # one data folder per preset and seed, so that `make demo` and `make bench` (or another
    # --preset) in the same folder never mix datasets
    data = out / f"data-{size}-seed{seed}"
    latest = out / "report"
    if latest.exists() and not latest.is_symlink():
        raise OutputError(latest, "exists and is not the demo's link to its latest report; "
                                  "move it away or choose another --out")
    if categories is None:
        cats = list(synth.CATEGORY_NAMES[:synth.SIZES[size]["n_categories"]]) \
            if size in synth.SIZES else None
    elif isinstance(categories, int):
        cats = list(synth.CATEGORY_NAMES[:categories])
    else:
        cats = list(categories)
    missing = cats if cats is None else [c for c in cats if not (data / c).is_dir()]
    if missing is None or missing:
        log.info("generating the synthetic dataset (preset %s) into %s", size, data)
        synth.generate(data, categories=missing, seed=seed, size=size, progress=progress)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = out / f"report-{stamp}"
    res = run_bench(data, report, categories=cats, methods=list(methods or DEMO_METHODS),
                    cache_dir=out / "cache", seed=seed, threads=threads, progress=progress,
                    panels_per_type=1)
    if latest.is_symlink():
        latest.unlink()
    latest.symlink_to(report.name)
    res.summary = category_table(res.results, "cmad") + "\n\n" + res.summary
    res.summary += f"\n\nreport: {report}/index.html"
    return res
