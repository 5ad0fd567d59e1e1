"""Whole-model ONNX export (`cmad export`) and the ONNX Runtime detector (`--runtime onnx`).

`export_onnx(det, "model.onnx")` writes one ONNX graph from the prepared inputs to the image
score and the anomaly map at working resolution: the CNN, the colour statistics and
geometric context, the geometry rendering, every branch with its bank or network as
constants, the normalisation, the weighted fusion, the bilinear upsampling, the Gaussian
blur (a convolution over edge-replicated padding) and the image score over the image area.
Each stage is its own module's export: `cmad.features.graph.FeatureGraph`,
`Branch.export_module()` (a branch that defines none cannot be exported, and says so),
`DetectorCore.export_module()`.

The split: FPFH (numba, a metric-radius neighbour search) and preprocessing (background
plane by RANSAC, padding, resizing) stay in Python. `OnnxDetector` is that front end: the
same `Preprocessor` and `FPFHExtractor` as the torch path, then one ONNX Runtime call per
batch, then the same resize of the map to the original image size.

Graph inputs (B the batch, S the working size, (h, w) = (S/8, S/8) the patch grid; only
those the model's features need are present):

    rgb         uint8   (B, S, S, 3)   RGB at working resolution (Prepared.rgb)
    xyz         float32 (B, S, S, 3)   prepared cloud in metres, zero off the foreground
    foreground  bool    (B, S, S)      points off the background plane (Prepared.foreground)
    image_box   int64   (B, 4)         orig_h, orig_w, pad_top, pad_left (Prepared.geometry)
    fpfh        float32 (B, h, w, 33)  FPFH pooled per patch (FPFHExtractor.extract)
    fpfh_valid  bool    (B, h, w)      patches with FPFH

Outputs: `score` float32 (B,) and `anomaly_map` float32 (B, S, S).

The file's metadata (`onnx.ModelProto.metadata_props`) holds the opset, cmad's version, the
model's identity (the sha256 of its tensor file as `Detector.save` writes it, and of its
config), its config, category, threshold and feature identities, and the inputs and
outputs described; the front end reads its settings from there, so an exported file runs
without the model folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn

from cmad import __version__
from cmad.data.io import write_bytes_atomic
from cmad.data.preprocess import CODE_VERSION as PREP_VERSION
from cmad.data.preprocess import Preprocessor, to_original
from cmad.errors import CmadError, ConfigError, DataError, ModelFormatError, OutputError
from cmad.features.graph import FeatureGraph
from cmad.features.rgb import ONNX_OPSET, onnx_session
from cmad.model.config import DetectorConfig
from cmad.model.decision import Decision
from cmad.pipeline import (
    Detector,
    check_finite,
    check_inputs,
    predict_in_batches,
    stream_batches,
)
from cmad.runtime import thread_limit
from cmad.types import Prediction, Prepared, Sample

log = logging.getLogger(__name__)

FORMAT = "cmad-onnx/1"
RUNTIMES = ("torch", "onnx")

# name -> (dtype, shape, description)
INPUTS: dict[str, tuple[str, str, str]] = {
    "rgb": ("uint8", "(B, S, S, 3)", "RGB image at the working resolution S (Prepared.rgb)"),
    "xyz": ("float32", "(B, S, S, 3)",
            "prepared organized point cloud in metres, zero off the foreground (Prepared.xyz)"),
    "foreground": ("bool", "(B, S, S)",
                   "points off the background plane, inside the image (Prepared.foreground)"),
    "image_box": ("int64", "(B, 4)",
                  "orig_h, orig_w, pad_top, pad_left: where the original image lies in the "
                  "padded square (Prepared.geometry)"),
    "fpfh": ("float32", "(B, h, w, 33)",
             "FPFH pooled per patch, computed outside the graph by FPFHExtractor.extract "
             "(numba), channels last"),
    "fpfh_valid": ("bool", "(B, h, w)", "patches with FPFH (FPFHExtractor.extract)"),
}
OUTPUTS: dict[str, tuple[str, str, str]] = {
    "score": ("float32", "(B,)", "image anomaly score (higher = more anomalous); anomalous "
              "when above the model's threshold"),
    "anomaly_map": ("float32", "(B, S, S)", "fused anomaly map at the working resolution; "
                    "the padding holds each map's floor"),
}


def input_names(needs: Sequence[str]) -> list[str]:
    """The graph inputs a model with these feature needs takes, in order."""
    need = set(needs)
    names = []
    if need & {"rgb", "colour"}:
        names.append("rgb")
    if need & {"geom", "context"}:
        names.append("xyz")
    names += ["foreground", "image_box"]
    if "xyz" in need:
        names += ["fpfh", "fpfh_valid"]
    return names


class ModelGraph(nn.Module):
    """The detector from its graph inputs (see the module docstring) to (score, anomaly_map)."""

    def __init__(self, det: Detector) -> None:
        super().__init__()
        needs = det.core.needs
        ext = det.extractor_for(det.modalities)
        self.features = FeatureGraph(ext, needs)
        self.core = det.core.export_module()
        self.inputs = input_names(needs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dict(zip(self.inputs, args))
        fm, area = self.features(x.get("rgb"), x.get("xyz"), x["foreground"], x["image_box"],
                                 x.get("fpfh"), x.get("fpfh_valid"))
        return self.core(fm, area)


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def model_identity(det: Detector) -> dict[str, Any]:
    """What identifies the exported model: the sha256 of its tensor file as `Detector.save`
    writes it and of its config, and the feature identities it was fitted with."""
    cfg = det.config.to_dict()
    return {
        "tensors_sha256": _sha256(st_save(det.core.tensors())),
        "config_sha256": _sha256(json.dumps(cfg, sort_keys=True).encode()),
        "extractor": det.extractor_for(det.modalities).identity(det.core.needs),
    }


def _metadata(det: Detector, names: Sequence[str]) -> dict[str, str]:
    ident = model_identity(det)
    core = det.core.meta()
    return {
        "format": FORMAT,
        "cmad_version": __version__,
        "onnx_opset": str(ONNX_OPSET),
        "torch_version": torch.__version__,
        "tensors_sha256": ident["tensors_sha256"],
        "config_sha256": ident["config_sha256"],
        "config": json.dumps(det.config.to_dict(), sort_keys=True),
        "extractor": json.dumps(ident["extractor"], sort_keys=True),
        "category": det.category,
        # the training clouds' scale: predict refuses clouds in another unit (absent: no 3D)
        "xyz_scale": json.dumps(None if det.xyz_scale is None else list(det.xyz_scale)),
        "threshold": repr(float(det.threshold)),
        "decision": json.dumps(det.decision.to_dict()),
        "modalities": json.dumps(list(det.modalities)),
        "branches": json.dumps(list(det.branches)),
        "weights": json.dumps(core["weights"]),
        "norm": json.dumps(core["norm"]),
        "size": str(det.config.size),
        "inputs": json.dumps([{"name": n, "dtype": INPUTS[n][0], "shape": INPUTS[n][1],
                               "description": INPUTS[n][2]} for n in names]),
        "outputs": json.dumps([{"name": n, "dtype": d, "shape": s, "description": t}
                               for n, (d, s, t) in OUTPUTS.items()]),
        "front_end": ("preprocessing (cmad.data.preprocess.Preprocessor) and, when the model "
                      "uses FPFH, FPFHExtractor.extract run in Python before the graph; "
                      "cmad.export.OnnxDetector does both"),
    }


def _example(det: Detector, names: Sequence[str], batch: int = 2) -> tuple[torch.Tensor, ...]:
    s = det.config.size
    h, w = det.extractor_for(det.modalities).grid
    gen = torch.Generator().manual_seed(0)
    out = {
        "rgb": torch.randint(0, 256, (batch, s, s, 3), generator=gen).to(torch.uint8),
        "xyz": torch.rand((batch, s, s, 3), generator=gen) * 0.01 + torch.tensor([0, 0, 0.3]),
        "foreground": torch.ones((batch, s, s), dtype=torch.bool),
        "image_box": torch.tensor([[s, s, 0, 0]] * batch, dtype=torch.int64),
        "fpfh": torch.rand((batch, h, w, 33), generator=gen),
        "fpfh_valid": torch.ones((batch, h, w), dtype=torch.bool),
    }
    return tuple(out[n] for n in names)


def export_bytes(det: Detector) -> bytes:
    """The serialised ONNX model of a fitted or loaded detector (see the module docstring)."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'cmad[onnx]'") from None
    if not det.core.branches:
        raise ConfigError("the detector has not been fitted or loaded")
    det.config.rgb.require_float32("this model's CNN features")
    graph = ModelGraph(det).eval()
    names = graph.inputs
    dynamic = {n: {0: "batch"} for n in (*names, *OUTPUTS)}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, _example(det, names), buf, input_names=list(names),
                              output_names=list(OUTPUTS), dynamic_axes=dynamic,
                              opset_version=ONNX_OPSET, dynamo=False,
                              # folding would store the banks decoded (8x an int4 bank)
                              do_constant_folding=False)
    except CmadError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types
        raise ConfigError(f"ONNX export of the model failed: {type(exc).__name__}: {exc}") from exc
    model = onnx.load_from_string(buf.getvalue())
    # the exporter drops inputs the graph does not use (foreground for an RGB-bank model)
    names = [vi.name for vi in model.graph.input]
    for vi in model.graph.input:
        vi.doc_string = "{} {}: {}".format(*INPUTS[vi.name])
    for vi in model.graph.output:
        vi.doc_string = "{} {}: {}".format(*OUTPUTS[vi.name])
    model.doc_string = (f"cmad {__version__} anomaly detector ({det.category or 'no category'}; "
                        f"branches {', '.join(det.branches)}): prepared inputs -> image score "
                        "and anomaly map at working resolution")
    model.producer_name = "cmad"
    model.producer_version = __version__
    onnx.helper.set_model_props(model, _metadata(det, names))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_onnx(det: Detector, out: str | Path) -> Path:
    """Write the ONNX model of `det` to `out` atomically (whole or absent)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the path of the .onnx file to write")
    if out.exists():
        # only an earlier export is replaced: never a file of the user's
        try:
            read_metadata(out)
        except ModelFormatError:
            raise OutputError(out, "exists and is not a cmad ONNX export; not overwritten "
                                   "(remove it or choose another --out)") from None
    blob = export_bytes(det)
    write_bytes_atomic(out, blob)
    log.info("exported %s (%.2f MB)", out, len(blob) / 1e6)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The cmad metadata of an exported file (ModelFormatError if it is not one)."""
    import onnx

    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
        raise ModelFormatError(p, f"not a readable ONNX file: {exc}") from None
    meta = {m.key: m.value for m in model.metadata_props}
    if meta.get("format") != FORMAT:
        raise ModelFormatError(p, f"not a cmad ONNX export (format {meta.get('format')!r}, "
                                  f"expected {FORMAT!r})")
    return meta


