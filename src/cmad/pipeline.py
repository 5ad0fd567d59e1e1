"""The public pipeline: samples -> prepared -> features -> detector core -> predictions.

`Detector` is what the CLI, the bench and the Python API all use:

>>> det = Detector(DetectorConfig()).fit(open_dataset(root).category("bagel"))
>>> preds = det.predict(samples)
>>> det.save("model/"); det = Detector.load("model/")

A model folder holds `config.json` and one tensor file named by its content hash. The
config is written last and names the tensor file and its hash, so a save that is killed
part-way leaves the previous model loadable, and a folder whose files do not belong
together is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cmad import __version__
from cmad.data.io import write_bytes_atomic
from cmad.data.preprocess import Preprocessor, to_original
from cmad.data.splits import select_shots, split_items
from cmad.errors import ConfigError, DataError, ModelFormatError, OutputError
from cmad.features import FeatureExtractor, FeatureMaps
from cmad.metrics import aupro_inside
from cmad.model.calibrate import calibration_set
from cmad.model.config import DetectorConfig
from cmad.model.core import DetectorCore, FitReport, feature_needs
from cmad.model.decision import Decision
from cmad.progress import progress as progress_bar
from cmad.runtime import pause_point
from cmad.stages import staged
from cmad.types import Prediction, Prepared, Sample

log = logging.getLogger(__name__)
R = TypeVar("R")

FORMAT_VERSION = 4
# format 3 (no stored decision: the threshold was the highest validation normal score) still
# loads; saving it again writes format 4
READ_VERSIONS = (3, 4)
CONFIG_NAME = "config.json"
# The fields of config.json beside those of `DetectorCore.meta()`.
BASE_META = ("format_version", "cmad_version", "tensors", "tensors_sha256", "config",
             "extractor", "category", "xyz_scale")


def modalities_of_sample(s: Sample) -> list[str]:
    return [m for m, a in (("rgb", s.rgb), ("xyz", s.xyz)) if a is not None]


def cloud_scale(s: Sample) -> float | None:
    """Median distance from the origin of a sample's valid points (its depth unit's scale),
    or None for a sample without a point cloud."""
    if s.xyz is None or not s.valid.any():
        return None
    return float(np.median(np.linalg.norm(s.xyz[s.valid].astype(np.float64), axis=1)))


# A test cloud whose scale lies outside [lo / UNIT_FACTOR, hi * UNIT_FACTOR] of the training
# clouds' scales is refused (another unit, e.g. millimetres instead of metres).
UNIT_FACTOR = 4.0


def pixel_area(prepared: Sequence[Prepared]) -> np.ndarray:
    """(B, S, S) working-resolution pixels inside each original image (not padding)."""
    return np.stack([p.geometry.image_mask(p.geometry.size, p.geometry.size) for p in prepared])


def _add(into: dict[str, float], more: dict[str, float], weight: float = 1.0) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v * weight


def stream_batches(
    items: Sequence[Any], batch_size: int,
    prepare: Callable[[Sequence[Sample]], list[Prepared]],
    step: Callable[[list[Prepared]], tuple[R, dict[str, float]]],
    desc: str, progress: bool, load: Callable[[Any], Sample] | None = None,
) -> Iterator[tuple[list[Sample], R, dict[str, float]]]:
    """Batches of `items` through `load` (item -> Sample; None: the items are samples),
    `prepare` and `step` (prepared batch -> a result such as predictions or features, and
    ms per sample by stage), with one progress bar counting samples. Yields each batch's
    samples, result and ms per sample by stage ("read" and "preprocess" included).

    Two stages, reading with preprocessing and then `step`, run on worker threads
    (`cmad.stages.staged`: at most one per torch thread of the caller and one per stage;
    a task that starts beside another gets its share of the threads, one that starts alone
    takes them all). They take the oldest batch's waiting stage first, so batch k+1 is
    read, or stepped, while batch k is stepped: on 2 cores both stay busy (a real-size
    model's predictions went from 9.9-10.5 to 13.5-13.9 samples per second against reading
    ahead in one thread and stepping on one torch thread fewer, RESULTS.md round 12). The
    caller's thread keeps its threads, so its code between batches runs on all of them. No
    result depends on any of this (the same functions of the same inputs; no result
    depends on the thread count). An error of either stage (a bad file) is raised when its
    batch comes up, after the batches before it have been yielded.
    """
    import torch

    chunks = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]

    def read_and_prepare(chunk: Sequence[Any]) -> tuple[list[Sample], list[Prepared], dict[str, float]]:
        t = time.perf_counter()
        samples = list(chunk) if load is None else [load(x) for x in chunk]
        t_read = time.perf_counter()
        prep = prepare(samples)
        n = max(len(chunk), 1)
        ms = {"preprocess": (time.perf_counter() - t_read) * 1000.0 / n}
        if load is not None:
            ms["read"] = (t_read - t) * 1000.0 / n
        return samples, prep, ms

    def then_step(held: tuple[list[Sample], list[Prepared], dict[str, float]]
                  ) -> tuple[list[Sample], R, dict[str, float]]:
        samples, prep, ms = held
        result, t_step = step(prep)
        _add(ms, t_step)
        return samples, result, ms

    with progress_bar(total=len(items), desc=desc, unit="sample", enabled=progress) as bar:
        for samples, result, ms in staged(chunks, [read_and_prepare, then_step],
                                          torch.get_num_threads()):
            bar.update(len(samples))
            yield samples, result, ms


def predict_in_batches(
    samples: Sequence[Sample], batch_size: int,
    prepare: Callable[[Sequence[Sample]], list[Prepared]],
    step: Callable[[list[Prepared]], tuple[list[Prediction], dict[str, float]]],
    desc: str, progress: bool,
) -> tuple[list[Prediction], dict[str, float]]:
    """All predictions of `stream_batches` over `samples` and the ms per sample of each
    stage ("preprocess" included, overlapping the others), weighted by batch size."""
    out: list[Prediction] = []
    ms: dict[str, float] = {}
    n = max(len(samples), 1)
    for batch, preds, t in stream_batches(samples, batch_size, prepare, step, desc, progress):
        _add(ms, t, len(batch) / n)
        out.extend(preds)
    return out, ms


def check_modalities(samples: Sequence[Sample], modalities: Sequence[str]) -> None:
    """Refuse a sample without a modality the model needs."""
    for smp in samples:
        have = modalities_of_sample(smp)
        if not set(modalities) <= set(have):
            raise DataError(smp.paths.rgb or smp.paths.xyz,
                            f"the model needs {list(modalities)}; this sample has {have}")


def check_units(samples: Sequence[Sample], xyz_scale: tuple[float, float] | None,
                modalities: Sequence[str]) -> None:
    """Refuse a point cloud far off the training clouds' scale `xyz_scale` (another unit)."""
    if xyz_scale is None or "xyz" not in modalities:
        return
    lo, hi = xyz_scale
    for smp in samples:
        c = cloud_scale(smp)
        if c is None:
            continue
        if not lo / UNIT_FACTOR <= c <= hi * UNIT_FACTOR:
            raise DataError(smp.paths.xyz or smp.key,
                            f"points lie at a median distance of {c:.4g} from the origin, "
                            f"the model's training clouds at {lo:.4g} to {hi:.4g}: a "
                            "different unit (millimetres instead of metres?) or another "
                            "sensor set-up; convert the cloud to the training data's unit")


