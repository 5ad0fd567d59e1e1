"""Atomic writers: outputs get the mode the umask gives, and no temporary file is left."""
from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cmad.data.io import write_atomic, write_bytes_atomic, write_png_atomic, write_tiff_atomic


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _safetensors(path: Path) -> None:
    write_atomic(path, lambda tmp: save_file({"w": torch.arange(6, dtype=torch.float32)}, str(tmp)))


WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "bytes": ("a.json", lambda p: write_bytes_atomic(p, b'{"a": 1}\n')),
    "tiff": ("a.tiff", lambda p: write_tiff_atomic(p, np.ones((4, 5, 3), np.float32))),
    "png": ("a.png", lambda p: write_png_atomic(p, np.full((4, 5), 7, np.uint8))),
    "png_level": ("b.png", lambda p: write_png_atomic(p, np.zeros((4, 5, 3), np.uint8), compress_level=1)),
    "safetensors": ("model.safetensors", _safetensors),
    "text": ("r.md", lambda p: write_atomic(p, lambda tmp: tmp.write_text("# r\n"))),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_atomic_writers_give_umask_mode(tmp_path: Path, umask: int, kind: str) -> None:
    name, write = WRITERS[kind]
    path = tmp_path / "out" / name
    write(path)
    assert _mode(path) == 0o666 & ~umask, oct(_mode(path))
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_overwrite_of_private_file_gets_umask_mode(tmp_path: Path, umask: int, kind: str) -> None:
    name, write = WRITERS[kind]
    path = tmp_path / name
    path.write_bytes(b"old")
    path.chmod(0o600)
    write(path)
    assert _mode(path) == 0o666 & ~umask
    assert path.read_bytes() != b"old"


def test_written_contents_read_back(tmp_path: Path) -> None:
    arr = np.arange(60, dtype=np.float32).reshape(4, 5, 3)
    write_tiff_atomic(tmp_path / "x.tiff", arr)
    assert np.array_equal(tifffile.imread(tmp_path / "x.tiff"), arr)
    img = np.arange(20, dtype=np.uint8).reshape(4, 5)
    write_png_atomic(tmp_path / "x.png", img)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), img)
    _safetensors(tmp_path / "m.safetensors")
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["w"], torch.arange(6, dtype=torch.float32))


def test_failed_write_leaves_target_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "keep.txt"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
