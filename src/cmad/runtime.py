"""Process-wide runtime settings: how many CPU threads every stage may use.

`set_threads(n)` reaches torch (the CNN, the banks, the alignment) and the FPFH kernels
(whose own `threads` setting, when None, follows this limit). Results do not depend on it.
"""
from __future__ import annotations

_LIMIT: int | None = None


def set_threads(threads: int | None) -> None:
    """Limit every stage to `threads` CPU threads (None: the library defaults)."""
    global _LIMIT
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    _LIMIT = threads
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def thread_limit() -> int | None:
    """The limit set by `set_threads`, or None."""
    return _LIMIT


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
