"""A session-scoped model fitted on the first tiny synthetic category (imported by conftest:
`from fixture_model import *`), for the tests that only need some saved model (serve, Ray)."""
from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["TINY_FAST", "tiny_model"]

# fast settings: 64 px, small banks, 3 alignment epochs; batches of 2 so that 8 test samples
# make several batches
TINY_FAST = {"size": 64, "bank_min_entries": 16, "batch_size": 2, "align": {"epochs": 3, "hidden": 32}}


@pytest.fixture(scope="session")
def tiny_model(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, its category folder in tiny_root)."""
    from cmad.data import open_dataset
    from cmad.model.config import DetectorConfig
    from cmad.pipeline import Detector

    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    det = Detector(DetectorConfig().with_overrides(TINY_FAST))
    det.fit(open_dataset(tiny_root).category(cat), progress=False)
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    det.save(out)
    return out, tiny_root / cat
