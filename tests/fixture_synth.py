"""Session-scoped synthetic datasets for tests (imported by conftest: `from fixture_synth import *`).

`tiny_root`: 2 categories of about 64 x 48 px, 4 train / 2 validation / 8 test samples each.
`small_root`: 3 categories of about 160 x 120 px, 12 / 4 / 16 samples each.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cmad.synth import generate

__all__ = ["small_root", "tiny_root"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset in the MVTec 3D-AD layout (seed 0)."""
    return generate(tmp_path_factory.mktemp("synth_tiny"), size="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the MVTec 3D-AD layout (seed 0)."""
    return generate(tmp_path_factory.mktemp("synth_small"), size="small", seed=0,
                    progress=False)
