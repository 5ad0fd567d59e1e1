"""How cost grows with the training set: `cmad bench --scale 25,50,100,200,400`.

For each number N of training samples and each method: fit seconds, bank entries, model bytes,
peak resident memory of the fit and inference ms per sample, with the exponent of fit time
against N from a least-squares line in log-log space.

What is measured, in one process and one run:
- every training, validation and test sample is read, preprocessed and featured once,
  uncached and one at a time, with its ms per stage recorded;
- a fit of N samples is charged N times the median per-sample cost of the stages the method
  needs (preprocessing included), the validation set's features, and the method's own fit
  (banks, coresets, mappings, normalisation, fusion), which runs for real on N samples;
- peak RSS is sampled while the method fits, as the process's peak and as the growth over
  the RSS before that fit (the shared features of all N are already in memory);
- every method is fitted once before its first recorded fit (compilation, allocator);
- inference is the median ms per test sample of every stage the method needs, one sample at
  a time after a warm-up.
"""
from __future__ import annotations

import datetime as _dt
import io
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmad.bench import (
    METHODS,
    PeakRSS,
    config_as_run,
    load_average,
    machine_info,
    method_config,
    stages_of,
    timed_features,
)
from cmad.configs import DEFAULT_SIZE
from cmad.data.io import atomic_folder, write_bytes_atomic
from cmad.data.splits import select_shots, split_source
from cmad.errors import ConfigError
from cmad.features import FeatureExtractor, FeatureMaps
from cmad.model.config import DetectorConfig
from cmad.model.core import feature_needs
from cmad.pipeline import Detector
from cmad.progress import progress as progress_bar
from cmad.runtime import set_threads

log = logging.getLogger(__name__)


def parse_counts(text: str) -> list[int]:
    """'25,50,100' -> [25, 50, 100] (positive, distinct, sorted); ConfigError otherwise."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--scale: {text!r} is not a comma-separated list of integers") from None
    if not counts or any(c < 1 for c in counts):
        raise ConfigError(f"--scale: counts must be positive integers, got {text!r}")
    return sorted(set(counts))


def _timed(ext: FeatureExtractor, prepared: Sequence, desc: str, progress: bool
           ) -> tuple[FeatureMaps, dict[str, float]]:
    """`bench.timed_features` with the median ms per sample of each stage."""
    fm, times = timed_features(ext, prepared, desc, progress)
    return fm, {k: float(np.median(v)) for k, v in times.items()}


def exponent(ns: Sequence[int], ys: Sequence[float]) -> float:
    """Slope of log(y) against log(n): y grows about as n ** slope."""
    ns_, ys_ = np.asarray(ns, float), np.asarray(ys, float)
    ok = (ns_ > 0) & (ys_ > 0) & np.isfinite(ys_)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns_[ok]), np.log(ys_[ok]), 1)[0])


def run_cost_curve(data: Path, out: Path, category: str, methods: Sequence[str],
                   counts: Sequence[int], size: int = DEFAULT_SIZE, seed: int = 0, threads: int = 2,
                   n_test: int = 20, progress: bool = True,
                   base: DetectorConfig | None = None) -> dict:
    """Measure the cost curve of `methods` on one category; write `out` (results.json,
    cost_curve.md, cost_curve.png) whole or not at all. Returns the results. `base`: the
    configuration each method's fields are set on (as in `run_bench`)."""
    from cmad.data import open_dataset

    set_threads(threads)
    for m in methods:
        method_config(m, seed, size, base)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: report folder exists and is not empty; each run writes a new one")
    cat = open_dataset(data).category(category)
    train_s, val_s = split_source(cat, seed)
    counts = sorted(counts)
    if counts[-1] > len(train_s):
        raise ConfigError(f"--scale: {counts[-1]} training samples asked for, but {category} has "
                          f"{len(train_s)}; generate more with `cmad synth --train N`")
    train_s = select_shots(train_s, counts[-1], seed)
    test_s = cat.samples("test")[:n_test]
    modalities = [m for m in ("rgb", "xyz") if getattr(train_s[0], m) is not None]
    configs = {m: method_config(m, seed, size, base) for m in methods}
    needs: set[str] = set()
    for c in configs.values():
        needs |= feature_needs(c, modalities)
    cmad_cfg = method_config("cmad", seed, size, base)
    ext = FeatureExtractor(needs, size=size, rgb=cmad_cfg.rgb, xyz=cmad_cfg.xyz,
                           geometry=cmad_cfg.geometry, cache_dir=None)
    prep = Detector(cmad_cfg, cache_dir=None, extractor=ext)

    def prepared(samples: Sequence, desc: str) -> tuple[list, float]:
        items, ms = [], []
        for s in progress_bar(samples, desc=desc, unit="sample", enabled=progress):
            t = time.perf_counter()
            items.extend(prep.prepare([s]))
            ms.append((time.perf_counter() - t) * 1000.0)
        return items, float(np.median(ms))

    load0 = load_average()
    train, prep_ms = prepared(train_s, f"{category} preprocess train")
    val, _ = prepared(val_s, f"{category} preprocess validation")
    test, _ = prepared(test_s, f"{category} preprocess test")
    ext.extract(train[:1], prep_digest=None)  # warm-up
    train_fm, train_ms = _timed(ext, train, f"{category} train features", progress)
    test_fm, test_ms = _timed(ext, test, f"{category} test features", progress)
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    bar = progress_bar(total=len(counts) * len(methods), desc="cost curve", unit="fit",
                       enabled=progress, leave=True)
    for m, cfg in configs.items():
        det0 = Detector(cfg, extractor=ext)
        calib = det0.calibration(val, modalities)
        t = time.perf_counter()
        calib_fm, _ = det0.features(calib, cache=False)
        calib_s = time.perf_counter() - t + prep_ms * len(val) / 1000.0
        stages = stages_of(feature_needs(cfg, modalities))
        per_sample_feat_ms = prep_ms + sum(train_ms.get(s, 0.0) for s in stages)
        # warm-up fit (numba compilation, allocator), not recorded
        Detector(cfg, extractor=ext).fit_features(train_fm.select(list(range(counts[0]))),
                                                  calib_fm, calib, modalities, category=category)
        for n in counts:
            bar.set_postfix(method=m, n=n)
            idx = select_shots(list(range(len(train))), n, seed)
            fm = train_fm.select(idx)
            det = Detector(cfg, extractor=ext)
            with PeakRSS() as mem:
                before = mem.peak
                t = time.perf_counter()
                det.fit_features(fm, calib_fm, calib, modalities, category=category)
                method_fit_s = time.perf_counter() - t
            det.predict_features(test_fm.index(0), test[:1], branch_maps=False)  # warm-up
            own: dict[str, list[float]] = {}
            for i in range(len(test)):
                _, ms = det.predict_features(test_fm.index(i), [test[i]], branch_maps=False)
                for k, v in ms.items():
                    own.setdefault(k, []).append(v)
            infer = prep_ms + sum(test_ms.get(s, 0.0) for s in stages)
            infer += sum(float(np.median(v)) for v in own.values())
            with tempfile.TemporaryDirectory() as tmp:
                det.save(Path(tmp) / "model")
                disk = sum(f.stat().st_size for f in (Path(tmp) / "model").iterdir())
            feat_s = per_sample_feat_ms * n / 1000.0
            rows[m].append({
                "n_train": n, "fit_s": feat_s + calib_s + method_fit_s,
                "feature_s": feat_s, "validation_s": calib_s, "method_fit_s": method_fit_s,
                "bank_entries": det.bank_entries, "model_bytes": int(disk),
                "peak_rss_mb": mem.peak, "fit_rss_growth_mb": max(mem.peak - before, 0.0),
                "infer_ms_per_sample": infer,
            })
            bar.update(1)
    bar.close()
    results = {
        "category": category, "data": str(data), "counts": list(counts), "size": size,
        "seed": seed, "n_test": len(test), "machine": machine_info(threads),
        "load_average": {"before": load0, "after": load_average()},
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "descriptions": {m: METHODS[m][1] for m in methods},
        "config": config_as_run(base, seed, size),
        "feature_ms_per_sample": {"preprocess": prep_ms, **train_ms},
        "methods": {m: {"rows": r, "fit_exponent": exponent([x["n_train"] for x in r],
                                                            [x["fit_s"] for x in r]),
                        "method_fit_exponent": exponent([x["n_train"] for x in r],
                                                        [x["method_fit_s"] for x in r])}
                    for m, r in rows.items()},
    }
    from cmad.report import to_json

    with atomic_folder(out, lambda _: False) as tmp:
        write_bytes_atomic(tmp / "results.json", to_json(results).encode())
        write_bytes_atomic(tmp / "cost_curve.md", table_md(results).encode())
        write_bytes_atomic(tmp / "cost_curve.png", plot_png(results))
    return results


