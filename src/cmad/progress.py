"""Progress bars that suit where stderr goes.

`progress(...)` takes tqdm's common arguments. On a terminal it is a tqdm bar that ends at
100% when it closes (a loop that stops early, such as early-stopped training, no longer
leaves a bar part-way: the total becomes the count reached) or vanishes (`leave=False`).
When stderr is not a terminal (a log file, a pipe, CI) there is no bar and no carriage
return: each stage writes one log line when it ends ("train features: 40 samples in
3.2 s"). `enabled=False` (the CLI's `--quiet`) turns both off.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("cmad.progress")


def stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class _Bar(tqdm):
    """tqdm that closes at 100%: a loop that ended early sets the total to the count reached."""

    def close(self) -> None:
        if not self.disable and self.total is not None and self.n < self.total:
            self.total = self.n
            if self.leave:
                self.refresh()
        super().close()


class LogProgress:
    """The bar's interface without a bar: one INFO log line when the stage ends."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", enabled: bool = True) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = 0
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                self.n += 1  # items handed out, so a loop left early counts its last one
                yield item
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        log.info("%s", s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        unit = plural(self.unit, self.n)
        log.info("%s: %d %s in %.1f s%s", self.desc or "done", self.n, unit,
                 time.perf_counter() - self._t0, f" ({self.postfix})" if self.postfix else "")


def plural(unit: str, n: int) -> str:
    """`unit` for a count of `n`: "1 sample", "2 samples", "2 entries", "2 epochs"."""
    if n == 1 or unit.endswith("s"):
        return unit
    if len(unit) > 1 and unit.endswith("y") and unit[-2] not in "aeiou":
        return unit[:-1] + "ies"
    return unit + "s"


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, leave: bool = False,
             **kwargs: Any) -> Any:
    """A progress bar over `iterable` (or one updated by hand up to `total`).

    `enabled=False` shows nothing; on a terminal a tqdm bar (`leave` keeps it when done);
    otherwise one log line per stage. Extra keyword arguments go to tqdm.
    """
    if enabled and stderr_is_terminal():
        return _Bar(iterable, total=total, desc=desc, unit=unit, leave=leave, **kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled)
