"""The detector: cross-modal alignment + lightweight per-modality memory banks + fusion.

This is the only module that knows all branches. Data flows one way:
samples -> prepared -> features -> branch patch maps -> normalised, fused map -> prediction.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cmad import __version__
from cmad.errors import ConfigError, DataError, ModelFormatError
from cmad.features import ExtractorConfig, FeatureExtractor, FeatureMaps, pool_cells
from cmad.model.align import AlignConfig, CrossModalAlignment
from cmad.model.bank import DTYPES as BANK_DTYPES
from cmad.model.bank import MemoryBank
from cmad.model.calibrate import calibration_set
from cmad.model.fusion import (
    choose_weights,
    combine,
    image_scores,
    normalise,
    robust_stats,
    upsample,
)
from cmad.types import Prediction, Prepared, Sample

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ALIGN_DEFAULTS: dict[str, Any] = {"variant": "latent", "hidden": 64}
BRANCHES = ("align", "joint_bank", "rgb_bank", "xyz_bank", "concat_bank")
RGB_BRANCHES = {"align", "joint_bank", "rgb_bank", "concat_bank"}
XYZ_BRANCHES = {"align", "joint_bank", "xyz_bank", "concat_bank"}
JOINT_BRANCHES = ("joint_bank", "concat_bank")
# equal: every active branch the same weight; joint: the joint bank half, the others share
# the other half equally (equal when there is no joint bank); auto: chosen on pasted defects
WEIGHT_SCHEMES = ("joint", "equal", "auto")


def active_branches(branches: Sequence[str], modalities: Sequence[str]) -> tuple[str, ...]:
    """The branches that can run on these modalities (RGB and/or xyz)."""
    return tuple(b for b in branches
                 if (b not in RGB_BRANCHES or "rgb" in modalities)
                 and (b not in XYZ_BRANCHES or "xyz" in modalities))


def scheme_weights(branches: Sequence[str], scheme: str) -> dict[str, float]:
    """Fixed fusion weights (summing to 1) of the active branches for 'equal' or 'joint'."""
    joint = [b for b in branches if b in JOINT_BRANCHES]
    if scheme == "joint" and joint and len(joint) < len(branches):
        rest = len(branches) - len(joint)
        return {b: (0.5 / len(joint) if b in JOINT_BRANCHES else 0.5 / rest) for b in branches}
    return {b: 1.0 / len(branches) for b in branches}


@dataclass
class DetectorConfig:
    """Everything that defines a model. Saved with it as JSON."""

    size: int = 224
    branches: tuple[str, ...] = ("align", "joint_bank", "rgb_bank", "xyz_bank")
    bank_fraction: float = 0.015
    bank_max_entries: int | None = 20000
    bank_min_entries: int = 128
    joint_fraction: float = 0.06
    concat_fraction: float = 0.1
    bank_pca: int | None = None
    bank_dtype: str = "int4"
    align_float16: bool = True
    align_app: tuple[str, ...] = ("colour",)
    align_geo: tuple[str, ...] = ("xyz", "context")
    weights: dict[str, float] | str = "joint"
    sigma: float = 4.0
    score_mode: str = "max"
    topk: int = 10
    seed: int = 0
    calib_per_sample: int = 2
    batch_size: int = 8
    preprocess: dict[str, Any] = field(default_factory=dict)
    rgb: dict[str, Any] = field(default_factory=dict)
    xyz: dict[str, Any] = field(default_factory=dict)
    align: dict[str, Any] = field(default_factory=lambda: dict(ALIGN_DEFAULTS))

    def __post_init__(self) -> None:
        self.align = {**ALIGN_DEFAULTS, **(self.align or {})}
        unknown = set(self.align) - {f.name for f in fields(AlignConfig)}
        if unknown:
            raise ConfigError(f"unknown align keys {sorted(unknown)}; known: "
                              f"{sorted(f.name for f in fields(AlignConfig))}")
        if self.score_mode not in ("max", "topk"):
            raise ConfigError(f"score_mode must be 'max' or 'topk', got {self.score_mode!r}")
        for name in ("bank_fraction", "joint_fraction", "concat_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ConfigError(f"bank_dtype must be one of {list(BANK_DTYPES)}, got {self.bank_dtype!r}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        self.branches = tuple(self.branches)
        self.align_app, self.align_geo = tuple(self.align_app), tuple(self.align_geo)
        for name, parts, allowed in (("align_app", self.align_app, ("rgb", "colour")),
                                     ("align_geo", self.align_geo, ("xyz", "context"))):
            if not parts or set(parts) - set(allowed):
                raise ConfigError(f"{name} must be a non-empty subset of {list(allowed)}, "
                                  f"got {list(parts)}")
        bad = [b for b in self.branches if b not in BRANCHES]
        if bad or not self.branches:
            raise ConfigError(f"unknown branches {bad or '(none)'}; choose from {list(BRANCHES)}")
        if self.size % 8 or self.size < 32:
            raise ConfigError(f"size must be a multiple of 8 and at least 32, got {self.size}")
        if isinstance(self.weights, str):
            if self.weights not in WEIGHT_SCHEMES:
                raise ConfigError(f"weights must be one of {list(WEIGHT_SCHEMES)} or a mapping of "
                                  f"branch to weight, got {self.weights!r}")
        elif self.weights is not None:
            extra = set(self.weights) - set(self.branches)
            if extra:
                raise ConfigError(f"weights for branches not in use: {sorted(extra)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["branches"] = list(self.branches)
        d["align_app"], d["align_geo"] = list(self.align_app), list(self.align_geo)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> DetectorConfig:
        """Read a YAML or JSON config file (keys as in `to_dict`)."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{p}: cannot read config: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config file must hold a mapping of keys to values")
        return cls.from_dict(data)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@dataclass
