"""The `cmad` command line. The only module that prints."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from cmad.configs import DEFAULT_SIZE, MAX_SIZE, size_problem
from cmad.errors import CmadError

# rich_markup_mode=None: click's plain help, which writes a boolean flag as `--json` (typer's
# rich panels write `--json <bool>`, as if it took a value)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["--help", "-h"],
                                    "max_content_width": 100},
                  help="Unsupervised multimodal (RGB + 3D) industrial anomaly detection.")
log = logging.getLogger("cmad")

CACHE_DEFAULT = "$CMAD_CACHE_DIR, else ~/.cache/cmad"


def _print_version(value: bool) -> None:
    if value:
        from cmad import __version__

        typer.echo(f"cmad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="print cmad's version and exit")
          ) -> None:
    """Unsupervised multimodal (RGB + 3D) industrial anomaly detection."""


# One option, one help text, wherever it appears.
def _data_opt() -> Any:
    return typer.Option(..., "--data", help="dataset root: the MVTec 3D-AD layout (or Eyecandies)")


def _category_opt() -> Any:
    return typer.Option(..., "--category", help="category to use (a folder under --data)")


def _threads_opt() -> Any:
    return typer.Option(2, "--threads", help="CPU threads for torch, numba and BLAS")


def _cache_opt() -> Any:
    return typer.Option(None, "--cache", show_default=CACHE_DEFAULT,
                        help="folder for derived arrays (preprocessed clouds, features); "
                             "entries are keyed by file content and code version")


def _precision_opt() -> Any:
    return typer.Option(None, "--precision", show_default="the config's, float32",
                        help="arithmetic of the CNN passes: float32, or bfloat16 (faster on "
                             "CPUs with AVX-512 BF16 or AMX; torch runtime only, no ONNX "
                             "export)")


def _quiet_opt() -> Any:
    return typer.Option(False, "--quiet", "-q",
                        help="no progress bars or log lines: only results and errors")


def _json_opt() -> Any:
    return typer.Option(False, "--json", help="print one JSON object (no progress output)")


SIZE_HELP = (f"working resolution in pixels, a multiple of 8 from 32 to {MAX_SIZE} (images are "
             f"padded square and resized to SIZE x SIZE)")


def _size_opt(default: int | None) -> Any:
    if default is None:
        return typer.Option(None, "--size", show_default=f"the config's size, {DEFAULT_SIZE}",
                            help=SIZE_HELP)
    return typer.Option(default, "--size", help=SIZE_HELP)


def _preset_opt(default: str, choices: str) -> Any:
    return typer.Option(default, "--preset",
                        help=f"synthetic dataset preset: {choices} (see README, Data layout)")


def _model_opt() -> Any:
    return typer.Option(..., "--model", help="model folder written by `cmad fit`")


DEMO_PRESET = "demo"   # a cmad.synth preset
METHODS_HELP = "comma-separated method names: {methods}"


class _MethodsHelpCommand(TyperCommand):
    """A command whose --help lists the bench's method names.

    They are read when the help is shown: importing the bench loads torch, which every
    other use of the command line should not wait for.
    """

    def get_help(self, ctx: Any) -> str:
        from cmad.bench import DEMO_METHODS, METHODS

        fill = {"methods": ", ".join(METHODS), "demo_methods": ",".join(DEMO_METHODS)}
        for p in self.params:
            if isinstance(p.help, str) and "{" in p.help:
                p.help = p.help.format(**fill)
            shown = getattr(p, "show_default", None)
            if isinstance(shown, str) and "{" in shown:
                p.show_default = shown.format(**fill)
        return super().get_help(ctx)


def _deprecated(old: str, new: str) -> None:
    """A warning for a renamed option (the old name still works, hidden from --help)."""
    typer.echo(f"warning: {old} is deprecated; use {new}", err=True)


def _setup(quiet: bool = False, threads: int | None = None) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if threads is not None:
        _positive("--threads", threads)
        cpus = os.cpu_count() or 1
        if threads > cpus:
            log.warning("--threads %d is more than the %d CPUs here: the threads will share "
                        "them and run slower than %d would", threads, cpus, cpus)
        from cmad.runtime import set_threads

        set_threads(threads)


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    """Refuse an option value below `minimum` (exit 2, naming the option)."""
    if value is not None and value < minimum:
        _fail(CmadError(f"{name} must be an integer >= {minimum}, got {value}"))


def _size(name: str, value: int) -> None:
    """Refuse a working resolution the detector cannot use (exit 2, naming the option)."""
    problem = size_problem(value)
    if problem:
        _fail(CmadError(f"{name} {problem}"))


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=float))


@app.command()
def info(
    data: Path = _data_opt(),
    verify: bool = typer.Option(False, "--verify",
                                help="also read every sample whole, as fit does (every file "
                                     "decoded; without it only headers, sizes and pairing are "
                                     "checked)"),
    as_json: bool = _json_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """Categories, split counts, defect types, image sizes, modalities and problems found."""
    quiet = quiet or as_json
    _setup(quiet=quiet)
    from cmad.data.info import dataset_info, format_info

    try:
        result = dataset_info(data, verify=verify, progress=not quiet)
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
        None, "--categories", show_default="the preset's count",
        help="a number N (the first N categories) or comma-separated names"),
    seed: int = typer.Option(0, "--seed", help="random seed: same seed, same files"),
    preset: str = _preset_opt("default", "tiny | small | demo | default | mvtec"),
    train: int | None = typer.Option(
        None, "--train", show_default="the preset's count",
        help="training samples per category, 1-999"),
    montage: Path | None = typer.Option(None, "--montage", show_default="none",
                                        help="also write a montage PNG of the data to this file"),
    quiet: bool = _quiet_opt(),
    old_size: str | None = typer.Option(None, "--size", hidden=True,
                                        help="deprecated name of --preset"),
) -> None:
    """Generate a realistic synthetic dataset in the MVTec 3D-AD layout."""
    _setup(quiet)
    _positive("--seed", seed, 0)
    _positive("--train", train)
    if old_size is not None:
        _deprecated("synth --size", "--preset")
        preset = old_size
    from cmad import synth as synth_mod

    if preset not in synth_mod.SIZES:
        _fail(CmadError(f"--preset must be one of {', '.join(synth_mod.SIZES)}, got {preset!r}"))
    from cmad.report.montage import montage as write_montage

    try:
        cats = _categories_arg(categories)
    except CmadError as exc:
        _fail(exc)
    try:
        t = time.perf_counter()
        root = synth_mod.generate(out, categories=cats, seed=seed, size=preset, progress=not quiet,
                                  train=train)
        typer.echo(f"wrote {root} in {time.perf_counter() - t:.1f} s")
        if montage is not None:
            write_montage(root, montage)
            typer.echo(f"montage: {montage}")
    except (CmadError, OSError, ValueError) as exc:
        _fail(exc)


@app.command()
def features(
    data: Path = _data_opt(),
    category: str = _category_opt(),
    limit: int = typer.Option(30, "--limit", help="samples to time, after one warm-up sample"),
    size: int = _size_opt(DEFAULT_SIZE),
    runtime: str = typer.Option("torch", "--runtime",
                                help="RGB backbone runtime: torch | onnx (needs the onnx extra)"),
    threads: int = _threads_opt(),
    as_json: bool = _json_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """Milliseconds per sample of each feature stage (median after warm-up)."""
    quiet = quiet or as_json
    _setup(quiet=quiet, threads=threads)
    _positive("--limit", limit)
    _size("--size", size)
    if runtime not in ("torch", "onnx"):
        _fail(CmadError(f"--runtime must be 'torch' or 'onnx', got {runtime!r}"))
    from cmad.bench import time_features

    try:
        result = time_features(data, category, limit=limit, size=size, runtime=runtime,
                               threads=threads, progress=not quiet)
    except (CmadError, OSError) as exc:
        _fail(exc)
    if as_json:
        _print_json(result)
    else:
        for k, v in result.items():
            typer.echo(f"{k:>22}: {v}")


def _precision(precision: str | None) -> dict:
    """The config override of --precision (none when not given)."""
    from cmad.features.rgb import PRECISIONS

    if precision is None:
        return {}
    if precision not in PRECISIONS:
        raise CmadError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"rgb": {"precision": precision}}


def _load_config(config: Path | None, overrides: dict) -> DetectorConfig:  # noqa: F821
    from cmad.model.config import DetectorConfig

    base = DetectorConfig.from_file(config) if config else DetectorConfig()
    return base.with_overrides({k: v for k, v in overrides.items() if v is not None})


@app.command()
def fit(
    data: Path = _data_opt(),
    category: str = _category_opt(),
    out: Path = typer.Option(..., "--out", help="model folder to write (an old model there is "
                                                "replaced)"),
    shots: int | None = typer.Option(None, "--shots", show_default="all",
                                     help="fit on K training samples chosen with the seed"),
    config: Path | None = typer.Option(None, "--config", show_default="built-in defaults",
                                       help="YAML or JSON file setting DetectorConfig fields"),
    size: int | None = _size_opt(None),
    precision: str | None = _precision_opt(),
    seed: int | None = typer.Option(None, "--seed", show_default="the config's seed, 0",
                                    help="random seed: same seed and data, same model"),
    cache: Path | None = _cache_opt(),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """Fit a detector on the normal training (and validation) samples of a category."""
    _setup(quiet, threads)
    if size is not None:
        _size("--size", size)
    from cmad.cache import default_cache_dir
    from cmad.data import open_dataset
    from cmad.pipeline import Detector, check_model_dir

    try:
        if seed is not None and seed < 0:
            raise CmadError(f"--seed must be >= 0, got {seed}")
        if shots is not None and shots < 1:
            raise CmadError(f"--shots must be a positive integer, got {shots}")
        check_model_dir(out)
        cfg = _load_config(config, {"seed": seed, "size": size, **_precision(precision)})
        det = Detector(cfg, cache_dir=cache or default_cache_dir())
        det.fit(open_dataset(data).category(category), shots=shots, progress=not quiet)
        det.save(out)
    except (CmadError, OSError) as exc:
        _fail(exc)
    r = det.report
    weights = ", ".join(f"{k} {v:.3f}" for k, v in r.weights.items())
    typer.echo(f"fitted {category} on {r.n_train} train / {r.n_val} validation samples in "
               f"{r.fit_s:.1f} s; weights: {weights}; bank entries "
               f"{', '.join(f'{k} {v:,}' for k, v in r.bank_entries.items()) or 'none'}; "
               f"model {det.model_bytes / 1e6:.2f} MB -> {out}")
    if r.bank_scale:
        typer.echo("local scale (on the defects pasted into the validation normals, with it / "
                   "plain): " + "; ".join(
                       f"{k} {'kept' if v['kept'] else 'dropped'} ({v['criterion']} "
                       f"{v['scaled']:.3f} / {v['plain']:.3f})" for k, v in r.bank_scale.items()))
    d = det.decision
    typer.echo(f"threshold {d.threshold:.3f} for a {100 * d.target_fpr:.3g}% false-positive rate "
               f"(from {d.n_normals} validation normals, highest {d.normal_max:.3f}); pixel "
               f"threshold {d.pixel_threshold:.3f}")


@app.command()
def evaluate(
    model: Path = _model_opt(),
    data: Path = _data_opt(),
    category: str = _category_opt(),
    maps: Path | None = typer.Option(None, "--maps", show_default="not written",
                                     help="write the anomaly maps as float32 TIFFs in the "
                                          "official layout MAPS/<category>/test/<defect>/NNN.tiff"),
    resolution: str = typer.Option(
        "original", "--maps-resolution",
        help="original: metrics on maps at each image's size (the official protocol); "
             "working: on the square working resolution most papers use"),
    cache: Path | None = _cache_opt(),
    threads: int = _threads_opt(),
    as_json: bool = _json_opt(),
    quiet: bool = _quiet_opt(),
    old_resolution: str | None = typer.Option(None, "--resolution", hidden=True,
                                              help="deprecated name of --maps-resolution"),
) -> None:
    """Full metric set on the test split (maps at original image size by default)."""
    quiet = quiet or as_json
    _setup(quiet=quiet, threads=threads)
    if old_resolution is not None:
        _deprecated("evaluate --resolution", "--maps-resolution")
        resolution = old_resolution
    if resolution not in ("original", "working"):
        _fail(CmadError(f"--maps-resolution must be 'original' or 'working', got {resolution!r}"))
    from cmad.cache import default_cache_dir
    from cmad.data import open_dataset
    from cmad.evaluate import check_maps_dir, decision_rates, evaluate_predictions, export_maps
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
        preds = det.predict(test, progress=not quiet)
        gts = [s.gt for s in test]
        rates = decision_rates(det.decision, preds, gts)
        areas = None
        if resolution == "working":
            prepared = det.prepare(test)
            gts = [p.gt for p in prepared]
            areas = [p.geometry.image_mask(*p.gt.shape) for p in prepared]
        ev = evaluate_predictions(category, preds, gts, resolution=resolution, areas=areas)
        if maps is not None:
            export_maps(maps, category, preds)
    except (CmadError, OSError) as exc:
        _fail(exc)
    if as_json:
        _print_json({**ev.to_dict(), "decision": rates})
    else:
        typer.echo(f"{category}: {ev.n_test} test samples, maps at {resolution} resolution")
        for k, v in ev.metrics.items():
            typer.echo(f"  {k:>10}: {v:.4f}")
        typer.echo(f"  stored threshold {rates['threshold']:.3f}: {rates['fpr']:.0%} of "
                   f"{rates['n_good']} good parts flagged, {rates['fnr']:.0%} of "
                   f"{rates['n_defective']} defective parts missed")


def _decision(det, threshold: float | None, fpr: float | None, pixel_fpr: float | None):
    """The model's stored decision with the command line's overrides."""
    if threshold is not None and fpr is not None:
        raise CmadError("--threshold and --fpr: give one of them, not both")
    d = det.decision
    if pixel_fpr is not None:
        d = d.with_pixel_fpr(pixel_fpr)
    if fpr is not None:
        d = d.with_fpr(fpr)
    if threshold is not None:
        d = d.with_threshold(threshold)
    return d


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", help="model folder written by `cmad fit`, or "
                               "an exported .onnx file for the onnx runtime"),
    out: Path = typer.Option(..., "--out", help="folder for maps/, masks/, overlays/ and scores.json"),
    rgb: Path | None = typer.Option(None, "--rgb", show_default="none",
                                    help="one RGB image (PNG)"),
    xyz: Path | None = typer.Option(None, "--xyz", show_default="none",
                                    help="its organized point cloud (H x W x 3 float32 TIFF)"),
    input_dir: Path | None = typer.Option(
        None, "--input", show_default="none",
        help="a folder with rgb/ and xyz/ subfolders (dataset layout), instead of --rgb/--xyz"),
    executor: str = typer.Option("local", "--executor", help="local | ray (the [ray] extra)"),
    address: str | None = typer.Option(
        None, "--address", show_default="a private local Ray instance",
        help="Ray cluster to join (auto or HOST:PORT)"),
    workers: int | None = typer.Option(None, "--workers", show_default="cluster CPUs / threads",
                                       help="Ray actors"),
    threshold: float | None = typer.Option(
        None, "--threshold", show_default="the model's stored threshold",
        help="image-score threshold: a score above it is anomalous"),
    fpr: float | None = typer.Option(
        None, "--fpr", show_default="the model's, 0.01",
        help="target false-positive rate, e.g. 0.05 = 5% of normal parts flagged; the "
             "threshold comes from the model's stored normal-score distribution"),
    pixel_fpr: float | None = typer.Option(
        None, "--pixel-fpr", show_default="the model's, 0.005",
        help="target rate of normal pixels inside the predicted defect masks"),
    runtime: str = typer.Option("torch", "--runtime", help="torch | onnx (the whole model in "
                                "ONNX Runtime; a model folder is exported into the cache)"),
    cache: Path | None = typer.Option(
        None, "--cache", show_default=f"none for the inputs; the export's: {CACHE_DEFAULT}",
        help="folder for derived arrays of these inputs (preprocessed clouds; none by default, "
             "as each input is read once) and, with --runtime onnx and a model folder, its "
             "ONNX export"),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """Score new samples; write anomaly maps (TIFF), defect masks and overlays (PNG) and
    scores.json (score, verdict, threshold, defect area per sample)."""
    _setup(quiet, threads)
    if input_dir is not None and (rgb is not None or xyz is not None):
        _fail(CmadError("--input: give either --input FOLDER or --rgb/--xyz files, not both"))
    if input_dir is None and rgb is None and xyz is None:
        _fail(CmadError("--input: give --input FOLDER or --rgb/--xyz files"))
    from cmad.executor import check_executor
    from cmad.export import load_predictor
    from cmad.predict_io import (
        check_output_dir,
        input_files,
        predict_distributed,
        read_sample,
        write_outputs,
    )

    try:
        check_output_dir(out)
        check_executor(executor, address)
        if workers is not None and workers < 1:
            raise CmadError(f"--workers must be a positive integer, got {workers}")
        if executor == "ray" and runtime != "torch":
            raise CmadError("--executor ray runs the torch runtime only; drop --runtime onnx")
        det = load_predictor(model, runtime, cache_dir=cache)
        decision = _decision(det, threshold, fpr, pixel_fpr)
        files = input_files(rgb=rgb, xyz=xyz, input_dir=input_dir, modalities=det.modalities)
        if executor == "ray":
            samples, preds = predict_distributed(model, files, det.config.batch_size, threads=threads,
                                                 address=address, workers=workers)
            pairs = zip(samples, preds)
        else:
            # read, preprocessed and scored on worker threads, written as they come
            pairs = det.iter_predict(files, load=lambda f: read_sample(*f), progress=not quiet)
        path, rows = write_outputs(out, pairs, decision)
    except (CmadError, OSError) as exc:
        _fail(exc)
    for r in rows:
        flag = "ANOMALOUS" if r["anomalous"] else "normal"
        area = r["defect_area_px"]
        typer.echo(f"{r['stem']}: score {r['score']:.3f} ({flag}, threshold {r['threshold']:.3f}"
                   + (f", defect area {area} px" if area else "") + ")")
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Path = _model_opt(),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default)"),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port)"),
    max_request_mb: float = typer.Option(64.0, "--max-request-mb", help="larger uploads get 413"),
    concurrency: int = typer.Option(
        1, "--concurrency", help="inferences at once on the shared model (1: one at a time)"),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """HTTP service: POST /predict (multipart rgb PNG + xyz TIFF), GET /health, GET /model."""
    _setup(quiet, threads)
    if not 0 <= port <= 65535:
        _fail(CmadError(f"--port must be 0-65535, got {port}"))
    if not max_request_mb > 0:
        _fail(CmadError(f"--max-request-mb must be positive, got {max_request_mb}"))
    from cmad.serve import ModelService, Server

    try:
        svc = ModelService(model, concurrency=concurrency)
        server = Server(svc, host=host, port=port, max_request_mb=max_request_mb)
    except (CmadError, OSError) as exc:
        _fail(exc)
    info = svc.info
    typer.echo(f"serving {info['category']} model {model} (threshold {info['threshold']:.3f}, "
               f"branches {', '.join(info['branches'])}) on {server.url}", err=False)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def calibrate(
    model: Path = _model_opt(),
    data: Path = typer.Option(
        ..., "--data", help="normal parts the model was not trained on: a folder with rgb/ "
        "and xyz/ subfolders (every sample taken as normal), or a dataset root, whose "
        "validation/good samples are used"),
    category: str | None = typer.Option(
        None, "--category", show_default="the dataset's only category",
        help="the category of a dataset root"),
    fpr: float | None = typer.Option(
        None, "--fpr", show_default="the model's, e.g. 0.01",
        help="target false-positive rate, in (0, 0.5]"),
    pixel_fpr: float | None = typer.Option(
        None, "--pixel-fpr", show_default="the model's",
        help="target rate of normal pixels in the predicted masks, in (0, 0.5]"),
    out: Path | None = typer.Option(
        None, "--out", show_default="replace --model",
        help="write the re-calibrated model here"),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """Re-pick the image and pixel thresholds on your own normal parts, without refitting."""
    _setup(quiet, threads)
    from cmad.model.decision import PIXELS, check_rate
    from cmad.pipeline import Detector, check_model_dir

    try:
        # the rates first: nothing is scored for a value that will be refused
        if fpr is not None:
            check_rate(fpr, "--fpr")
        if pixel_fpr is not None:
            check_rate(pixel_fpr, "--pixel-fpr", PIXELS)
        det = Detector.load(model)
        if out is not None:
            check_model_dir(out)
        normals = _normal_parts(data, category, det.modalities)
        other = sorted({s.category for s in normals} - {"input", "", det.category})
        if det.category and other:
            log.warning("%s: the model was fitted on category %r, not on %s; a threshold "
                        "picked on another category's parts will not fit this model", model,
                        det.category, ", ".join(repr(c) for c in other))
        old = det.decision
        new = det.calibrate(normals, fpr=fpr, pixel_fpr=pixel_fpr, progress=not quiet,
                            source=f"calibrate: {data}")
        path = det.save(out if out is not None else model)
    except (CmadError, OSError) as exc:
        _fail(exc)
    typer.echo(f"calibrated on {new.n_normals} normal parts (highest score {new.normal_max:.3f}): "
               f"threshold {old.threshold:.3f} -> {new.threshold:.3f} for a "
               f"{100 * new.target_fpr:.3g}% false-positive rate; pixel threshold "
               f"{old.pixel_threshold:.3f} -> {new.pixel_threshold:.3f} -> {path}")


def _normal_parts(data: Path, category: str | None, modalities: list[str]) -> list:
    """Normal samples for `calibrate`: a predict-style folder, or a dataset's validation/good."""
    from cmad.data import open_dataset
    from cmad.errors import DataError
    from cmad.predict_io import collect_inputs

    if (data / "rgb").is_dir() or (data / "xyz").is_dir():
        return collect_inputs(rgb=None, xyz=None, input_dir=data, modalities=modalities)
    if not data.is_dir():
        raise DataError(data, "not a folder")
    ds = open_dataset(data)
    cats = ds.categories
    if category is None:
        if len(cats) != 1:
            raise CmadError(f"--category: {data} holds {len(cats)} categories ({', '.join(cats)}); "
                            "name one")
        category = cats[0]
    samples = [s for s in ds.category(category).samples("validation") if s.label == 0]
    if not samples:
        raise DataError(data / category / "validation", "no normal validation samples")
    return samples


