"""Process-wide runtime settings: how many CPU threads every stage may use.

`set_threads(n)` reaches torch (the CNN, the banks, the alignment), the FPFH kernels
(whose own `threads` setting, when None, follows this limit) and numpy's and scipy's BLAS
(OpenBLAS, through threadpoolctl). Results do not depend on it. `stage_threads(n)` gives
one pipeline stage's thread its share of them; `one_blas_thread()` keeps BLAS on one
thread while stages run side by side.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_LIMIT: int | None = None
# what the first limit replaced: torch's thread count, and every BLAS limiter made since
# (each restores the libraries loaded when it was made, so one loaded later is restored
# too); `set_threads(None)` puts them back, newest first
_DEFAULTS: tuple[int, list] | None = None
# `one_blas_thread`: how many blocks are inside it, and the limiter the first one set
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMITER = None
# Per thread: the threads a pipeline stage running in it may use (`stage_threads`).
_SHARE = threading.local()


def set_threads(threads: int | None) -> None:
    """Limit every stage to `threads` CPU threads; None gives torch and BLAS back the thread
    counts they had before the first limit (the library defaults). Not meant to be called
    while a stream runs: its one BLAS thread (`one_blas_thread`) would be overridden."""
    global _LIMIT, _DEFAULTS
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    _LIMIT = threads
    if threads is None:
        if _DEFAULTS is not None:
            import torch

            torch_threads, limiters = _DEFAULTS
            _DEFAULTS = None
            torch.set_num_threads(torch_threads)
            for blas in reversed(limiters):
                blas.restore_original_limits()
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch_before = torch.get_num_threads()
    blas = threadpool_limits(limits=threads, user_api="blas")
    if _DEFAULTS is None:
        _DEFAULTS = (torch_before, [])
    _DEFAULTS[1].append(blas)
    torch.set_num_threads(threads)


def thread_limit() -> int | None:
    """The limit set by `set_threads`, or None."""
    return _LIMIT


def cpu_threads() -> int:
    """The threads the calling thread may use now: its share while pipeline stages run side
    by side (`stage_threads`), else the limit set by `set_threads`, else the CPUs this
    process may use."""
    share = getattr(_SHARE, "n", None)
    if share is not None:
        return share
    if _LIMIT is not None:
        return _LIMIT
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def stage_threads(n: int) -> Iterator[None]:
    """Run the block on `n` threads in the calling thread only: torch's thread count (each
    OS thread has its own, but every `torch.set_num_threads` also sets the count threads
    started later begin with, which `cmad.stages` sets back afterwards) and the FPFH
    kernels' (`cpu_threads`), both restored on exit. For pipeline stages that run side by
    side in threads of their own (`cmad.stages`). Results do not depend on thread counts."""
    import torch

    before_torch, before_share = torch.get_num_threads(), getattr(_SHARE, "n", None)
    if before_torch != n:
        torch.set_num_threads(n)
    _SHARE.n = n
    try:
        yield
    finally:
        _SHARE.n = before_share
        if before_torch != n:
            torch.set_num_threads(before_torch)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's and scipy's BLAS (OpenBLAS) on one thread in the block, process-wide, then
    back. While pipeline stages run side by side each already has its share of the cores,
    and OpenBLAS's own threads (which spin while they wait) took them from the others: the
    stream ran 20% slower with them (RESULTS.md, round 14). Torch's threads are not BLAS
    threads here and keep their shares."""
    from threadpoolctl import threadpool_limits

    global _BLAS_LIMITER, _BLAS_USERS
    with _BLAS_LOCK:  # streams side by side: the first sets the limit, the last restores it
        if _BLAS_USERS == 0:
            _BLAS_LIMITER = threadpool_limits(limits=1, user_api="blas")
        _BLAS_USERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0 and _BLAS_LIMITER is not None:
                _BLAS_LIMITER.restore_original_limits()
                _BLAS_LIMITER = None


def pause_point(name: str) -> None:
    """A test hook for crash tests: when the environment variable CMAD_TEST_PAUSE_AT equals
    `name`, write `name` to the file CMAD_TEST_PAUSE_FILE and sleep, so that a test can kill
    the process at exactly this point. Does nothing otherwise."""
    import os

    if os.environ.get("CMAD_TEST_PAUSE_AT") != name:
        return
    import time
    from pathlib import Path

    Path(os.environ["CMAD_TEST_PAUSE_FILE"]).write_text(name)
    time.sleep(float(os.environ.get("CMAD_TEST_PAUSE_S", "600")))
