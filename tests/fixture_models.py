"""Session-scoped tiny fitted models (imported by conftest: `from fixture_models import *`).

`tiny_models`: (A, B), two model folders fitted on the first category of `tiny_root` with the
fast test config; B keeps more bank entries, so its tensors differ from A's.
"""
from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["FAST_CONFIG", "tiny_models"]

FAST_CONFIG = "size: 64\nbank_min_entries: 16\nalign:\n  epochs: 3\n  hidden: 32\n"


@pytest.fixture(scope="session")
def tiny_models(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import yaml

    from cmad.data import open_dataset
    from cmad.model.config import DetectorConfig
    from cmad.pipeline import Detector

    cat = open_dataset(tiny_root).category(sorted(p.name for p in tiny_root.iterdir()
                                                  if p.is_dir())[0])
    out = tmp_path_factory.mktemp("tiny-models")
    base = DetectorConfig.from_dict(yaml.safe_load(FAST_CONFIG))
    cache = out / "cache"
    paths = []
    for name, over in (("A", {}), ("B", {"bank_min_entries": 24})):
        det = Detector(base.with_overrides(over), cache_dir=cache).fit(cat, progress=False)
        paths.append(det.save(out / name))
    return paths[0], paths[1]
