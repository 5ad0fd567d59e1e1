"""`DetectorCore._fit_branches`: the banks' fits wait in a queue that worker threads and
the main thread (once the other branches are fitted) take from, never more threads busy
than the limit, every branch fitted once, an error raised where the fit was called."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from cmad.model.config import DetectorConfig
from cmad.model.core import DetectorCore, FitReport
from cmad.runtime import set_threads, thread_limit


class _Fake:
    """Records which thread fitted it, when, and how many fits ran at once."""

    def __init__(self, name: str, side: bool, seconds: float, log: dict, fail: bool = False,
                 started: threading.Event | None = None, wait: threading.Event | None = None):
        self.name, self.fit_in_thread, self.seconds, self.log, self.fail = name, side, seconds, log, fail
        self.started, self.wait = started, wait   # set when this fit starts; waited on first
        self.info: dict = {}

    def fit(self, train, val, progress=False):  # noqa: ANN001, ANN201
        log = self.log
        with log["lock"]:
            log["busy"] += 1
            log["peak"] = max(log["peak"], log["busy"])
            log["start"][self.name] = time.perf_counter()
            log["thread"][self.name] = threading.current_thread().name
            log["torch_threads"].add(torch.get_num_threads())
        if self.started is not None:
            self.started.set()
        try:
            if self.wait is not None:
                assert self.wait.wait(30), f"{self.name}: waited in vain"
            time.sleep(self.seconds)
            if self.fail:
                raise RuntimeError(f"{self.name} failed")
        finally:
            with log["lock"]:
                log["busy"] -= 1
                log["end"][self.name] = time.perf_counter()


def _log() -> dict:
    return {"lock": threading.Lock(), "busy": 0, "peak": 0, "start": {}, "end": {},
            "thread": {}, "torch_threads": set()}


@pytest.fixture
def limit():
    before, torch_before = thread_limit(), torch.get_num_threads()
    yield set_threads
    set_threads(before)
    torch.set_num_threads(torch_before)


def _fit(branches) -> FitReport:  # noqa: ANN001
    core = DetectorCore(DetectorConfig())
    core.branches = branches
    report = FitReport()
    core._fit_branches(None, None, report, progress=False)
    return report


def test_main_thread_takes_a_queued_bank_once_its_own_branch_is_fitted(limit):
    limit(2)
    torch.set_num_threads(2)
    log = _log()
    joint_started = threading.Event()   # the mapping ends only once the worker has the bank
    branches = [_Fake("mapping", False, 0.05, log, wait=joint_started),
                _Fake("joint", True, 0.6, log, started=joint_started), _Fake("rgb", True, 0.3, log)]
    report = _fit(branches)
    assert sorted(report.branch_fit_s) == ["joint", "mapping", "rgb"]
    assert set(report.branch_info) == {"joint", "mapping", "rgb"}
    # the worker takes the first bank; the main thread fits the mapping, then the second
    # bank while the first is still running (before, it waited for the worker's turn)
    assert log["thread"]["mapping"] == log["thread"]["rgb"] == threading.current_thread().name
    assert log["thread"]["joint"].startswith("cmad-fit")
    assert log["start"]["rgb"] < log["end"]["joint"]
    assert log["peak"] == 2
    assert log["torch_threads"] == {1}
    assert torch.get_num_threads() == 2  # restored


def test_never_more_fits_at_once_than_the_thread_limit(limit):
    limit(3)
    log = _log()
    branches = [_Fake("a", False, 0.05, log)] + [_Fake(f"bank{i}", True, 0.15, log) for i in range(5)]
    report = _fit(branches)
    assert len(report.branch_fit_s) == 6
    assert log["peak"] == 3


def test_one_thread_fits_in_turn(limit):
    limit(1)
    log = _log()
    branches = [_Fake("m", False, 0.01, log), _Fake("b1", True, 0.01, log), _Fake("b2", True, 0.01, log)]
    _fit(branches)
    assert log["peak"] == 1
    assert set(log["thread"].values()) == {threading.current_thread().name}
    assert log["start"]["m"] < log["start"]["b1"] < log["start"]["b2"]


def test_a_failed_bank_fit_is_raised_and_the_thread_count_restored(limit):
    limit(2)
    torch.set_num_threads(2)
    log = _log()
    branches = [_Fake("m", False, 0.01, log), _Fake("b1", True, 0.05, log, fail=True),
                _Fake("b2", True, 0.05, log)]
    with pytest.raises(RuntimeError, match="b1 failed"):
        _fit(branches)
    assert torch.get_num_threads() == 2


def test_a_failed_main_lane_starts_no_further_bank(limit):
    limit(2)
    log = _log()
    b1_started = threading.Event()
    branches = [_Fake("m", False, 0.05, log, fail=True, wait=b1_started),
                _Fake("b1", True, 0.3, log, started=b1_started),
                _Fake("b2", True, 0.01, log), _Fake("b3", True, 0.01, log)]
    with pytest.raises(RuntimeError, match="m failed"):
        _fit(branches)
    # b1 was running in the worker; the queue was emptied before it finished
    assert "b1" in log["end"] and "b2" not in log["start"] and "b3" not in log["start"]


def test_a_failed_bank_in_a_worker_starts_no_further_bank(limit):
    limit(2)
    log = _log()
    b1_started = threading.Event()
    branches = [_Fake("m", False, 0.3, log, wait=b1_started),
                _Fake("b1", True, 0.01, log, fail=True, started=b1_started),
                _Fake("b2", True, 0.01, log), _Fake("b3", True, 0.01, log)]
    with pytest.raises(RuntimeError, match="b1 failed"):
        _fit(branches)
    # the main thread was still fitting m when b1 failed: nobody took b2 or b3 after it
    assert "m" in log["end"] and "b2" not in log["start"] and "b3" not in log["start"]