class FitReport:
    """What fitting did: sizes, times, chosen weights, calibration criteria."""

    n_train: int = 0
    n_val: int = 0
    fit_s: float = 0.0
    bank_entries: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    single_branch_criterion: dict[str, float] = field(default_factory=dict)
    align_history: list[tuple[float, float]] = field(default_factory=list)


class Detector:
    """Fit on normal samples, then score new ones.

    >>> det = Detector(DetectorConfig()).fit(Dataset(root).category("bagel"))
    >>> preds = det.predict(samples)
    """

    def __init__(self, config: DetectorConfig | None = None, cache_dir: Path | None = None,
                 rgb_runtime: str = "torch") -> None:
        self.config = config or DetectorConfig()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.rgb_runtime = rgb_runtime
        self.modalities: list[str] = []
        self.branches: tuple[str, ...] = ()
        self.category: str = ""
        self.norm: dict[str, tuple[float, float]] = {}
        self.weights: dict[str, float] = {}
        self.banks: dict[str, MemoryBank] = {}
        self.align: CrossModalAlignment | None = None
        self.concat_scale: tuple[float, float] = (1.0, 1.0)
        self.threshold: float = float("inf")
        self.report = FitReport()
        self.timings_ms: dict[str, float] = {}
        self._extractor: FeatureExtractor | None = None
        self._preprocessor = None

    # ---------------------------------------------------------------- components
    def _preprocess_config(self):
        from cmad.data.preprocess import PreprocessConfig

        return PreprocessConfig(**{**self.config.preprocess, "size": self.config.size})

    @property
    def preprocessor(self):
        if self._preprocessor is None:
            from cmad.data.preprocess import Preprocessor

            self._preprocessor = Preprocessor(self._preprocess_config(), cache_dir=self.cache_dir)
        return self._preprocessor

    def extractor_for(self, modalities: Iterable[str]) -> FeatureExtractor:
        mods = set(modalities)
        ext = self._extractor
        if ext is not None and ((ext.rgb is not None) != ("rgb" in mods)
                                or (ext.xyz is not None) != ("xyz" in mods)):
            self._extractor = None
        if self._extractor is None:
            cfg = ExtractorConfig(use_rgb="rgb" in mods, use_xyz="xyz" in mods,
                                  rgb=dict(self.config.rgb), xyz=dict(self.config.xyz))
            self._extractor = FeatureExtractor(cfg, size=self.config.size,
                                               cache_dir=self.cache_dir,
                                               rgb_runtime=self.rgb_runtime)
        return self._extractor

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            raise RuntimeError("the detector has not been fitted or loaded")
        return self._extractor

    def _active_branches(self, modalities: Sequence[str]) -> tuple[str, ...]:
        keep = active_branches(self.config.branches, modalities)
        if not keep:
            raise ConfigError(
                f"none of the branches {list(self.config.branches)} can run on modalities "
                f"{list(modalities)}"
            )
        return tuple(keep)

    # ---------------------------------------------------------------- features
    def prepare(self, samples: Sequence[Sample], progress: bool = False) -> list[Prepared]:
        return self.preprocessor.prepare_many(samples, progress=progress)

    def features(self, prepared: Sequence[Prepared], progress: bool = False,
                 desc: str = "features", cache: bool = True) -> FeatureMaps:
        """Features in batches; cached on disk (when a cache dir is set and `cache`)."""
        ext = self.extractor
        digest = self._preprocess_config().digest() if cache else None
        bs = self.config.batch_size
        parts = []
        for s in tqdm(range(0, len(prepared), bs), desc=desc, leave=False, disable=not progress):
            parts.append(ext.extract(prepared[s : s + bs], prep_digest=digest))
        return FeatureMaps.cat(parts)

    # ---------------------------------------------------------------- fitting
    def fit(self, source: Any, shots: int | None = None, progress: bool = True) -> Detector:
        """Fit on a `cmad.data.Category` (train + validation splits) or a list of samples.

        With a list, samples whose `split` is "validation" are the validation set; if there
        are none, a seeded 20% of the list is held back. `shots` keeps K training samples
        chosen with the seed (few-shot).
        """
        t0 = time.perf_counter()
        train, val = _split_source(source, self.config.seed)
        train = select_shots(train, shots, self.config.seed)
        if not train:
            raise ConfigError("no training samples to fit on")
        if not val:
            raise ConfigError("no validation samples: fusion statistics need normal held-out data")
        modalities = _modalities(train[0])
        self.category = train[0].category
        self.extractor_for(modalities)
        prep_train = self.prepare(train, progress=progress)
        prep_val = self.prepare(val, progress=progress)
        train_fm = self.features(prep_train, progress, desc="train features")
        calib = calibration_set(prep_val, seed=self.config.seed,
                                per_sample=self.config.calib_per_sample,
                                has_rgb="rgb" in modalities, has_xyz="xyz" in modalities)
        calib_fm = self.features(calib, progress, desc="validation features", cache=False)
        self.fit_features(train_fm, calib_fm, calib, modalities, progress=progress)
        self.report.n_train, self.report.n_val = len(train), len(val)
        self.report.fit_s = time.perf_counter() - t0
        return self

    def fit_features(
        self,
        train_fm: FeatureMaps,
        calib_fm: FeatureMaps,
        calib: Sequence[Prepared],
        modalities: Sequence[str],
        progress: bool = False,
    ) -> Detector:
        """Fit from extracted features. `calib` are validation normals, some with pasted
        defects (label 1, gt set); only the normal ones give the normalisation statistics."""
        self.modalities = list(modalities)
        self.branches = self._active_branches(modalities)
        self.banks, self.align, self.norm = {}, None, {}
        cfg = self.config
        labels = np.array([p.label for p in calib])
        normal = torch.from_numpy(labels == 0)
        val_fm = _subset(calib_fm, normal)
        if set(self.branches) & {"align", "xyz_bank"} and not bool(
                (train_fm.valid & train_fm.image).any()):
            raise ConfigError(
                "no valid 3D patches in the training data: no patch has enough foreground "
                "points with FPFH neighbours. Check that the point clouds are in metres, that "
                "background removal keeps the part (preprocess.plane_threshold), and the FPFH "
                "radii (xyz.feature_radius) for this scale.")
        for b in self.branches:
            if b == "rgb_bank":
                self.banks[b] = self._fit_bank(_flat(train_fm.rgb)[train_fm.image.reshape(-1)],
                                               cfg.bank_fraction, progress)
            elif b == "xyz_bank":
                mask = (train_fm.valid & train_fm.image).reshape(-1)
                self.banks[b] = self._fit_bank(_flat(train_fm.xyz)[mask], cfg.bank_fraction, progress)
            elif b in JOINT_BRANCHES:
                self.concat_scale = (float(train_fm.rgb.std()), float(train_fm.xyz.std()))
                feats = _flat(self._concat(train_fm))[train_fm.image.reshape(-1)]
                frac = cfg.concat_fraction if b == "concat_bank" else cfg.joint_fraction
                self.banks[b] = self._fit_bank(feats, frac, progress)
            elif b == "align":
                mask = (train_fm.valid & train_fm.image).reshape(-1)
                vmask = (val_fm.valid & val_fm.image).reshape(-1)
                app, geo = self._align_inputs(train_fm)
                vapp, vgeo = self._align_inputs(val_fm)
                self.align = CrossModalAlignment(AlignConfig(**cfg.align), seed=cfg.seed)
                self.align.fit(app[mask], geo[mask], vapp[vmask], vgeo[vmask], progress=progress)
                if cfg.align_float16:
                    self.align.round_to_float16()
                self.report.align_history = list(self.align.history)
        raw = self.branch_maps(calib_fm)
        for b, (scores, valid) in raw.items():
            self.norm[b] = robust_stats(scores[normal], valid[normal])
        maps = {b: normalise(s, v, *self.norm[b]) for b, (s, v) in raw.items()}
        if isinstance(cfg.weights, dict):
            self.weights = {b: float(cfg.weights.get(b, 0.0)) for b in self.branches}
        elif cfg.weights in (None, "equal", "joint") or len(self.branches) == 1:
            self.weights = scheme_weights(self.branches, cfg.weights or "equal")
        else:
            gt_patch = torch.from_numpy(
                np.stack([_patch_gt(p.gt, calib_fm.grid) for p in calib])
            )
            self.weights, single = choose_weights(maps, gt_patch, calib_fm.image, labels)
            self.report.single_branch_criterion = single
        if not any(self.weights.values()):
            raise ConfigError(f"all active branches {list(self.branches)} have weight 0")
        self.report.weights = dict(self.weights)
        val_pix = upsample(combine(_subset_maps(maps, normal), self.weights), cfg.size, cfg.sigma)
        val_area = _pixel_masks([p for p, n in zip(calib, normal.tolist()) if n])
        self.threshold = float(image_scores(val_pix, val_area, cfg.score_mode, cfg.topk).max())
        self.report.bank_entries = {b: bank.entries for b, bank in self.banks.items()}
        return self

    def _fit_bank(self, feats: torch.Tensor, fraction: float, progress: bool) -> MemoryBank:
        cfg = self.config
        return MemoryBank(fraction, cfg.bank_max_entries, cfg.seed,
                          min_entries=cfg.bank_min_entries, pca_dim=cfg.bank_pca,
                          dtype=cfg.bank_dtype).fit(feats, progress=progress)

    def _concat(self, fm: FeatureMaps) -> torch.Tensor:
        """BTF-style concatenation: each modality scaled to unit spread; FPFH 0 where invalid."""
        xyz = fm.xyz * fm.valid[:, None].float()
        return torch.cat([fm.rgb / self.concat_scale[0], xyz / self.concat_scale[1]], 1)

    def _align_inputs(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        app = torch.cat([getattr(fm, n) for n in self.config.align_app], 1)
        geo = torch.cat([getattr(fm, n) for n in self.config.align_geo], 1)
        return _flat(app), _flat(geo)

    # ---------------------------------------------------------------- scoring
    def branch_maps(self, fm: FeatureMaps) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Raw (B, h, w) patch scores and validity of each active branch."""
        b_, h, w = fm.valid.shape
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        t_bank = t_align = 0.0
        for b in self.branches:
            t = time.perf_counter()
            if b == "rgb_bank":
                s = self.banks[b].score(_flat(fm.rgb))
                valid = fm.image
            elif b == "xyz_bank":
                s = self.banks[b].score(_flat(fm.xyz))
                valid = fm.valid & fm.image
            elif b in JOINT_BRANCHES:
                s = self.banks[b].score(_flat(self._concat(fm)))
                valid = fm.image
            else:
                assert self.align is not None
                s = self.align.score(*self._align_inputs(fm))
                valid = fm.valid & fm.image
            dt = time.perf_counter() - t
            if b == "align":
                t_align += dt
            else:
                t_bank += dt
            out[b] = (s.reshape(b_, h, w), valid)
        n = max(b_, 1)
        self.timings_ms["alignment"] = t_align * 1000.0 / n
        self.timings_ms["bank_search"] = t_bank * 1000.0 / n
        return out

    def predict_features(self, fm: FeatureMaps, prepared: Sequence[Prepared],
                         branch_maps: bool = True) -> list[Prediction]:
        """Predictions from already extracted features; `branch_maps=False` skips the
        per-branch pixel maps (only the fused map is needed to score)."""
        from cmad.data.preprocess import to_original

        raw = self.branch_maps(fm)
        t = time.perf_counter()
        maps = {b: normalise(s, v, *self.norm[b]) for b, (s, v) in raw.items()}
        fused = combine(maps, self.weights)
        size = self.config.size
        pix = upsample(fused, size, self.config.sigma)
        area = _pixel_masks(prepared)
        floor = np.array([min(0.0, float(m[a].min())) if a.any() else 0.0
                          for m, a in zip(pix, area)], dtype=np.float32)
        pix = np.where(area, pix, floor[:, None, None]).astype(np.float32)
        scores = image_scores(pix, area, self.config.score_mode, self.config.topk)
        branch_pix = ({b: upsample(m, size, self.config.sigma) for b, m in maps.items()}
                      if branch_maps else {})
        preds = []
        for i, p in enumerate(prepared):
            preds.append(Prediction(
                score=float(scores[i]),
                anomaly_map=to_original(pix[i], p.geometry),
                anomaly_map_work=pix[i],
                branch_maps={b: m[i] for b, m in branch_pix.items()},
                key=p.key, label=p.label, defect_type=p.defect_type,
            ))
        self.timings_ms["fusion"] = (time.perf_counter() - t) * 1000.0 / max(len(prepared), 1)
        return preds

    def predict(self, samples: Sequence[Sample], progress: bool = False,
                branch_maps: bool = True) -> list[Prediction]:
        """Score samples at their original resolution (maps at original size)."""
        if not self.branches:
            raise RuntimeError("the detector has not been fitted or loaded")
        self._check_modalities(samples)
        out: list[Prediction] = []
        stages: dict[str, float] = {}
        self.timings_ms = {}
        bs = self.config.batch_size
        for s in tqdm(range(0, len(samples), bs), desc="predict", leave=False, disable=not progress):
            chunk = samples[s : s + bs]
            t = time.perf_counter()
            prep = self.prepare(chunk)
            t_prep = (time.perf_counter() - t) * 1000.0 / len(chunk)
            fm = self.extractor.extract(prep)
            out.extend(self.predict_features(fm, prep, branch_maps=branch_maps))
            for k, v in {"preprocess": t_prep, **fm.timings_ms, **self.timings_ms}.items():
                stages[k] = stages.get(k, 0.0) + v * len(chunk)
        self.timings_ms = {k: v / max(len(samples), 1) for k, v in stages.items()}
        return out

    def _check_modalities(self, samples: Sequence[Sample]) -> None:
        for smp in samples:
            have = _modalities(smp)
            if not set(self.modalities) <= set(have):
                raise DataError(smp.paths.rgb or smp.paths.xyz,
                                f"the model needs {self.modalities}; this sample has {have}")

    # ---------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for b, bank in self.banks.items():
            t.update({f"{b}.{k}": v for k, v in bank.state_dict().items()})
        if self.align is not None:
            t.update({f"align.{k}": v
                      for k, v in self.align.state_dict(half=self.config.align_float16).items()})
        return {k: v.contiguous() for k, v in t.items()}

    @property
    def model_bytes(self) -> int:
        """Bytes of all tensors the model stores."""
        return int(sum(v.numel() * v.element_size() for v in self.tensors().values()))

    def save(self, out_dir: str | Path) -> Path:
        """Write model.safetensors and config.json into `out_dir`, atomically each."""
        if not self.branches:
            raise RuntimeError("the detector has not been fitted")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "cmad_version": __version__,
            "config": self.config.to_dict(),
            "extractor": self.extractor.identity(),
            "modalities": self.modalities,
            "branches": list(self.branches),
            "category": self.category,
            "norm": {b: list(v) for b, v in self.norm.items()},
            "weights": self.weights,
            "threshold": self.threshold,
            "concat_scale": list(self.concat_scale),
            "bank_params": {b: [bk.fraction, bk.max_entries, bk.seed] for b, bk in self.banks.items()},
        }
        tmp = out / f".model.safetensors.tmp{os.getpid()}"
        save_file(self.tensors(), str(tmp))
        tmp.replace(out / "model.safetensors")
        tmpj = out / f".config.json.tmp{os.getpid()}"
        tmpj.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmpj.replace(out / "config.json")
        return out

    @classmethod
    def load(cls, model_dir: str | Path, cache_dir: Path | None = None,
             rgb_runtime: str = "torch") -> Detector:
        """Load a saved model; refuses other format versions, extractors, or broken files."""
        d = Path(model_dir)
        cfg_path, ten_path = d / "config.json", d / "model.safetensors"
        for p in (cfg_path, ten_path):
            if not p.is_file():
                raise ModelFormatError(p, "missing: not a cmad model directory")
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(cfg_path, f"unreadable model config: {exc}") from exc
        if not isinstance(meta, dict):
            raise ModelFormatError(cfg_path, "model config is not a JSON object")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFormatError(
                cfg_path, f"model format version {version!r}; this cmad ({__version__}) reads "
                f"version {FORMAT_VERSION}. Re-fit the model with this version.")
        try:
            tensors = load_file(str(ten_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(ten_path, f"truncated or corrupt tensor file: {exc}") from exc
        try:
            det = cls(DetectorConfig.from_dict(meta["config"]), cache_dir=cache_dir,
                      rgb_runtime=rgb_runtime)
            det.modalities = list(meta["modalities"])
            for key in ("branches", "norm", "weights", "concat_scale", "bank_params", "extractor"):
                meta[key]  # noqa: B018 - presence check
        except (KeyError, TypeError, ConfigError) as exc:
            raise ModelFormatError(cfg_path, f"missing or bad field in model config: {exc}") from exc
        ext = det.extractor_for(det.modalities)
        if json.dumps(ext.identity(), sort_keys=True, default=str) != json.dumps(
                meta["extractor"], sort_keys=True, default=str):
            raise ModelFormatError(
                cfg_path, "saved with a different feature extractor "
                f"({meta['extractor']}) than this installation provides ({ext.identity()})")
        det.branches = tuple(meta["branches"])
        det.category = meta.get("category", "")
        det.norm = {b: (float(v[0]), float(v[1])) for b, v in meta["norm"].items()}
        det.weights = {b: float(v) for b, v in meta["weights"].items()}
        det.concat_scale = tuple(meta["concat_scale"])
        det.threshold = float(meta.get("threshold", float("inf")))
        try:
            for b, (frac, cap, seed) in meta["bank_params"].items():
                bank = MemoryBank(frac, cap, seed)
                bank.load_state_dict(
                    {k[len(b) + 1:]: v for k, v in tensors.items() if k.startswith(f"{b}.")})
                det.banks[b] = bank
            if "align" in det.branches:
                det.align = CrossModalAlignment(AlignConfig(**det.config.align), seed=det.config.seed)
                det.align.load_state_dict(
                    {k[len("align."):]: v for k, v in tensors.items() if k.startswith("align.")})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ModelFormatError(ten_path, f"tensors do not match the config: {exc}") from exc
        return det


# -------------------------------------------------------------------- helpers
def _modalities(s: Sample) -> list[str]:
    return [m for m, a in (("rgb", s.rgb), ("xyz", s.xyz)) if a is not None]


def _subset(fm: FeatureMaps, keep: torch.Tensor) -> FeatureMaps:
    pick = lambda t: None if t is None else t[keep]  # noqa: E731
    return FeatureMaps(pick(fm.rgb), pick(fm.xyz), pick(fm.colour), pick(fm.context),
                       fm.valid[keep], fm.image[keep])


def _subset_maps(maps: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in maps.items()}


def _patch_gt(gt: np.ndarray, grid: tuple[int, int], min_share: float = 0.25) -> np.ndarray:
    """A patch is defective when at least `min_share` of its pixels are."""
    return pool_cells(gt.astype(np.float32)[..., None], grid)[..., 0] >= min_share


def _pixel_masks(prepared: Sequence[Prepared]) -> np.ndarray:
    """(B, S, S) working-resolution pixels inside each original image (not padding)."""
    return np.stack([p.geometry.image_mask(p.geometry.size, p.geometry.size) for p in prepared])


def select_shots(train: list, shots: int | None, seed: int) -> list:
    """K training items chosen with the seed (all of them when shots is None)."""
    if shots is None:
        return list(train)
    if shots <= 0:
        raise ConfigError(f"--shots must be positive, got {shots}")
    if shots >= len(train):
        return list(train)
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(train), size=shots, replace=False).tolist())
    return [train[i] for i in idx]


def _split_source(source: Any, seed: int) -> tuple[list[Sample], list[Sample]]:
    if hasattr(source, "samples") and callable(source.samples):
        train = source.samples("train")
        has_val = "validation" in getattr(source, "splits", ["validation"])
        val = source.samples("validation") if has_val else []
    else:
        items = list(source)
        if not items or not all(isinstance(s, Sample) for s in items):
            raise ConfigError("fit() takes a cmad.data Category or a non-empty list of Sample")
        train = [s for s in items if s.split != "validation" and s.label == 0]
        val = [s for s in items if s.split == "validation"]
    if not val and len(train) >= 2:
        rng = np.random.default_rng(seed)
        n_val = max(1, len(train) // 5)
        hold = set(rng.choice(len(train), size=n_val, replace=False).tolist())
        val = [s for i, s in enumerate(train) if i in hold]
        train = [s for i, s in enumerate(train) if i not in hold]
        log.warning("no validation split: holding back %d training samples for it", n_val)
    return train, val