def check_inputs(samples: Sequence[Sample], modalities: Sequence[str],
                 xyz_scale: tuple[float, float] | None) -> None:
    """`check_modalities` and `check_units`: what a model refuses before any work."""
    check_modalities(samples, modalities)
    check_units(samples, xyz_scale, modalities)


def check_finite(p: Prepared, score: float, amap: np.ndarray) -> None:
    """Refuse a NaN or inf score or map (damaged input, or a model that does not fit)."""
    if not (np.isfinite(score) and np.isfinite(amap).all()):
        raise DataError(p.paths.xyz or p.paths.rgb or p.key,
                        "cannot be scored: its anomaly score or map is NaN or inf "
                        "(damaged input or a model that does not fit this data)")


def check_model_dir(out: str | Path) -> Path:
    """Refuse a model output path that is a file or a folder holding anything but a model."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: model output path is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        cfg = out / CONFIG_NAME
        ours = False
        try:
            meta = json.loads(cfg.read_text())
            ours = "format_version" in meta and "cmad_version" in meta
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours and not cfg.exists():
            # what a save killed before its config.json leaves: tensor and temporary files
            ours = all(_is_save_leftover(p) for p in out.iterdir())
        if not ours:
            raise ConfigError(f"{out}: folder is not empty and holds no cmad model; refusing to "
                              "write into it (choose a new or empty folder)")
    return out


def _is_save_leftover(p: Path) -> bool:
    return p.is_file() and (re.fullmatch(r"model-[0-9a-f]{16}\.safetensors", p.name) is not None
                            or re.fullmatch(r"\.(model-[0-9a-f]{16}\.safetensors|config\.json)"
                                            r"\.[0-9a-f]+\.tmp", p.name) is not None)


class Detector:
    """Fit on normal samples, then score new ones (see the module docstring).

    `extractor`: share one `FeatureExtractor` between detectors whose feature settings are
    the same (the bench does); it must extract at least the features this model needs.
    """

    def __init__(self, config: DetectorConfig | None = None, cache_dir: Path | None = None,
                 rgb_runtime: str = "torch", extractor: FeatureExtractor | None = None) -> None:
        self.config = config or DetectorConfig()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.rgb_runtime = rgb_runtime
        self.core = DetectorCore(self.config)
        self.category = ""
        self.report = FitReport()
        self.preprocessor = Preprocessor(self.config.preprocess, cache_dir=self.cache_dir)
        self._extractor = extractor
        # (min, max) over the training clouds of `cloud_scale`; None: not known (RGB-only
        # data, or a model fitted from features / saved before this was stored).
        self.xyz_scale: tuple[float, float] | None = None

    # ---------------------------------------------------------------- what the model is
    @property
    def modalities(self) -> list[str]:
        return self.core.modalities

    @property
    def branches(self) -> tuple[str, ...]:
        return self.core.names

    @property
    def threshold(self) -> float:
        """The image-score threshold of the stored decision (score above it: anomalous)."""
        return self.core.threshold

    @property
    def decision(self) -> Decision:
        """The stored pass/fail rule: image and pixel thresholds and their target rates."""
        return self.core.decision

    @property
    def weights(self) -> dict[str, float]:
        return self.core.weights

    @property
    def bank_entries(self) -> int:
        return int(sum(b.bank_entries for b in self.core.branches))

    @property
    def bank_bytes(self) -> int:
        return int(sum(b.bank_bytes for b in self.core.branches))

    @property
    def model_bytes(self) -> int:
        """Bytes of all tensors the model stores."""
        return int(sum(v.numel() * v.element_size() for v in self.core.tensors().values()))

    def extractor_for(self, modalities: Sequence[str]) -> FeatureExtractor:
        """The feature extractor for the features this config needs on these modalities."""
        needs = feature_needs(self.config, modalities)
        if not needs:
            raise ConfigError(f"none of the branches {list(self.config.branches)} can run on "
                              f"modalities {list(modalities)}")
        ext = self._extractor
        if ext is None or not needs <= set(ext.needs):
            cfg = self.config
            ext = FeatureExtractor(needs, size=cfg.size, rgb=cfg.rgb, xyz=cfg.xyz,
                                   geometry=cfg.geometry,
                                   cache_dir=self.cache_dir, rgb_runtime=self.rgb_runtime)
            self._extractor = ext
        return ext

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            raise RuntimeError("the detector has not been fitted or loaded")
        return self._extractor

    # ---------------------------------------------------------------- stages
    def prepare(self, samples: Sequence[Sample], progress: bool = False) -> list[Prepared]:
        return self.preprocessor.prepare_many(samples, progress=progress)

    def features(self, prepared: Sequence[Prepared], progress: bool = False,
                 desc: str = "features", cache: bool = True) -> tuple[FeatureMaps, dict[str, float]]:
        """Features in batches (cached on disk when a cache dir is set and `cache`) and the
        ms per sample of each stage."""
        ext = self.extractor
        digest = self.config.preprocess.digest() if cache else None
        bs = self.config.batch_size
        parts, ms = [], {}
        with progress_bar(total=len(prepared), desc=desc, unit="sample",
                          enabled=progress) as bar:
            for s in range(0, len(prepared), bs):
                chunk = prepared[s : s + bs]
                fm, t = ext.extract(chunk, prep_digest=digest)
                parts.append(fm)
                _add(ms, t, len(chunk) / len(prepared))
                bar.update(len(chunk))
        return FeatureMaps.cat(parts), ms

    def sample_features(self, samples: Sequence[Any], progress: bool = False,
                        desc: str = "features", load: Callable[[Any], Sample] | None = None
                        ) -> FeatureMaps:
        """Features of samples (cached on disk when a cache dir is set), batches read
        (`load`: item -> Sample, when the items are not samples yet), preprocessed and
        extracted side by side on worker threads (`stream_batches`)."""
        digest = self.config.preprocess.digest()
        parts = [fm for _, fm, _ in stream_batches(
            samples, self.config.batch_size, self.prepare,
            lambda prep: self.extractor.extract(prep, prep_digest=digest), desc, progress,
            load)]
        return FeatureMaps.cat(parts)

    # ---------------------------------------------------------------- fitting
    def fit(self, source: Any, shots: int | None = None, progress: bool = True) -> Detector:
        """Fit on a Category (train + validation splits) or a list of normal samples.

        With a list, samples whose `split` is "validation" are the validation set; if there
        are none, a seeded 20% of the list is held back. `shots` keeps K training samples
        chosen with the seed (few-shot).
        """
        t0 = time.perf_counter()
        # a Category's files are read as the features go (a few batches ahead, on worker
        # threads), so the full-size samples never all sit in memory at once
        train, val, load = split_items(source, self.config.seed)
        train = select_shots(train, shots, self.config.seed)
        if not train:
            raise ConfigError("no training samples to fit on")
        if not val:
            raise ConfigError("no validation samples: fusion statistics need normal held-out data")
        scales: list[float] = []

        def read(item: Any) -> Sample:
            s = item if load is None else load(item)
            c = cloud_scale(s)
            if c is not None:
                scales.append(c)  # list.append is atomic: the worker threads call this
            return s

        first = read(train[0])
        modalities = modalities_of_sample(first)
        self.category = first.category
        self.extractor_for(modalities)
        train_fm = self.sample_features([first, *train[1:]], progress, desc="train features",
                                        load=lambda x: x if x is first else read(x))
        val_samples = [read(v) for v in val]
        prep_val = self.prepare(val_samples, progress=progress)
        self.xyz_scale = (min(scales), max(scales)) if scales else None
        calib = self.calibration(prep_val, modalities)
        calib_fm, _ = self.features(calib, progress, desc="validation features", cache=False)
        self.fit_features(train_fm, calib_fm, calib, modalities, progress=progress)
        self.report.n_train, self.report.n_val = len(train), len(val)
        self.report.fit_s = time.perf_counter() - t0
        return self

    def calibration(self, prep_val: Sequence[Prepared], modalities: Sequence[str]) -> list[Prepared]:
        """Validation normals plus copies with pasted defects where the config needs them
        (`DetectorConfig.pastes_defects`)."""
        per = self.config.calib_per_sample if self.config.pastes_defects else 0
        return calibration_set(list(prep_val), seed=self.config.seed, per_sample=per,
                               has_rgb="rgb" in modalities, has_xyz="xyz" in modalities)

    def fit_features(self, train_fm: FeatureMaps, calib_fm: FeatureMaps,
                     calib: Sequence[Prepared], modalities: Sequence[str],
                     progress: bool = False, category: str | None = None) -> Detector:
        """Fit from extracted features (`calib`: validation normals, maybe with pasted defects)."""
        labels = np.array([p.label for p in calib])
        gt = np.stack([p.gt for p in calib])
        self.report = self.core.fit(train_fm, calib_fm, labels, gt, pixel_area(calib), modalities,
                                    progress=progress, judge=aupro_inside)
        if category is not None:
            self.category = category
        elif calib and not self.category:
            self.category = calib[0].category
        return self

    # ---------------------------------------------------------------- scoring
    def predict_features(self, fm: FeatureMaps, prepared: Sequence[Prepared],
                         branch_maps: bool = True) -> tuple[list[Prediction], dict[str, float]]:
        """Predictions from extracted features and the ms per sample of each stage."""
        t = time.perf_counter()
        res = self.core.score(fm, pixel_area(prepared), branch_maps=branch_maps)
        preds = []
        for i, p in enumerate(prepared):
            check_finite(p, res.scores[i], res.maps[i])
            preds.append(Prediction(
                score=float(res.scores[i]), anomaly_map=to_original(res.maps[i], p.geometry),
                anomaly_map_work=res.maps[i],
                branch_maps={b: m[i] for b, m in res.branch_maps.items()},
                key=p.key, label=p.label, defect_type=p.defect_type))
        ms = dict(res.timings_ms)
        ms["fusion"] = ms.get("fusion", 0.0) + (
            (time.perf_counter() - t) * 1000.0 / max(len(prepared), 1)
            - sum(res.timings_ms.values()))
        return preds, ms

    def _step(self, prep: list[Prepared], branch_maps: bool = True
              ) -> tuple[list[Prediction], dict[str, float]]:
        """One prepared batch -> predictions and ms per sample by stage."""
        fm, t_feat = self.extractor.extract(prep)
        preds, t_own = self.predict_features(fm, prep, branch_maps=branch_maps)
        _add(t_feat, t_own)
        return preds, t_feat

    def _checked_prepare(self, samples: Sequence[Sample]) -> list[Prepared]:
        self._check_inputs(samples)
        return self.prepare(samples)

    def predict_timed(self, samples: Sequence[Sample], progress: bool = False,
                      branch_maps: bool = True) -> tuple[list[Prediction], dict[str, float]]:
        """`predict` plus the ms per sample of each stage (read excluded)."""
        if not self.core.branches:
            raise RuntimeError("the detector has not been fitted or loaded")
        self._check_inputs(samples)
        return predict_in_batches(samples, self.config.batch_size, self.prepare,
                                  lambda prep: self._step(prep, branch_maps), "predict", progress)

    def iter_predict(self, items: Sequence[Any], load: Callable[[Any], Sample] | None = None,
                     progress: bool = False, branch_maps: bool = False
                     ) -> Iterator[tuple[Sample, Prediction]]:
        """(sample, prediction) pairs in order, batches read (`load`: item -> Sample, e.g.
        a file pair), preprocessed and scored side by side on worker threads
        (`stream_batches`); only a few batches are in memory at a time. A sample the model
        cannot take raises `DataError` when its batch comes up."""
        if not self.core.branches:
            raise RuntimeError("the detector has not been fitted or loaded")
        for samples, preds, _ in stream_batches(
                items, self.config.batch_size, self._checked_prepare,
                lambda prep: self._step(prep, branch_maps), "predict", progress, load):
            yield from zip(samples, preds)

    def predict(self, samples: Sequence[Sample], progress: bool = False,
                branch_maps: bool = True) -> list[Prediction]:
        """Score samples at their original resolution (maps at original size)."""
        return self.predict_timed(samples, progress, branch_maps)[0]

    def calibrate(self, normals: Sequence[Sample], fpr: float | None = None,
                  pixel_fpr: float | None = None, progress: bool = False,
                  source: str = "calibrate") -> Decision:
        """Re-pick both thresholds on normal parts the model has not been trained on (no
        refit: branches, normalisation and weights stay). `fpr` / `pixel_fpr` default to
        the model's current targets (the config's where it has none). Returns the new
        decision, which `save` then stores."""
        if not self.core.branches:
            raise RuntimeError("the detector has not been fitted or loaded")
        old = self.core.decision
        fpr = fpr if fpr is not None else (old.target_fpr or self.config.fpr)
        pixel_fpr = pixel_fpr if pixel_fpr is not None else (old.pixel_target_fpr
                                                             or self.config.pixel_fpr)
        if not normals:
            raise ConfigError("no normal parts to calibrate the thresholds on")
        self._check_modalities(normals)
        scores, maps, areas = [], [], []
        bs = self.config.batch_size
        with progress_bar(total=len(normals), desc="calibrate", unit="sample",
                          enabled=progress) as bar:
            for s in range(0, len(normals), bs):
                prep = self.prepare(normals[s : s + bs])
                fm, _ = self.extractor.extract(prep)
                area = pixel_area(prep)
                res = self.core.score(fm, area, branch_maps=False)
                scores.append(res.scores)
                maps.append(res.maps)
                areas.append(area)
                bar.update(len(prep))
        self.core.decision = Decision.from_normals(
            np.concatenate(scores), np.concatenate(maps), np.concatenate(areas), fpr=fpr,
            pixel_fpr=pixel_fpr, source=source)
        return self.core.decision

    def _check_modalities(self, samples: Sequence[Sample]) -> None:
        check_modalities(samples, self.modalities)

    def _check_units(self, samples: Sequence[Sample]) -> None:
        check_units(samples, self.xyz_scale, self.modalities)

    def _check_inputs(self, samples: Sequence[Sample]) -> None:
        """`check_inputs` through the two checks above (tests stub them one by one)."""
        self._check_modalities(samples)
        self._check_units(samples)


    # ---------------------------------------------------------------- persistence
    def save(self, out_dir: str | Path) -> Path:
        """Write the model folder (see the module docstring); an old model there is replaced."""
        if not self.core.branches:
            raise RuntimeError("the detector has not been fitted")
        out = check_model_dir(out_dir)
        blob = st_save(self.core.tensors())
        digest = hashlib.sha256(blob).hexdigest()
        name = f"model-{digest[:16]}.safetensors"
        meta = {
            "format_version": FORMAT_VERSION,
            "cmad_version": __version__,
            "tensors": name,
            "tensors_sha256": digest,
            "config": self.config.to_dict(),
            "extractor": self.extractor.identity(self.core.needs),
            "category": self.category,
            "xyz_scale": None if self.xyz_scale is None else list(self.xyz_scale),
            **self.core.meta(),
        }
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(out, f"cannot create the model folder: {exc.strerror}") from None
        write_bytes_atomic(out / name, blob)
        pause_point("save:tensors-written")
        write_bytes_atomic(out / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())
        pause_point("save:config-written")
        for old in out.iterdir():  # the previous tensors, temporary files of killed saves
            if old.name not in (name, CONFIG_NAME) and _is_save_leftover(old):
                old.unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, model_dir: str | Path, cache_dir: Path | None = None,
             rgb_runtime: str = "torch") -> Detector:
        """Load a saved model; refuses other format versions, extractors, or broken files."""
        d = Path(model_dir)
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise ModelFormatError(cfg_path, "missing: not a cmad model directory")
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(cfg_path, f"unreadable model config: {exc}") from None
        if not isinstance(meta, dict):
            raise ModelFormatError(cfg_path, "model config is not a JSON object")
        version = meta.get("format_version")
        if version not in READ_VERSIONS:
            raise ModelFormatError(
                cfg_path, f"model format version {version!r}; this cmad ({__version__}) reads "
                f"versions {', '.join(map(str, READ_VERSIONS))}. Re-fit the model with this "
                "version.")
        name = meta.get("tensors")
        if not isinstance(name, str) or Path(name).name != name:
            raise ModelFormatError(cfg_path, "model config names no tensor file")
        ten_path = d / name
        try:
            blob = ten_path.read_bytes()
        except OSError as exc:
            raise ModelFormatError(ten_path, f"missing tensor file: {exc.strerror}") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise ModelFormatError(ten_path, "tensor file does not match config.json (a mixed "
                                   "or damaged save); re-fit or restore the model folder")
        try:
            tensors = st_load(blob)
        except (SafetensorError, ValueError) as exc:
            raise ModelFormatError(ten_path, f"truncated or corrupt tensor file: {exc}") from None
        try:
            det = cls(DetectorConfig.from_saved(meta["config"], where=f"{cfg_path} config"),
                      cache_dir=cache_dir, rgb_runtime=rgb_runtime)
            det.core = DetectorCore.from_state(det.config, tensors, meta)
            det.category = str(meta.get("category", ""))
            scale = meta.get("xyz_scale")
            det.xyz_scale = None if scale is None else (float(scale[0]), float(scale[1]))
            saved_ext = meta["extractor"]
            known = set(BASE_META) | set(det.core.meta())
            unknown = sorted(set(meta) - known)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
                ConfigError) as exc:
            raise ModelFormatError(cfg_path, f"missing or bad field in model config: {exc}") from None
        if unknown:
            raise ModelFormatError(cfg_path, f"unknown field(s) {', '.join(unknown)} in model "
                                   "config (written by another cmad version?)")
        ext = det.extractor_for(det.modalities)
        mine = ext.identity(det.core.needs)
        if json.dumps(mine, sort_keys=True, default=str) != json.dumps(saved_ext, sort_keys=True,
                                                                      default=str):
            raise ModelFormatError(cfg_path, "saved with a different feature extractor or code "
                                   f"version ({saved_ext}) than this installation provides ({mine})")
        return det