@app.command()
def export(
    model: Path = _model_opt(),
    out: Path = typer.Option(..., "--out", help="the .onnx file to write"),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
) -> None:
    """Export the whole model (CNN, features, branches, fusion) to one ONNX file."""
    _setup(quiet, threads)
    from cmad.export import export_onnx, read_metadata
    from cmad.pipeline import Detector

    try:
        det = Detector.load(model)
        path = export_onnx(det, out)
        meta = read_metadata(path)
    except (CmadError, OSError) as exc:
        _fail(exc)
    names = ", ".join(i["name"] for i in json.loads(meta["inputs"]))
    typer.echo(f"exported {model} ({', '.join(det.branches)}) to {path}: "
               f"{path.stat().st_size / 1e6:.2f} MB, opset {meta['onnx_opset']}; inputs {names}; "
               "outputs score, anomaly_map")


def _categories_arg(categories: str | None) -> int | list[str] | None:
    """--categories as given: a number N (the first N categories) or comma-separated names."""
    if not categories:
        return None
    cats: int | list[str] = (int(categories) if categories.strip().isdigit()
                             else [c.strip() for c in categories.split(",")])
    if cats == 0 or (isinstance(cats, list) and not all(cats)):
        raise CmadError(f"--categories: {categories!r} is not a positive number or a "
                        "comma-separated list of names")
    return cats


