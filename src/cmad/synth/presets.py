"""Size presets (image scale and samples per split) and the list of samples they make."""
from __future__ import annotations

from cmad.errors import ConfigError
from cmad.synth.catalog import COMBINED, DEFECT_TYPES

SIZES: dict[str, dict] = {
    "tiny": {"scale": 0.2, "n_categories": 2, "train": 4, "validation": 2,
             "test_good": 2, "test_per_defect": 1,
             "description": "about 64 x 48 px, 2 categories, 4/2/8 samples: for unit tests"},
    "small": {"scale": 0.5, "n_categories": 3, "train": 12, "validation": 4,
              "test_good": 4, "test_per_defect": 2,
              "description": "about 160 x 120 px, 3 categories, 12/4/16 samples"},
    # `make demo`: full-size images, fewer categories and samples, so that it runs in minutes
    "demo": {"scale": 1.0, "n_categories": 3, "train": 16, "validation": 6,
             "test_good": 6, "test_per_defect": 2,
             "description": "about 320 x 240 px, 3 categories, 16/6/18 samples: `make demo`"},
    "default": {"scale": 1.0, "n_categories": 5, "train": 40, "validation": 10,
                "test_good": 10, "test_per_defect": 5,
                "description": "about 320 x 240 px, 5 categories, 40/10/40 samples"},
    # real-size splits, about those of an MVTec 3D-AD category; test: 22 good and 13 of each
    # of the six defect folders (the default preset's mix with a good share nearer MVTec's)
    "mvtec": {"scale": 1.0, "n_categories": 5, "train": 250, "validation": 25,
              "test_good": 22, "test_per_defect": 13,
              "description": "about 320 x 240 px, 5 categories, 250/25/100 samples: real-size "
                             "splits"},
}

MAX_SAMPLES = 999   # per split folder: file stems are three digits (000.png ...)


def get_preset(size: str) -> dict:
    """The preset called `size`; ConfigError for an unknown name."""
    if size not in SIZES:
        raise ConfigError(f"unknown preset {size!r}; expected one of {list(SIZES)}")
    return SIZES[size]


def split_counts(size: str, train: int | None = None) -> dict:
    """The preset called `size`; with `train`, that many training samples per category
    instead of the preset's count (1..MAX_SAMPLES). ConfigError for bad values."""
    preset = dict(get_preset(size))
    if train is not None:
        if isinstance(train, bool) or not isinstance(train, int) or not 1 <= train <= MAX_SAMPLES:
            raise ConfigError(f"train must be a number of samples in 1..{MAX_SAMPLES}, "
                              f"got {train!r}")
        preset["train"] = train
    return preset


def sample_plan(preset: dict) -> list[tuple[str, str, int]]:
    """Every (split, folder, index) a preset makes, in writing order."""
    jobs = [("train", "good", i) for i in range(preset["train"])]
    jobs += [("validation", "good", i) for i in range(preset["validation"])]
    jobs += [("test", "good", i) for i in range(preset["test_good"])]
    for folder in DEFECT_TYPES + [COMBINED]:
        jobs += [("test", folder, i) for i in range(preset["test_per_defect"])]
    return jobs