# what the exported graph computes and carries: a new value makes cached exports stale
# (2: the bank searched in blocks, the training clouds' scale in the metadata)
GRAPH_VERSION = 2


def cached_export(model_dir: str | Path, cache_dir: Path | None = None) -> Path:
    """The ONNX export of a model folder, made once into `cache_dir/onnx-model/` (keyed by
    the model's tensor and config hashes, cmad's and torch's versions, the opset and
    `GRAPH_VERSION`)."""
    from cmad.cache import default_cache_dir
    from cmad.pipeline import CONFIG_NAME

    d = Path(model_dir)
    cfg_path = d / CONFIG_NAME
    try:
        meta = json.loads(cfg_path.read_text())
        ident = [meta["tensors_sha256"], meta["config"], meta["format_version"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        Detector.load(d)  # raises the error that names what is wrong
        raise ModelFormatError(cfg_path, "unreadable model config") from None
    key = _sha256(json.dumps([ident, __version__, torch.__version__, ONNX_OPSET, GRAPH_VERSION],
                             sort_keys=True).encode())[:24]
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "onnx-model" / \
        f"{key}.onnx"
    if not path.is_file():
        export_onnx(Detector.load(d), path)
        return path
    try:
        blob = (d / str(meta.get("tensors"))).read_bytes()
    except OSError:
        blob = b""
    if _sha256(blob) != meta["tensors_sha256"]:
        Detector.load(d)  # names what is wrong with the folder
        raise ModelFormatError(d, "tensor file does not match config.json")
    return path


class OnnxDetector:
    """An exported model in ONNX Runtime with the Python front end (preprocessing, FPFH).

    `OnnxDetector.open("model.onnx")`, or `OnnxDetector.open(model_dir)` for a model folder
    (exported into the cache on first use). `predict(samples)` gives the same `Prediction`s
    as `Detector.predict` (score, maps at original and working size; no branch maps).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError("--runtime onnx needs onnxruntime: pip install 'cmad[onnx]'") from None
        self.path = Path(path)
        meta = read_metadata(self.path)
        self.meta = meta
        try:
            self.config = DetectorConfig.from_saved(json.loads(meta["config"]),
                                                   where=f"{self.path} metadata config")
            self.threshold = float(meta["threshold"])
            self.decision = (Decision.from_dict(json.loads(meta["decision"])) if "decision" in meta
                             else Decision.legacy(self.threshold))
            self.category = meta.get("category", "")
            scale = json.loads(meta.get("xyz_scale", "null"))
            self.xyz_scale = None if scale is None else (float(scale[0]), float(scale[1]))
            self.modalities = [str(m) for m in json.loads(meta["modalities"])]
            self.branches = tuple(json.loads(meta["branches"]))
            extractor = json.loads(meta["extractor"])
            self.inputs = [i["name"] for i in json.loads(meta["inputs"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(self.path, f"missing or bad cmad metadata: {exc}") from None
        if extractor.get("preprocess") != PREP_VERSION:
            raise ModelFormatError(self.path, f"exported with preprocessing version "
                                   f"{extractor.get('preprocess')!r}; this cmad has {PREP_VERSION!r}")
        self.preprocessor = Preprocessor(self.config.preprocess)
        self.fpfh = None
        if {"fpfh", "fpfh_valid"} & set(self.inputs):
            from dataclasses import replace

            from cmad.features.xyz import FPFHExtractor

            grid = tuple(extractor["grid"])
            self.fpfh = FPFHExtractor(replace(self.config.xyz, grid=grid))
            mine = self.fpfh.identity()
            if json.dumps(mine, sort_keys=True) != json.dumps(extractor["features"]["xyz"],
                                                              sort_keys=True):
                raise ModelFormatError(self.path, "exported with another FPFH code version or "
                                       f"settings ({extractor['features']['xyz']}) than this "
                                       f"installation provides ({mine})")
        try:
            self.session = onnx_session(self.path, threads if threads is not None
                                        else thread_limit())
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors derive from Exception
            raise ModelFormatError(self.path, f"ONNX Runtime cannot load it: {exc}") from None

    @classmethod
    def open(cls, model: str | Path, cache_dir: Path | None = None,
             threads: int | None = None) -> OnnxDetector:
        """An exported .onnx file, or a model folder (exported into the cache first)."""
        p = Path(model)
        if p.is_dir():
            p = cached_export(p, cache_dir)
        elif not p.is_file():
            raise ModelFormatError(p, "not found: give a model folder or an exported .onnx file")
        return cls(p, threads=threads)

    # ---------------------------------------------------------------- the front end
    def prepare(self, samples: Sequence[Sample]) -> list[Prepared]:
        return self.preprocessor.prepare_many(samples, progress=False)

    def graph_inputs(self, prepared: Sequence[Prepared]) -> tuple[dict[str, np.ndarray], float]:
        """The named graph inputs of a batch, and the ms per sample spent on FPFH."""
        x: dict[str, np.ndarray] = {}
        fpfh_ms = 0.0
        for name in self.inputs:
            if name == "rgb":
                x[name] = np.stack([p.rgb for p in prepared])
            elif name == "xyz":
                x[name] = np.stack([p.xyz for p in prepared]).astype(np.float32)
            elif name == "foreground":
                x[name] = np.stack([p.foreground for p in prepared]).astype(bool)
            elif name == "image_box":
                x[name] = np.array([[p.geometry.orig_h, p.geometry.orig_w, p.geometry.pad_top,
                                     p.geometry.pad_left] for p in prepared], dtype=np.int64)
            elif name in ("fpfh", "fpfh_valid"):
                if "fpfh" in x or "fpfh_valid" in x:
                    continue
                t = time.perf_counter()
                fs, vs = zip(*(self.fpfh.extract(p.xyz, p.foreground) for p in prepared))
                x["fpfh"] = np.ascontiguousarray(np.stack(fs).transpose(0, 2, 3, 1),
                                                 dtype=np.float32)
                x["fpfh_valid"] = np.stack(vs).astype(bool)
                x = {k: v for k, v in x.items() if k in self.inputs}
                fpfh_ms = (time.perf_counter() - t) * 1000.0 / len(prepared)
        return x, fpfh_ms

    def run(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(scores (B,), maps (B, S, S)) of prepared samples, and ms per sample by stage."""
        for p in prepared:
            for m in self.modalities:
                if getattr(p, m) is None:
                    raise DataError(p.paths.rgb or p.paths.xyz,
                                    f"the model needs {m} data; this sample has none")
        x, fpfh_ms = self.graph_inputs(prepared)
        t = time.perf_counter()
        try:
            scores, maps = self.session.run(list(OUTPUTS), x)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors derive from Exception
            raise ModelFormatError(self.path, f"ONNX Runtime failed on this batch: {exc}") from None
        ms = {"onnx_graph": (time.perf_counter() - t) * 1000.0 / len(prepared)}
        if self.fpfh is not None:
            ms["xyz_features"] = fpfh_ms
        return scores, maps, ms

    def _step(self, prep: list[Prepared]) -> tuple[list[Prediction], dict[str, float]]:
        scores, maps, t_run = self.run(prep)
        for i, p in enumerate(prep):
            check_finite(p, float(scores[i]), maps[i])
        return [Prediction(
            score=float(scores[i]), anomaly_map=to_original(maps[i], p.geometry),
            anomaly_map_work=np.ascontiguousarray(maps[i], dtype=np.float32),
            key=p.key, label=p.label, defect_type=p.defect_type)
            for i, p in enumerate(prep)], t_run

    def _checked_prepare(self, samples: Sequence[Sample]) -> list[Prepared]:
        check_inputs(samples, self.modalities, self.xyz_scale)
        return self.prepare(samples)

    def predict_timed(self, samples: Sequence[Sample], progress: bool = False
                      ) -> tuple[list[Prediction], dict[str, float]]:
        """Predictions as `Detector.predict_timed` gives them (no branch maps) and the ms
        per sample of preprocessing, FPFH and the ONNX graph."""
        check_inputs(samples, self.modalities, self.xyz_scale)
        return predict_in_batches(samples, self.config.batch_size, self.prepare, self._step,
                                  "predict (onnx)", progress)

    def iter_predict(self, items: Sequence[Any], load: Callable[[Any], Sample] | None = None,
                     progress: bool = False) -> Iterator[tuple[Sample, Prediction]]:
        """As `Detector.iter_predict`: (sample, prediction) pairs, batches read,
        preprocessed and run side by side on worker threads (`stream_batches`)."""
        for samples, preds, _ in stream_batches(items, self.config.batch_size,
                                                self._checked_prepare, self._step,
                                                "predict (onnx)", progress, load):
            yield from zip(samples, preds)

    def predict(self, samples: Sequence[Sample], progress: bool = False) -> list[Prediction]:
        return self.predict_timed(samples, progress)[0]


def load_predictor(model: str | Path, runtime: str = "torch", cache_dir: Path | None = None
                   ) -> Detector | OnnxDetector:
    """A model folder in torch, or a model folder / exported file in ONNX Runtime."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnx":
        return OnnxDetector.open(model, cache_dir=cache_dir)
    if Path(model).is_file() and Path(model).suffix == ".onnx":
        raise ConfigError(f"{model}: an exported ONNX file runs with --runtime onnx")
    return Detector.load(model, cache_dir=cache_dir)


__all__ = ["INPUTS", "ONNX_OPSET", "OUTPUTS", "ModelGraph", "OnnxDetector", "cached_export",
           "export_bytes", "export_onnx", "input_names", "load_predictor", "model_identity",
           "read_metadata"]