def table_md(results: dict) -> str:
    from cmad.report.tables import fmt_bytes

    lines = [f"# Cost curve: {results['category']} at {results['size']} px, "
             f"{results['machine']['threads']} threads (load average before/after "
             f"{results['load_average']['before']} / {results['load_average']['after']})", "",
             "| method | N train | fit s | of which method fit s | bank entries | model bytes | "
             "peak RSS MB (growth) | infer ms/sample |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for m, r in results["methods"].items():
        for x in r["rows"]:
            lines.append(f"| {m} | {x['n_train']} | {x['fit_s']:.1f} | {x['method_fit_s']:.1f} | "
                         f"{x['bank_entries']:,} | {fmt_bytes(x['model_bytes'])} | "
                         f"{x['peak_rss_mb']:.0f} ({x['fit_rss_growth_mb']:.0f}) | "
                         f"{x['infer_ms_per_sample']:.1f} |")
    def slope(v: float) -> str:
        return f"{v:.2f}" if np.isfinite(v) else "n/a"

    lines += ["", "| method | fit time exponent (all) | method fit exponent |", "|---|--:|--:|"]
    for m, r in results["methods"].items():
        lines.append(f"| {m} | {slope(r['fit_exponent'])} | {slope(r['method_fit_exponent'])} |")
    if not any(np.isfinite(r["fit_exponent"]) for r in results["methods"].values()):
        lines += ["", "(An exponent needs at least two training-set sizes in `--scale`.)"]
    return "\n".join(lines) + "\n"


def plot_png(results: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    keys = (("fit_s", "fit seconds"), ("model_bytes", "model bytes"),
            ("infer_ms_per_sample", "inference ms / sample"))
    for i, (k, title) in enumerate(keys):
        ax = fig.add_subplot(1, 3, i + 1)
        for m, r in results["methods"].items():
            ns = [x["n_train"] for x in r["rows"]]
            ax.plot(ns, [max(x[k], 1e-9) for x in r["rows"]], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training samples")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