def _dataset_categories(data: Path, categories: str | None) -> list[str] | None:
    """--categories of a dataset: its first N (in its order), or the names given."""
    cats = _categories_arg(categories)
    if isinstance(cats, int):
        from cmad.data import open_dataset

        names = open_dataset(data).categories
        if cats > len(names):
            raise CmadError(f"--categories {cats}: {data} holds {len(names)} categories")
        return names[:cats]
    return cats


@app.command(cls=_MethodsHelpCommand)
def bench(
    data: Path = _data_opt(),
    out: Path = typer.Option(..., "--out", help="report folder to create (a new one per run)"),
    categories: str | None = typer.Option(None, "--categories", show_default="all",
                                          help="a number N (the first N categories) or "
                                               "comma-separated names"),
    methods: str | None = typer.Option(None, "--methods", show_default="all but btf-full",
                                       help=METHODS_HELP),
    shots: str | None = typer.Option(None, "--shots", show_default="none",
                                     help="also fit on K training samples, e.g. 5,10,50 "
                                          "(few-shot table)"),
    config: Path | None = typer.Option(
        None, "--config", show_default="built-in defaults",
        help="YAML or JSON file setting DetectorConfig fields: the base of every method (each "
             "method then sets its own fields; --size, --seed and --precision, when given, "
             "apply last)"),
    size: int | None = _size_opt(None),
    precision: str | None = _precision_opt(),
    cache: Path | None = _cache_opt(),
    seed: int | None = typer.Option(None, "--seed", show_default="the config's seed, 0",
                                    help="random seed: same seed and data, same results"),
    executor: str = typer.Option("local", "--executor", help="local | ray (the [ray] extra)"),
    address: str | None = typer.Option(
        None, "--address", show_default="a private local Ray instance",
        help="Ray cluster to join (auto or HOST:PORT)"),
    onnx: bool = typer.Option(False, "--onnx", help="also export each method to ONNX and time "
                              "it beside torch on the same samples (the Runtimes table)"),
    stream: bool = typer.Option(False, "--stream", help="also time each method end to end on "
                                "the test files as predict streams them: read, preprocess, "
                                "features, scores, maps at original size, batches "
                                "overlapping (the Throughput table)"),
    scale: str | None = typer.Option(
        None, "--scale", show_default="none",
        help="a cost curve instead of the comparison: training-set sizes, e.g. "
             "25,50,100,200,400, on one category (the first of --categories); methods default "
             "to cmad,btf"),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
    old_resolution: int | None = typer.Option(None, "--resolution", hidden=True,
                                              help="deprecated name of --size"),
) -> None:
    """Fit and evaluate cmad, its branches and baselines on the same features; report."""
    _setup(quiet, threads)
    if old_resolution is not None:
        _deprecated("bench --resolution", "--size")
        size = old_resolution
    if seed is not None:
        _positive("--seed", seed, 0)
    if size is not None:
        _size("--size", size)
    from cmad.bench import run_bench

    try:
        base = (_load_config(config, _precision(precision))
                if config is not None or precision is not None else None)
    except CmadError as exc:
        _fail(exc)
    # the config file's size and seed unless the flags are given
    if size is None:
        size = base.size if base is not None else DEFAULT_SIZE
    if seed is None:
        seed = base.seed if base is not None else 0
    if scale is not None:
        from cmad.costcurve import parse_counts, run_cost_curve, table_md

        try:
            counts = parse_counts(scale)
            from cmad.data import open_dataset

            cats = _dataset_categories(data, categories)
            cat = cats[0] if cats else open_dataset(data).categories[0]
            res = run_cost_curve(
                data, out, cat,
                [m.strip() for m in methods.split(",")] if methods else ["cmad", "btf"],
                counts, size=size, seed=seed, threads=threads, progress=not quiet,
                base=base)
        except (CmadError, OSError) as exc:
            _fail(exc)
        typer.echo(table_md(res))
        return

    try:
        shot_list = [int(x) for x in shots.split(",")] if shots else None
    except ValueError:
        _fail(CmadError(f"--shots: {shots!r} is not a comma-separated list of integers"))
    if shot_list is not None and min(shot_list) < 1:
        _fail(CmadError(f"--shots: {shots!r}: every shot count must be an integer >= 1"))
    try:
        res = run_bench(
            data, out, categories=_dataset_categories(data, categories),
            methods=[m.strip() for m in methods.split(",")] if methods else None,
            shots=shot_list,
            size=size, cache_dir=cache, seed=seed, threads=threads, progress=not quiet,
            executor=executor, address=address, onnx=onnx, stream=stream, base=base,
        )
    except (CmadError, OSError) as exc:
        _fail(exc)
    typer.echo(res.summary)


