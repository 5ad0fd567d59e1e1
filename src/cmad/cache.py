"""The on-disk cache of derived arrays: where it lives and how entries are keyed.

Entries are keyed by the CONTENT of the input files (a hash, memoised per process by path,
size, mtime and inode so a file is read once), by the code version of the stage that made
them and by its settings: a file replaced by another of the same size and mtime, or a change
to the code, never serves a stale entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def default_cache_dir() -> Path:
    """$CMAD_CACHE_DIR, else ~/.cache/cmad."""
    env = os.environ.get("CMAD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cmad"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised while its path, size, mtime and inode stay)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _DIGESTS.get(memo)
    if hit is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        hit = h.hexdigest()
        _DIGESTS[memo] = hit
    return hit


def reader_identity(paths: Any) -> list[str] | None:
    """What else a sample's arrays were computed from (`SamplePaths.reader`, the digests of
    `SamplePaths.extra`), for cache keys; None when nothing (keys without it stay as
    before). OSError if an extra file cannot be read."""
    if not (paths.extra or paths.reader):
        return None
    return [paths.reader, *(file_digest(f) for f in paths.extra)]


def key_of(payload: Any) -> str:
    """A stable hex key of a JSON-able payload."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def entry_path(root: Path, stage: str, key: str, suffix: str = ".safetensors") -> Path:
    """Where the entry `key` of `stage` lives under the cache root."""
    return Path(root) / stage / key[:2] / f"{key}{suffix}"
