"""Where independent jobs run: in this process (`local`), or on a Ray cluster (`ray`).

Ray is an optional extra (`pip install 'cmad[ray]'`) and is imported only when asked for.
`address=None` starts a private Ray instance on this machine (stopped afterwards);
`address="auto"` or `"HOST:6379"` joins a running cluster (`ray start --head` on one node,
`ray start --address HOST:6379` on the others), whose nodes must have this cmad installed
and see the data, model and output paths at the same place (a shared file system).

Results come back in job order, whatever order the jobs finish in, so a run on Ray is the
local run's, job for job.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cmad.errors import CmadError, ConfigError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


def check_executor(executor: str, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if address is not None and executor != "ray":
        raise ConfigError("--address is for --executor ray")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'cmad[ray]'") from None
    return ray


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a HOST:PORT where nothing listens (ray.init would wait a long time, silently)."""
    import socket

    if "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--address {address}: expected auto or HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there "
                          f"({exc.strerror or exc}); start one with `ray start --head`") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """The `ray` module, connected: to `address`, or to a private local instance (with
    `num_cpus` CPUs; None: all) that is shut down on exit. An already connected session
    (ray.init called by the caller) is used as it is."""
    ray = _import_ray()
    own = not ray.is_initialized()
    if own:
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address is None:
            kw["num_cpus"] = num_cpus
        else:
            _probe(address)
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({exc})") from None
    try:
        yield ray
    finally:
        if own:
            ray.shutdown()


class _Failed:
    """A user error (CmadError, OSError) raised in a worker, sent back as a value: raised
    there, Ray would print the worker's traceback and wrap the error in its own."""

    def __init__(self, exc: BaseException) -> None:
        self.kind = type(exc)
        self.message = str(exc)

    def error(self) -> BaseException:
        if issubclass(self.kind, OSError):
            return OSError(self.message)
        try:  # DataError, ModelFormatError, OutputError take (path, problem)
            return self.kind(None, self.message)
        except TypeError:
            return self.kind(self.message)


def _guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (CmadError, OSError) as exc:
        return _Failed(exc)


def _get(ray, refs: list, on_done: Callable[[], None] | None) -> list:
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for r in ray.get(done):
            if isinstance(r, _Failed):  # the worker's clear message, not a remote traceback
                raise r.error()
        if on_done is not None:
            on_done()
    return ray.get(refs)


def map_tasks(ray, fn: Callable[..., Any], jobs: Sequence[dict], cpus_per_task: float = 1,
              on_done: Callable[[], None] | None = None) -> list:
    """`fn(**job)` for every job as Ray tasks (`fn` must be importable by the workers: a
    module-level function); the results in job order."""
    remote = ray.remote(num_cpus=cpus_per_task, max_retries=0)(_guarded)
    return _get(ray, [remote.remote(fn, **job) for job in jobs], on_done)


class _Worker:
    """A Ray actor's body: builds its state once (`init(*args)`, a loaded model say), then
    applies `fn(state, item)` to each item it is given."""

    def __init__(self, init: Callable[..., Any], args: tuple) -> None:
        self.state = _guarded(init, *args)

    def run(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        if isinstance(self.state, _Failed):
            return self.state
        return _guarded(fn, self.state, item)


def map_with_state(ray, init: Callable[..., Any], init_args: tuple, fn: Callable[[Any, Any], Any],
                   items: Sequence[Any], workers: int | None = None, cpus_per_worker: float = 1,
                   on_done: Callable[[], None] | None = None) -> list:
    """`fn(state, item)` for every item on a pool of Ray actors, each of which builds its
    `state = init(*init_args)` once; the results in item order. `workers`: the number of
    actors (None: as many as the cluster's CPUs allow, at most one per item)."""
    if not items:
        return []
    if workers is None:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        workers = max(1, int(cpus // max(cpus_per_worker, 1e-9)))
    workers = max(1, min(int(workers), len(items)))
    actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(_Worker)
    pool = [actor.remote(init, init_args) for _ in range(workers)]
    # round robin: item i on actor i % workers; each actor runs its items in order
    refs = [pool[i % workers].run.remote(fn, item) for i, item in enumerate(items)]
    try:
        return _get(ray, refs, on_done)
    finally:
        for a in pool:
            ray.kill(a)