@app.command(cls=_MethodsHelpCommand)
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out",
                             help="folder for data-<preset>-seed<N>/, cache/, the report-<time>/ "
                                  "folders and report, a link to the latest"),
    preset: str = _preset_opt(DEMO_PRESET, "tiny | small | demo | default | mvtec"),
    categories: str | None = typer.Option(None, "--categories", show_default="the preset's count",
                                          help="a number N (the first N categories) or "
                                               "comma-separated names"),
    methods: str | None = typer.Option(None, "--methods", show_default="{demo_methods}",
                                       help=METHODS_HELP),
    seed: int = typer.Option(0, "--seed", help="random seed of the data and the models"),
    threads: int = _threads_opt(),
    quiet: bool = _quiet_opt(),
    old_size: str | None = typer.Option(None, "--size", hidden=True,
                                        help="deprecated name of --preset"),
) -> None:
    """Synthetic data -> fit -> evaluate every category -> table and report folder."""
    t0 = time.perf_counter()
    load0 = _loadavg()
    _setup(quiet, threads)
    if old_size is not None:
        _deprecated("demo --size", "--preset")
        preset = old_size
    _positive("--seed", seed, 0)
    from cmad.bench import run_demo

    try:
        cats = _categories_arg(categories)
        res = run_demo(out, size=preset, seed=seed, threads=threads, categories=cats,
                       methods=[m.strip() for m in methods.split(",")] if methods else None,
                       progress=not quiet)
    except (CmadError, OSError) as exc:
        _fail(exc)
    typer.echo(res.summary)
    took = time.perf_counter() - t0
    typer.echo(f"demo took {int(took // 60)}:{took % 60:04.1f} (min:s) on {os.cpu_count()} CPUs, "
               f"{threads} threads; load average {_fmt_load(load0)} at the start, "
               f"{_fmt_load(_loadavg())} at the end")


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def _fmt_load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)


def main() -> None:
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        # not standalone: a bad option value is one `error:` line, as every other error
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory (a smaller --size, fewer samples or fewer "
                   "--threads need less)", err=True)
        sys.exit(1)
    except Exception as exc:
        # click's exceptions (typer's own copy of click, or click itself): by their shape
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `cmad` alone: the help
            typer.echo(exc.format_message())
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
