"""`DetectorConfig`: everything that defines a model, typed and frozen, checked when built.

Read a YAML / JSON file with `DetectorConfig.from_file(path)`: an unknown key at any level or
a bad value raises `ConfigError` naming the file and the dotted key.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cmad.configs import DEFAULT_SIZE, MAX_SIZE, build, merge, size_problem, to_plain
from cmad.data.preprocess import PreprocessConfig
from cmad.errors import ConfigError
from cmad.features.geometry import GeometryConfig
from cmad.features.rgb import RGBConfig
from cmad.features.xyz import FPFHConfig
from cmad.model.align import AlignConfig
from cmad.model.bank import DTYPES as BANK_DTYPES
from cmad.model.mapping import MappingConfig

# joint: the joint bank half, the others share the other half equally (equal when there is
# no joint bank); equal: every active branch the same weight; auto: chosen on pasted defects
WEIGHT_SCHEMES = ("joint", "equal", "auto")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a model. Saved with it as JSON.

    `size` sets the working resolution of preprocessing, the CNN and the feature grid
    (size / 8); `branches` names registered branches (`cmad.model.branches.REGISTRY`).
    """

    size: int = DEFAULT_SIZE
    # chosen on the tuning seeds 0 and 1 (RESULTS.md, round 4): the dense cross-modal mapping,
    # the light joint RGB+FPFH bank and the light RGB bank, equal weights
    branches: tuple[str, ...] = ("mapping", "joint_bank", "rgb_bank")
    # shares of the training patches kept by the per-modality banks and by the joint bank:
    # 1.5% and 6% up to round 6, at 224 px; at 288 px a sample has 1.65x the patches, and
    # 0.9% and 3.6% keep as many entries per training sample as before. On the tuning
    # seeds 0 and 1 that cost -0.0005 I-AUROC and -0.0035 AUPRO@30% against 1.5% and 6% at
    # 288, and at real size (250 training samples) it made the fit 45 -> 30 s and predict
    # 6.3 -> 8.5 samples/s (RESULTS.md, round 7)
    bank_fraction: float = 0.009
    bank_max_entries: int | None = 20000
    bank_min_entries: int = 128
    joint_fraction: float = 0.036
    bank_pca: int | None = None
    bank_dtype: str = "int4"
    # each bank scores a patch by its distance to the nearest entry over that entry's local
    # scale (the mean distance to its `bank_density` nearest other entries, relative to the
    # bank's median; `cmad.model.bank.local_scale`); null: the plain distance (PatchCore,
    # up to round 15). On the tuning seeds 0 and 1, 16 gave cmad +0.011 I-AUROC and +0.005
    # AUPRO@30% (RESULTS.md, round 16). A model saved without the field has null.
    bank_density: int | None = 16
    # keep a bank's local scale only where it localises the defects pasted into the
    # validation normals better (AUPRO@30% of the bank's own map; for a bank left out of
    # the map, the image AUROC of the pasted copies against the normals) than the plain
    # distance:
    # for the joint bank the pasted defects gave the sign of the test split's change in 8
    # of 11 tuning categories; on Eyecandies CandyCane the scale cost the joint bank 0.13
    # AUPRO@30% and is dropped there (RESULTS.md, round 17).
    # false: keep it always (round 16). Needs pasted defects (`pastes_defects`)
    bank_density_check: bool = True
    align_float16: bool = True
    align_app: tuple[str, ...] = ("colour",)
    align_geo: tuple[str, ...] = ("xyz", "context")
    mapping_b: tuple[str, ...] = ("geom",)
    weights: Mapping[str, float] | str = "equal"
    # branches that count toward the image score but stay out of the pixel map (anomaly
    # map, mask, AUPRO); the others keep their weights, rescaled to the same sum. When that
    # leaves no active branch, the map fuses every branch. The RGB bank: it detects, but
    # alone it localises worst of the three, and on the tuning seeds 0 and 1 leaving it out
    # of the map gave AUPRO@30% 0.865 -> 0.875 at the same I-AUROC (RESULTS.md, round 6).
    # The mask of a part judged anomalous keeps at least its peak (its map is not the one
    # its score was read from). A model saved without the field has ().
    map_exclude: tuple[str, ...] = ("rgb_bank",)
    sigma: float = 4.0
    score_mode: str = "max"
    topk: int = 10
    seed: int = 0
    calib_per_sample: int = 2
    batch_size: int = 8
    # target false-positive rates of the stored decision (cmad.model.decision): of normal
    # parts judged anomalous, and of normal pixels inside the predicted defect mask
    fpr: float = 0.01
    pixel_fpr: float = 0.005
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    rgb: RGBConfig = field(default_factory=RGBConfig)
    xyz: FPFHConfig = field(default_factory=FPFHConfig)
    align: AlignConfig = field(default_factory=lambda: AlignConfig(variant="latent", hidden=64))
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)

    def __post_init__(self) -> None:
        from cmad.model.branches import REGISTRY

        if isinstance(self.branches, str):
            raise ConfigError(f"branches must be a list of names, got the string {self.branches!r}")
        object.__setattr__(self, "branches", tuple(self.branches))
        object.__setattr__(self, "align_app", tuple(self.align_app))
        object.__setattr__(self, "align_geo", tuple(self.align_geo))
        object.__setattr__(self, "mapping_b", tuple(self.mapping_b))
        if not self.mapping_b or set(self.mapping_b) - {"geom", "xyz"} or "geom" not in self.mapping_b:
            raise ConfigError(f"mapping_b must be [geom] or [geom, xyz], got {list(self.mapping_b)}")
        # the upper limit is `from_dict`'s (new configs), not a saved model's
        problem = size_problem(self.size, max_size=None)
        if problem:
            raise ConfigError(f"size {problem}")
        # the working resolution reaches every stage from here
        for name, kind in (("preprocess", PreprocessConfig), ("rgb", RGBConfig), ("xyz", FPFHConfig),
                           ("align", AlignConfig), ("geometry", GeometryConfig),
                           ("mapping", MappingConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        object.__setattr__(self, "preprocess", replace(self.preprocess, size=self.size))
        object.__setattr__(self, "rgb", replace(self.rgb, size=self.size))
        object.__setattr__(self, "xyz", replace(self.xyz, grid=(self.size // 8, self.size // 8)))
        if self.score_mode not in ("max", "topk"):
            raise ConfigError(f"score_mode must be 'max' or 'topk', got {self.score_mode!r}")
        for name in ("bank_fraction", "joint_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if self.bank_max_entries is not None and self.bank_max_entries < 1:
            raise ConfigError(f"bank_max_entries must be >= 1 or null, got {self.bank_max_entries}")
        if self.bank_min_entries < 0:
            raise ConfigError(f"bank_min_entries must be >= 0, got {self.bank_min_entries}")
        if self.bank_density is not None and (isinstance(self.bank_density, bool)
                                              or not isinstance(self.bank_density, int)
                                              or self.bank_density < 1):
            raise ConfigError(f"bank_density must be an integer >= 1 or null, got "
                              f"{self.bank_density!r}")
        if not isinstance(self.bank_density_check, bool):
            raise ConfigError(f"bank_density_check must be true or false, got "
                              f"{self.bank_density_check!r}")
        if self.bank_pca is not None and self.bank_pca < 1:
            raise ConfigError(f"bank_pca must be >= 1 or null, got {self.bank_pca}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ConfigError(f"bank_dtype must be one of {list(BANK_DTYPES)}, got {self.bank_dtype!r}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        for name in ("topk", "calib_per_sample", "batch_size"):
            if getattr(self, name) < (0 if name == "calib_per_sample" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for name in ("fpr", "pixel_fpr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v <= 0.5:
                raise ConfigError(f"{name} must be a rate in (0, 0.5] (0.01 = 1%), got {v!r}")
        for name, parts, allowed in (("align_app", self.align_app, ("rgb", "colour")),
                                     ("align_geo", self.align_geo, ("xyz", "context", "geom"))):
            if not parts or set(parts) - set(allowed):
                raise ConfigError(f"{name} must be a non-empty subset of {list(allowed)}, "
                                  f"got {list(parts)}")
        bad = [b for b in self.branches if b not in REGISTRY]
        if bad or not self.branches:
            raise ConfigError(f"unknown branches {bad or '(none)'}; choose from {sorted(REGISTRY)}")
        if len(set(self.branches)) != len(self.branches):
            raise ConfigError(f"branches must be distinct, got {list(self.branches)}")
        if isinstance(self.map_exclude, str):
            raise ConfigError(f"map_exclude must be a list of branch names, got the string "
                              f"{self.map_exclude!r}")
        object.__setattr__(self, "map_exclude", tuple(self.map_exclude))
        bad = [b for b in self.map_exclude if b not in REGISTRY]
        if bad or len(set(self.map_exclude)) != len(self.map_exclude):
            raise ConfigError(f"map_exclude must name distinct branches of {sorted(REGISTRY)}, "
                              f"got {list(self.map_exclude)}")
        if isinstance(self.weights, str):
            if self.weights not in WEIGHT_SCHEMES:
                raise ConfigError(f"weights must be one of {list(WEIGHT_SCHEMES)} or a mapping of "
                                  f"branch to weight, got {self.weights!r}")
        else:
            object.__setattr__(self, "weights", {str(k): float(v) for k, v in self.weights.items()})
            extra = set(self.weights) - set(self.branches)
            if extra:
                raise ConfigError(f"weights for branches not in use: {sorted(extra)}")
            if any(v < 0 for v in self.weights.values()):
                raise ConfigError(f"weights must be >= 0, got {self.weights}")

    @property
    def pastes_defects(self) -> bool:
        """Whether fitting needs copies of the validation normals with pasted defects
        (`cmad.model.calibrate`): for `weights: auto` and for `bank_density_check`."""
        return self.weights == "auto" or (self.bank_density is not None
                                          and self.bank_density_check)

    def to_dict(self) -> dict[str, Any]:
        # the rgb part as `RGBConfig.to_dict` writes it (float32, the default precision, not
        # written: configs saved before rgb precision existed and now are the same)
        return {**to_plain(self), "rgb": self.rgb.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | None = None,
                  max_size: int | None = MAX_SIZE) -> DetectorConfig:
        """Build from a plain mapping (keys as in `to_dict`); errors name `where`. A size
        above `max_size` is refused (more likely a typo than a wish; None: no limit, for a
        model saved before the limit existed)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where + ': ' if where else ''}a config must be a mapping of keys "
                              f"to values, got {d!r}")
        d = dict(d)
        size = d.get("size", DEFAULT_SIZE)
        # only the upper limit here: the type and the rest are checked (and named) on build
        if max_size is not None and isinstance(size, int) and not isinstance(size, bool) \
                and size > max_size:
            raise ConfigError(f"{where + ': ' if where else ''}size {size_problem(size, max_size)}")
        derived = (("preprocess", "size", size), ("rgb", "size", size),
                   ("xyz", "grid", [size // 8, size // 8] if isinstance(size, int) else None))
        for key, sub, value in derived:
            if isinstance(d.get(key), Mapping) and sub in d[key]:
                given = d[key][sub]
                if (list(given) if isinstance(given, list | tuple) else given) != value:
                    raise ConfigError(f"{where + ': ' if where else ''}{key}.{sub}: set by the "
                                      f"top-level `size`, not here (got {given!r})")
                d[key] = {k: v for k, v in d[key].items() if k != sub}
        return build(cls, d, where)

    @classmethod
    def from_saved(cls, d: Any, where: str | None = None) -> DetectorConfig:
        """A saved model's config: as `from_dict`, except that a model saved before
        `map_exclude` existed keeps every branch in its map, and one saved before
        `bank_density` its plain bank distances, and one saved before `bank_density_check`
        says that its banks kept their local scale unchecked, as it was fitted."""
        if isinstance(d, Mapping) and "map_exclude" not in d:
            d = {**d, "map_exclude": []}
        if isinstance(d, Mapping) and "bank_density" not in d:
            d = {**d, "bank_density": None}
        if isinstance(d, Mapping) and "bank_density_check" not in d:
            d = {**d, "bank_density_check": False}
        return cls.from_dict(d, where, max_size=None)

    def with_overrides(self, overrides: Mapping[str, Any]) -> DetectorConfig:
        """A copy with some fields replaced (nested mappings merge into nested configs)."""
        base = self.to_dict()
        if "size" in overrides:
            for key in ("preprocess", "rgb"):
                base[key].pop("size", None)
            base["xyz"].pop("grid", None)
        return DetectorConfig.from_dict(merge(base, dict(overrides)))

    @classmethod
    def from_file(cls, path: str | Path) -> DetectorConfig:
        """Read a YAML or JSON config file (keys as in `to_dict`)."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{p}: cannot read config: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config file must hold a mapping of keys to values")
        return cls.from_dict(data, where=str(p))
