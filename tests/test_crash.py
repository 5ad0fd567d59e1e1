"""A model save and a predict killed with SIGKILL at chosen moments.

Each kill point runs tests/crash_worker.py in a subprocess with CMAD_TEST_PAUSE_AT set
(`cmad.runtime.pause_point`): it stops there, the test kills it, then checks that the model
folder is the old or the new model (loads, and is byte-identical to one of them) and that
predict's output folder is whole (the old run or the new one) or absent. A rerun then works
without any manual cleanup and leaves no hidden temporary folder or file behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmad.cli import app
from cmad.data.io import recover_folder
from cmad.errors import OutputError
from cmad.pipeline import Detector

WORKER = Path(__file__).with_name("crash_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _start(tmp: Path, point: str, *args: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp / f"paused-{point.replace(':', '-')}"
    env = dict(os.environ, CMAD_TEST_PAUSE_AT=point, CMAD_TEST_PAUSE_FILE=str(marker),
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return p, marker


def _kill_all(started: list[tuple[subprocess.Popen, Path]], timeout: float = 300.0) -> None:
    """Wait until every process reached its pause point, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    pending = list(started)
    while pending:
        for p, marker in list(pending):
            if marker.exists():
                p.send_signal(signal.SIGKILL)
                p.wait()
                pending.remove((p, marker))
            elif p.poll() is not None:
                out = p.stdout.read().decode() if p.stdout else ""
                pytest.fail(f"worker ended (rc {p.returncode}) before its pause point:\n{out}")
        if time.monotonic() > deadline:
            for p, _ in pending:
                p.kill()
            pytest.fail("workers did not reach their pause points in time")
        time.sleep(0.05)
    for p, _ in started:
        assert p.returncode == -signal.SIGKILL
        if p.stdout:
            p.stdout.close()


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _hidden_siblings(d: Path) -> list[Path]:
    return [p for p in d.parent.iterdir() if p.name.startswith(f".{d.name}.")]


SAVE_POINTS = ("write:before-rename", "save:tensors-written", "save:config-written")


def test_killed_model_save_leaves_old_or_new_model(tiny_models, tmp_path):
    a, b = tiny_models
    cases = {}
    started = []
    for point in SAVE_POINTS:
        dst = tmp_path / point.replace(":", "-") / "model"
        shutil.copytree(a, dst)
        cases[point] = dst
        started.append(_start(tmp_path, point, "save", str(b), str(dst)))
    fresh = tmp_path / "fresh" / "model"  # a first save into a new folder, killed half-way
    fresh.parent.mkdir()
    started.append(_start(fresh.parent, "save:tensors-written", "save", str(b), str(fresh)))
    _kill_all(started)
    want = {"A": _files(a), "B": _files(b)}
    seen = set()
    for point, dst in cases.items():
        Detector.load(dst)  # loads: never a mixed model
        cfg = (dst / "config.json").read_bytes()
        which = next(k for k, f in want.items() if f["config.json"] == cfg)
        meta = json.loads(cfg)
        assert (dst / meta["tensors"]).read_bytes() == want[which][meta["tensors"]]
        seen.add(which)
        # a rerun needs no cleanup and leaves exactly the new model
        Detector.load(b).save(dst)
        assert _files(dst) == want["B"], point
    assert seen == {"A", "B"}  # the kill points cover both outcomes
    # the killed first save left no model (no config.json); the rerun writes it
    assert not (fresh / "config.json").exists()
    Detector.load(b).save(fresh)
    assert _files(fresh) == want["B"]


PREDICT_POINTS = ("predict:sample-written", "folder:built", "folder:old-moved")


def _predict_state(out: Path) -> int | None:
    """None when `out` is absent, else the number of samples of the whole output in it."""
    if not out.exists():
        return None
    scores = json.loads((out / "scores.json").read_text())
    stems = sorted(s["stem"] for s in scores["samples"])
    assert sorted(p.stem for p in (out / "maps").iterdir()) == stems
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == stems
    return len(stems)


def test_killed_predict_leaves_whole_or_absent_output(tiny_root, tiny_models, tmp_path):
    model = tiny_models[0]
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    inp = tmp_path / "input"
    for sub in ("rgb", "xyz"):
        (inp / sub).mkdir(parents=True)
    pairs = sorted((tiny_root / cat / "test").glob("*/rgb/*.png"))[:2]
    for i, rgb in enumerate(pairs):
        shutil.copy(rgb, inp / "rgb" / f"s{i}.png")
        shutil.copy(rgb.parent.parent / "xyz" / f"{rgb.stem}.tiff", inp / "xyz" / f"s{i}.tiff")
    runner = CliRunner()
    outs, started = {}, []
    for point in PREDICT_POINTS:
        out = tmp_path / point.replace(":", "-") / "out"
        r = runner.invoke(app, ["predict", "--model", str(model), "--rgb",
                                str(inp / "rgb" / "s0.png"), "--xyz", str(inp / "xyz" / "s0.tiff"),
                                "--out", str(out), "--quiet", "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert _predict_state(out) == 1  # the old output: one sample
        outs[point] = out
        started.append(_start(tmp_path, point, "predict", str(model), str(inp), str(out)))
    _kill_all(started)
    for point, out in outs.items():
        recover_folder(out)  # what the next run does first
        assert _predict_state(out) in (1, 2), point  # whole: the old or the new output
        assert not _hidden_siblings(out), point
    for out in outs.values():
        r = runner.invoke(app, ["predict", "--model", str(model), "--input", str(inp), "--out",
                                str(out), "--quiet", "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert _predict_state(out) == 2
        assert not _hidden_siblings(out)


def test_failed_evaluate_maps_leave_the_old_maps(tiny_root, tiny_models, tmp_path, monkeypatch):
    """`evaluate --maps` writes each category's folder whole: a failure half-way (here the
    disk "fills" at the third map) leaves the earlier maps as they were, and no temporary
    folder; a rerun then replaces them."""
    import cmad.metrics as metrics

    model = tiny_models[0]
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    maps = tmp_path / "maps"
    argv = ["evaluate", "--model", str(model), "--data", str(tiny_root), "--category", cat,
            "--maps", str(maps), "--threads", "1", "--json"]
    runner = CliRunner()
    assert runner.invoke(app, argv).exit_code == 0
    before = {p: p.read_bytes() for p in sorted(maps.rglob("*.tiff"))}
    assert len(before) > 3
    (maps / "other").mkdir()  # another category's maps are never touched
    (maps / "other" / "keep.txt").write_text("keep")
    real = metrics.write_tiff_atomic
    calls = []

    def full_disk(path, arr):
        calls.append(path)
        if len(calls) == 3:
            raise OutputError(path, "cannot write: No space left on device")
        real(path, arr * 0 + 1)  # different content from the first run

    monkeypatch.setattr(metrics, "write_tiff_atomic", full_disk)
    r = runner.invoke(app, argv)
    assert r.exit_code == 2 and "No space left" in r.output
    assert {p: p.read_bytes() for p in sorted((maps / cat).rglob("*.tiff"))} == before
    assert (maps / "other" / "keep.txt").read_text() == "keep"
    assert not _hidden_siblings(maps / cat)
    monkeypatch.setattr(metrics, "write_tiff_atomic", real)
    assert runner.invoke(app, argv).exit_code == 0
    assert sorted(p for p in (maps / cat).rglob("*.tiff")) == sorted(before)
