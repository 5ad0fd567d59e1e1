"""Batches through a chain of stages on a few worker threads: `staged(batches, stages)`.

Stage 0 takes a batch, each later stage the result of the one before; the last stage's
results come out in batch order. A small pool of worker threads (one per CPU thread the
caller's torch may use, at most one per stage) takes the waiting task of the oldest batch
first, so the stages of different batches overlap (with a reading stage and a model
stage: batch k+1 is read while batch k goes through the model). Numba, numpy, file
decoding and torch release the GIL, so the work spreads over the cores. No result depends
on this: every task is the same function of the same input, and no result depends on
thread counts.

A task that starts while other tasks run or wait beside it gets its share of the threads
(threads // workers: torch's, set per worker thread, and the FPFH kernels',
`cmad.runtime.cpu_threads`); a task that starts alone takes them all (decided when it
starts). With more than one worker, numpy's BLAS runs on one thread until the last batch
is out (`cmad.runtime.one_blas_thread`). At most len(stages) batches are read and not yet
handed out (two batches may be in one stage at once), so memory stays a few batches. An
error of any task is raised when its batch comes up, after the batches before it have
come out.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cmad.runtime import one_blas_thread, stage_threads


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def staged(batches: Sequence[Any], stages: Sequence[Callable[[Any], Any]],
           threads: int) -> Iterator[Any]:
    """The last stage's result for each batch, in order (see the module docstring).
    `threads`: the CPU threads all stages together may use (the pool has
    min(threads, len(stages)) workers; 1 runs everything one task after another)."""
    n, last = len(batches), len(stages) - 1
    if n == 0:
        return
    if not stages:
        raise ValueError("no stages")
    import torch

    caller = torch.get_num_threads()
    threads = max(1, int(threads))
    workers = max(1, min(threads, len(stages)))
    share = max(1, threads // workers)
    cv = threading.Condition()
    stage = [-1] * n          # the last finished stage of each batch
    value: dict[int, Any] = {}
    running: set[int] = set()
    state = {"next": 0, "out": 0, "closed": False, "failed": False}

    def next_task() -> tuple[int, int] | None:
        """(batch, stage) to run next: the oldest batch with a stage to do, else a new one."""
        for k in range(state["out"], state["next"]):
            if k not in running and stage[k] < last:
                return k, stage[k] + 1
        k = state["next"]
        if k < n and not state["failed"] and k - state["out"] < len(stages):
            return k, 0
        return None

    def settle(k: int, j: int, out: Any) -> None:
        """Record batch k's stage j (under the lock); a failure ends the batch."""
        running.discard(k)
        value[k] = out
        failed = isinstance(out, _Failed)
        stage[k] = last if failed else j
        state["failed"] = state["failed"] or failed
        cv.notify_all()

    def work() -> None:
        task: tuple[int, int] | None = None
        try:
            while True:
                with cv:
                    task = None
                    while not state["closed"] and (task := next_task()) is None:
                        cv.wait()
                    if state["closed"]:
                        return
                    k, j = task
                    if j == 0:
                        state["next"] += 1
                    running.add(k)
                    alone = len(running) == 1 and next_task() is None
                    held = batches[k] if j == 0 else value.pop(k)
                try:
                    with stage_threads(threads if alone else share):
                        out: Any = stages[j](held)
                except BaseException as exc:  # noqa: BLE001 - raised when its batch comes up
                    out = _Failed(exc)
                with cv:
                    settle(k, j, out)
                    task = None
        except BaseException as exc:  # noqa: BLE001 - never leave the consumer waiting
            with cv:
                if task is not None:
                    settle(task[0], last, _Failed(exc))
                state["failed"] = True
                cv.notify_all()

    pool = [threading.Thread(target=work, name=f"cmad-stage-{i}", daemon=True)
            for i in range(workers)]
    with one_blas_thread() if workers > 1 else contextlib.nullcontext():
        try:
            for t in pool:
                t.start()
            for k in range(n):
                with cv:
                    while stage[k] < last:
                        cv.wait()
                    out = value.pop(k)
                    state["out"] = k + 1
                    cv.notify_all()
                if isinstance(out, _Failed):
                    raise out.exc
                yield out
        finally:
            with cv:
                state["closed"] = True
                cv.notify_all()
            me = threading.current_thread()
            if me not in pool:  # a generator finalised by the garbage collector on a worker
                for t in pool:
                    if t.is_alive():
                        t.join()
                # every torch.set_num_threads also sets the count that threads started later
                # begin with; the workers' shares must not leak into them
                torch.set_num_threads(caller)
