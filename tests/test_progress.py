"""Progress output: bars end at 100% or vanish, count samples, and in a log file (stderr not a
terminal) there are no bars and no carriage returns, one line per stage; --quiet is silent."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmad import progress as progress_mod
from cmad.progress import LogProgress, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_early_stopped_bar_closes_at_full(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress(range(40), desc="align", unit="epoch", leave=True, file=err)
    assert not isinstance(bar, LogProgress)
    for i in bar:
        if i == 16:  # early stop
            break
    bar.close()
    assert bar.total == bar.n == 16
    assert "100%" in err.getvalue().split("\r")[-1]


def test_log_file_gets_one_line_per_stage(monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    caplog.set_level(logging.INFO, logger="cmad.progress")
    with progress(total=10, desc="predict", unit="sample") as bar:
        assert isinstance(bar, LogProgress)
        for _ in range(5):
            bar.update(2)            # batches of two samples
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("predict: 10 samples in ")
    caplog.clear()
    quiet = progress(range(3), desc="x", enabled=False)
    assert list(quiet) == [0, 1, 2] and not caplog.records


def test_detector_bars_count_samples(monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """The predict bar counts samples, not batches of `batch_size`."""
    seen = []
    real = progress_mod.progress

    def spy(*args, **kwargs):
        bar = real(*args, **kwargs)
        seen.append((kwargs.get("desc"), bar))
        return bar

    import cmad.pipeline as pipeline

    monkeypatch.setattr(pipeline, "progress_bar", spy)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    from cmad.pipeline import Detector

    det = Detector.__new__(Detector)  # only predict_timed's loop is exercised

    class _Core:
        branches = [object()]
        modalities = ["rgb", "xyz"]

    det.core = _Core()
    det.config = type("C", (), {"batch_size": 4})()
    monkeypatch.setattr(det, "_check_modalities", lambda s: None, raising=False)
    monkeypatch.setattr(det, "prepare", lambda chunk, progress=False: list(chunk), raising=False)

    class _Ext:
        def extract(self, prep):
            return None, {}

    det._extractor = _Ext()
    det.xyz_scale = None  # no unit check
    monkeypatch.setattr(det, "predict_features",
                        lambda fm, prep, branch_maps=True: ([0] * len(prep), {}), raising=False)
    out, _ = det.predict_timed(list(range(10)), progress=True)
    assert len(out) == 10
    desc, bar = seen[-1]
    assert desc == "predict" and bar.n == bar.total == 10


def _cmad(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    with open(tmp / "stderr.log", "wb") as err:  # a file: not a terminal
        return subprocess.run([sys.executable, "-m", "cmad.cli", *args], stdout=subprocess.PIPE,
                              stderr=err, env=env, check=False, timeout=600)


def test_no_carriage_returns_in_a_log_file(tmp_path: Path) -> None:
    r = _cmad(["synth", "--out", str(tmp_path / "d"), "--preset", "tiny", "--categories", "1"],
              tmp_path)
    log = (tmp_path / "stderr.log").read_bytes()
    assert r.returncode == 0, log.decode(errors="replace")
    assert b"\r" not in log
    from cmad.synth.presets import SIZES, sample_plan

    n = len(sample_plan(SIZES["tiny"]))
    assert log.count(b"synth: ") == 1 and f"synth: {n} samples in ".encode() in log
    # --quiet: nothing but the result line (in-process, one training sample: cheap)
    from typer.testing import CliRunner

    from cmad.cli import app

    q = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "q"), "--preset", "tiny",
                                 "--categories", "1", "--train", "1", "--quiet"])
    assert q.exit_code == 0, q.output
    assert q.output.startswith("wrote ") and q.output.count("\n") == 1


def test_stage_lines_use_plural_units() -> None:
    from cmad.progress import plural

    assert [plural(u, n) for u, n in (("sample", 1), ("sample", 3), ("entry", 8820),
                                      ("entry", 1), ("epoch", 40), ("day", 2), ("samples", 2))] \
        == ["sample", "samples", "entries", "entry", "epochs", "days", "samples"]
