"""Which samples fit a model: training / validation splits and few-shot selection."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from cmad.errors import ConfigError
from cmad.types import Sample

log = logging.getLogger(__name__)


def select_shots(train: list, shots: int | None, seed: int) -> list:
    """K training items chosen with the seed (all of them when shots is None)."""
    if shots is None:
        return list(train)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
        raise ConfigError(f"--shots must be a positive integer, got {shots!r}")
    if shots >= len(train):
        if shots > len(train):
            log.warning("%d shots asked for, but there are only %d training samples: using all",
                        shots, len(train))
        return list(train)
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(train), size=shots, replace=False).tolist())
    return [train[i] for i in idx]


def _hold_back(train: list, seed: int) -> tuple[list, list]:
    """(train, validation) when there is no validation split: a seeded 20% of `train`
    (samples or references alike) is held back; fewer than 2 items are all kept."""
    if len(train) < 2:
        return train, []
    rng = np.random.default_rng(seed)
    n_val = max(1, len(train) // 5)
    hold = set(rng.choice(len(train), size=n_val, replace=False).tolist())
    log.warning("no validation split: holding back %d training samples for it", n_val)
    return ([s for i, s in enumerate(train) if i not in hold],
            [s for i, s in enumerate(train) if i in hold])


def split_source(source: Any, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples of a Category, or of a list of normal Samples (those with
    split "validation" validate; without any, a seeded 20% of the list is held back)."""
    if hasattr(source, "samples") and callable(source.samples):
        train = source.samples("train")
        has_val = "validation" in getattr(source, "splits", ["validation"])
        val = source.samples("validation") if has_val else []
    else:
        items = list(source)
        if not items or not all(isinstance(s, Sample) for s in items):
            raise ConfigError("fit() takes a cmad.data Category or a non-empty list of Sample")
        bad = [s for s in items if s.label != 0]
        if bad:
            raise ConfigError(f"fit() takes normal samples only; {len(bad)} of the {len(items)} "
                              f"given are anomalous (first: {bad[0].key})")
        train = [s for s in items if s.split != "validation"]
        val = [s for s in items if s.split == "validation"]
    if not val:
        train, val = _hold_back(train, seed)
    return train, val


def split_items(source: Any, seed: int) -> tuple[list, list, Callable[[Any], Sample] | None]:
    """As `split_source`, without reading a Category's files: (train, validation, load)
    where the items are the Category's sample references and `load(ref)` reads one (so a
    caller can read them as it goes); for a list of Samples, the samples and None. The
    held-back validation share of a Category without a validation split is the same
    items `split_source` holds back."""
    if not (hasattr(source, "refs") and callable(source.refs) and hasattr(source, "load")):
        train, val = split_source(source, seed)
        return train, val, None
    # the category's own checks (class ids) before any work; that first sample is kept
    ahead = {s.key: s for s in source.samples("train", limit=1)}
    train = source.refs("train")
    has_val = "validation" in getattr(source, "splits", ["validation"])
    val = source.refs("validation") if has_val else []
    if not val:
        train, val = _hold_back(train, seed)

    def load(ref: Any) -> Sample:
        read = ahead.pop(ref.key, None)
        return read if read is not None else source.load(ref)

    return list(train), list(val), load
