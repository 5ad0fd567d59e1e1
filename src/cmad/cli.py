"""The `cmad` command line. The only module that prints."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import typer

from cmad.errors import CmadError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Unsupervised multimodal (RGB + 3D) industrial anomaly detection.")
log = logging.getLogger("cmad")


def _setup(quiet: bool = False, threads: int | None = None) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if threads is not None:
        _positive("--threads", threads)
        from cmad.runtime import set_threads

        set_threads(threads)


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    """Refuse an option value below `minimum` (exit 2, naming the option)."""
    if value is not None and value < minimum:
        _fail(CmadError(f"{name} must be an integer >= {minimum}, got {value}"))


def _size(name: str, value: int) -> None:
    """Refuse a working resolution the detector cannot use (exit 2, naming the option)."""
    if value < 32 or value % 8:
        _fail(CmadError(f"{name} must be a multiple of 8 and at least 32, got {value}"))


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=float))


@app.command()
def info(
    data: Path = typer.Option(..., "--data", help="dataset root in the MVTec 3D-AD layout"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Categories, split counts, defect types, image sizes, modalities and problems found."""
    _setup(quiet=as_json)
    from cmad.data.info import dataset_info, format_info

    try:
        result = dataset_info(data)
    except (CmadError, OSError) as exc:
        _fail(exc)
    if as_json:
        _print_json(result)
    else:
        typer.echo(format_info(result))


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="folder to write the dataset into"),
    categories: str | None = typer.Option(
        None, "--categories", help="a number N (the first N) or comma-separated names"),
    seed: int = typer.Option(0, "--seed"),
    size: str = typer.Option("default", "--size", help="tiny | small | default | mvtec"),
    train: int | None = typer.Option(
        None, "--train", help="training samples per category, 1-999 (default: the --size preset's count)"),
    montage: Path | None = typer.Option(None, "--montage", help="also write a montage PNG"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Generate a realistic synthetic dataset in the MVTec 3D-AD layout."""
    _setup(quiet)
    _positive("--seed", seed, 0)
    _positive("--train", train)
    from cmad import synth as synth_mod

    if size not in synth_mod.SIZES:
        _fail(CmadError(f"--size must be one of {', '.join(synth_mod.SIZES)}, got {size!r}"))
    from cmad.report.montage import montage as write_montage

    cats: int | list[str] | None = None
    if categories:
        cats = int(categories) if categories.isdigit() else [c.strip() for c in categories.split(",")]
        if cats == 0 or (isinstance(cats, list) and not all(cats)):
            _fail(CmadError(f"--categories: {categories!r} is not a positive number or a "
                            "comma-separated list of names"))
    try:
        t = time.perf_counter()
        root = synth_mod.generate(out, categories=cats, seed=seed, size=size, progress=not quiet,
                                  train=train)
        typer.echo(f"wrote {root} in {time.perf_counter() - t:.1f} s")
        if montage is not None:
            write_montage(root, montage)
            typer.echo(f"montage: {montage}")
    except (CmadError, OSError, ValueError) as exc:
        _fail(exc)


@app.command()
def features(
    data: Path = typer.Option(..., "--data"),
    category: str = typer.Option(..., "--category"),
    limit: int = typer.Option(30, "--limit", help="samples to time (at least 20 after warm-up)"),
    size: int = typer.Option(224, "--size"),
    runtime: str = typer.Option("torch", "--runtime", help="torch | onnx (RGB backbone)"),
    threads: int = typer.Option(2, "--threads"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Milliseconds per sample of each feature stage (median after warm-up)."""
    _setup(quiet=as_json, threads=threads)
    _positive("--limit", limit)
    _size("--size", size)
    if runtime not in ("torch", "onnx"):
        _fail(CmadError(f"--runtime must be 'torch' or 'onnx', got {runtime!r}"))
    from cmad.bench import time_features

    try:
        result = time_features(data, category, limit=limit, size=size, runtime=runtime,
                               threads=threads, progress=not as_json)
    except (CmadError, OSError) as exc:
        _fail(exc)
    if as_json:
        _print_json(result)
    else:
        for k, v in result.items():
            typer.echo(f"{k:>22}: {v}")


def _load_config(config: Path | None, overrides: dict) -> DetectorConfig:  # noqa: F821
    from cmad.model.config import DetectorConfig

    base = DetectorConfig.from_file(config) if config else DetectorConfig()
    return base.with_overrides({k: v for k, v in overrides.items() if v is not None})


@app.command()
def fit(
    data: Path = typer.Option(..., "--data"),
    category: str = typer.Option(..., "--category"),
    out: Path = typer.Option(..., "--out", help="model directory to write"),
    shots: int | None = typer.Option(None, "--shots", help="fit on K training samples"),
    config: Path | None = typer.Option(None, "--config", help="YAML/JSON detector config"),
    seed: int | None = typer.Option(None, "--seed"),
    cache: Path | None = typer.Option(None, "--cache", help="cache dir for derived arrays"),
    threads: int = typer.Option(2, "--threads"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Fit a detector on the normal training (and validation) samples of a category."""
    _setup(quiet, threads)
    from cmad.cache import default_cache_dir
    from cmad.data import open_dataset
    from cmad.pipeline import Detector, check_model_dir

    try:
        if seed is not None and seed < 0:
            raise CmadError(f"--seed must be >= 0, got {seed}")
        if shots is not None and shots < 1:
            raise CmadError(f"--shots must be a positive integer, got {shots}")
        check_model_dir(out)
        cfg = _load_config(config, {"seed": seed})
        det = Detector(cfg, cache_dir=cache or default_cache_dir())
        det.fit(open_dataset(data).category(category), shots=shots, progress=not quiet)
        det.save(out)
    except (CmadError, OSError) as exc:
        _fail(exc)
    r = det.report
    weights = ", ".join(f"{k} {v:.3f}" for k, v in r.weights.items())
    typer.echo(f"fitted {category} on {r.n_train} train / {r.n_val} validation samples in "
               f"{r.fit_s:.1f} s; weights: {weights}; bank entries {r.bank_entries}; "
               f"model {det.model_bytes / 1e6:.2f} MB -> {out}")


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data"),
    category: str = typer.Option(..., "--category"),
    maps: Path | None = typer.Option(None, "--maps", help="write official-layout TIFF maps"),
    resolution: str = typer.Option("original", "--resolution", help="original | working"),
    cache: Path | None = typer.Option(None, "--cache"),
    threads: int = typer.Option(2, "--threads"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Full metric set on the test split (maps at original image size by default)."""
    _setup(quiet=as_json, threads=threads)
    if resolution not in ("original", "working"):
        _fail(CmadError(f"--resolution must be 'original' or 'working', got {resolution!r}"))
    from cmad.cache import default_cache_dir
    from cmad.data import open_dataset
    from cmad.evaluate import check_maps_dir, evaluate_predictions, export_maps
    from cmad.pipeline import Detector

    try:
        if maps is not None:
            check_maps_dir(maps, category)
        cat = open_dataset(data).category(category)  # cheap checks before loading the model
        det = Detector.load(model, cache_dir=cache or default_cache_dir())
        if det.category and det.category != category:
            log.warning("%s: the model was fitted on category %r, not on --category %r; its "
                        "scores and threshold may not fit this category", model, det.category,
                        category)
        test = cat.samples("test")
        preds = det.predict(test, progress=not as_json)
        gts = [s.gt for s in test]
        if resolution == "working":
            gts = [p.gt for p in det.prepare(test)]
        ev = evaluate_predictions(category, preds, gts, resolution=resolution)
        if maps is not None:
            export_maps(maps, category, preds)
    except (CmadError, OSError) as exc:
        _fail(exc)
    if as_json:
        _print_json(ev.to_dict())
    else:
        typer.echo(f"{category}: {ev.n_test} test samples, maps at {resolution} resolution")
        for k, v in ev.metrics.items():
            typer.echo(f"  {k:>10}: {v:.4f}")


@app.command()
def predict(
    model: Path = typer.Option(..., "--model"),
    out: Path = typer.Option(..., "--out"),
    rgb: Path | None = typer.Option(None, "--rgb", help="one RGB PNG"),
    xyz: Path | None = typer.Option(None, "--xyz", help="its organized point cloud TIFF"),
    input_dir: Path | None = typer.Option(
        None, "--input", help="a folder with rgb/ and xyz/ subfolders (dataset layout)"),
    threads: int = typer.Option(2, "--threads"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Score new samples; write anomaly maps (TIFF), overlays (PNG) and scores.json."""
    _setup(quiet, threads)
    if input_dir is not None and (rgb is not None or xyz is not None):
        _fail(CmadError("--input: give either --input FOLDER or --rgb/--xyz files, not both"))
    if input_dir is None and rgb is None and xyz is None:
        _fail(CmadError("--input: give --input FOLDER or --rgb/--xyz files"))
    from cmad.pipeline import Detector
    from cmad.predict_io import check_output_dir, collect_inputs, write_outputs

    try:
        check_output_dir(out)
        det = Detector.load(model)
        samples = collect_inputs(rgb=rgb, xyz=xyz, input_dir=input_dir, modalities=det.modalities)
        preds = det.predict(samples, progress=not quiet)
        path = write_outputs(out, samples, preds, threshold=det.threshold)
    except (CmadError, OSError) as exc:
        _fail(exc)
    for s, p in zip(samples, preds):
        flag = "ANOMALOUS" if p.score > det.threshold else "normal"
        typer.echo(f"{s.stem}: score {p.score:.3f} ({flag}, threshold {det.threshold:.3f})")
    typer.echo(f"wrote {path}")


@app.command()
def bench(
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="report folder (a new one per run)"),
    categories: str | None = typer.Option(None, "--categories", help="comma-separated"),
    methods: str | None = typer.Option(None, "--methods", help="comma-separated"),
    shots: str | None = typer.Option(None, "--shots", help="e.g. 5,10,50"),
    resolution: int = typer.Option(224, "--resolution"),
    cache: Path | None = typer.Option(None, "--cache"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Fit and evaluate cmad, its branches and baselines on the same features; report."""
    _setup(quiet, threads)
    _positive("--seed", seed, 0)
    _size("--resolution", resolution)
    from cmad.bench import run_bench

    try:
        shot_list = [int(x) for x in shots.split(",")] if shots else None
    except ValueError:
        _fail(CmadError(f"--shots: {shots!r} is not a comma-separated list of integers"))
    if shot_list is not None and min(shot_list) < 1:
        _fail(CmadError(f"--shots: {shots!r}: every shot count must be an integer >= 1"))
    try:
        res = run_bench(
            data, out,
            categories=[c.strip() for c in categories.split(",")] if categories else None,
            methods=[m.strip() for m in methods.split(",")] if methods else None,
            shots=shot_list,
            size=resolution, cache_dir=cache, seed=seed, threads=threads, progress=not quiet,
        )
    except (CmadError, OSError) as exc:
        _fail(exc)
    typer.echo(res.summary)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out"),
    size: str = typer.Option("default", "--size", help="synthetic preset: tiny | small | default"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
) -> None:
    """Synthetic data -> fit -> evaluate every category -> table and report folder."""
    _setup(False, threads)
    _positive("--seed", seed, 0)
    from cmad.bench import run_demo

    try:
        res = run_demo(out, size=size, seed=seed, threads=threads)
    except (CmadError, OSError) as exc:
        _fail(exc)
    typer.echo(res.summary)


def main() -> None:
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
