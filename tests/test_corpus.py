"""The bad-input corpus (tests/corpus.py) through the command line, in-process.

Every case must give its exit code; an error must print `error: ...` naming the file, folder
or option at fault, and no traceback; a warned success must log its warning; and every file
the case started with (its own inputs, the shared dataset and model) must be byte-identical
afterwards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmad.cli import app
from corpus import CASES, KINDS, Env

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tiny_root, tiny_models) -> Env:
    cats = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())
    return Env(root=tiny_root, category=cats[0], other=cats[1], model=tiny_models[0])


def _hashes(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[Path, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if any(p == s or s in p.parents for s in skip):
                continue
            if p.is_symlink() or not p.is_file():
                out[p] = "link" if p.is_symlink() else "dir"
                continue
            out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_corpus_size():
    assert len(CASES) >= 80
    assert len({(c.kind, c.name) for c in CASES}) == len(CASES)
    assert set(KINDS) >= {"cli", "config", "model"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_case(case, env, tmp_path, caplog):
    d = tmp_path / "case"
    d.mkdir()
    argv = case.build(env, d)
    skip = tuple(d / o for o in case.outputs)
    before = _hashes(d, env.root, env.model, skip=skip)
    caplog.set_level(logging.WARNING)
    r = runner.invoke(app, argv)
    out = r.output
    assert r.exit_code == case.code, f"{argv}\n{out}\n{r.exception!r}"
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in out
    if case.code == 2:
        assert "error: " in out or "Error" in out, out  # ours, or click's usage error
        for name in case.names:
            assert name.format(d=d) in out, f"{name!r} not named in:\n{out}"
    if case.warn is not None:
        assert case.warn in caplog.text, caplog.text
    after = _hashes(d, env.root, env.model, skip=skip)
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f"inputs modified or removed: {changed}"
    if case.code == 0 and argv[0] == "predict":
        assert (d / "out" / "scores.json").is_file()
    # a clean exit leaves no temporary file behind
    leftovers = [p for p in d.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    assert not leftovers, leftovers


def test_scoring_refuses_nan_instead_of_calling_it_normal(env):
    """Whatever slips past the readers, a NaN score is an error naming the sample's file."""
    from cmad.data import open_dataset
    from cmad.errors import DataError
    from cmad.pipeline import Detector

    det = Detector.load(env.model)
    sample = open_dataset(env.root).category(env.category).samples("test")[0]
    prep = det.prepare([sample])
    fm, _ = det.extractor.extract(prep)
    preds, _ = det.predict_features(fm, prep)
    assert np.isfinite(preds[0].score)
    for t in fm.feats.values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    with pytest.raises(DataError, match="cannot be scored") as err:
        det.predict_features(fm, prep)
    assert str(sample.paths.xyz) in str(err.value)


def test_unit_check_uses_the_training_clouds_scale(env):
    from cmad.data import open_dataset
    from cmad.errors import DataError
    from cmad.pipeline import Detector

    det = Detector.load(env.model)
    lo, hi = det.xyz_scale
    assert 0 < lo <= hi < 10  # metres
    sample = open_dataset(env.root).category(env.category).samples("test")[0]
    det._check_units([sample])  # same unit: fine
    mm = dataclasses.replace(sample, xyz=sample.xyz * 1000)
    with pytest.raises(DataError, match="different unit"):
        det._check_units([mm])
