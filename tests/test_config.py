"""Typed, frozen configs checked at the door: every bad key or value names the file and key."""
import dataclasses

import pytest

from cmad.errors import ConfigError
from cmad.model.config import DetectorConfig


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_nested_configs_are_typed_frozen_values():
    cfg = DetectorConfig.from_dict({"size": 128, "align": {"epochs": 3},
                                    "preprocess": {"plane_threshold": 0.004}})
    assert cfg.align.epochs == 3 and cfg.align.variant == "latent"  # defaults kept
    assert cfg.preprocess.size == cfg.rgb.size == 128 and cfg.xyz.grid == (16, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.size = 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.align.epochs = 5  # type: ignore[misc]


def test_round_trip_through_plain_dicts():
    cfg = DetectorConfig.from_dict({"branches": ["rgb_bank"], "weights": {"rgb_bank": 1.0},
                                    "xyz": {"feature_radius": 0.007}})
    again = DetectorConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("text,key", [
    ("sizee: 224", "sizee"),
    ("align: {epoch: 3}", "align.epoch"),
    ("preprocess: {plane_treshold: 0.005}", "preprocess.plane_treshold"),
    ("xyz: {radius: 1}", "xyz.radius"),
    ("rgb: {backbone: 3}", "rgb.backbone"),
    ("threshold: high", "threshold"),
    ("bank_fraction: lots", "bank_fraction"),
    ("bank_fraction: 2", "bank_fraction"),
    ("branches: align", "branches"),
    ("branches: []", "branches"),
    ("branches: [align, nope]", "nope"),
    ("size: 100", "size"),
    ("seed: -1", "seed"),
    ("align_float16: maybe", "align_float16"),
    ("align: {epochs: 2.5}", "align.epochs"),
    ("preprocess: {size: 64}", "preprocess.size"),
    ("xyz: {grid: [7, 7]}", "xyz.grid"),
    ("weights: {rgb_bank: x}", "weights"),
    ("weights: {not_used: 1.0}", "not_used"),
    ("[1, 2]", "mapping"),
])
def test_bad_config_files_name_the_file_and_the_key(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        DetectorConfig.from_file(p)
    msg = str(err.value)
    assert str(p) in msg and key in msg, msg


def test_unreadable_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        DetectorConfig.from_file(tmp_path / "missing.yaml")
    p = _write(tmp_path, "a: [1,")
    with pytest.raises(ConfigError, match=str(p)):
        DetectorConfig.from_file(p)


def test_with_overrides_merges_nested_values():
    cfg = DetectorConfig().with_overrides({"align": {"hidden": 32}, "seed": 4})
    assert cfg.align.hidden == 32 and cfg.align.variant == "latent" and cfg.seed == 4
    small = cfg.with_overrides({"size": 64})
    assert small.rgb.size == 64 and small.xyz.grid == (8, 8)


def test_working_size_limit_is_for_new_configs_only() -> None:
    from cmad.model.config import DetectorConfig

    with pytest.raises(ConfigError, match="from 32 to 1024"):
        DetectorConfig.from_dict({"size": 1280})
    with pytest.raises(ConfigError, match="from 32 to 1024"):
        DetectorConfig().with_overrides({"size": 100000})
    # a model fitted at a larger size before the limit existed still loads
    assert DetectorConfig.from_saved({"size": 1280}).size == 1280
    assert DetectorConfig.from_dict({"size": 1024}).size == 1024
