"""Reading and writing the files of an MVTec 3D-AD style dataset.

Every reader turns a failure deep inside PIL or tifffile into a `DataError` that names the
file and what is wrong with it. Writers are atomic: a temporary file in the target folder,
then `os.replace`, so a reader never sees a half-written file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from cmad.errors import DataError, OutputError
from cmad.runtime import pause_point

logger = logging.getLogger(__name__)

__all__ = [
    "image_size",
    "read_gt",
    "read_rgb",
    "clean_cloud",
    "read_xyz",
    "png_bytes",
    "tiff_bytes",
    "write_atomic",
    "write_bytes_atomic",
    "write_png_atomic",
    "write_tiff_atomic",
    "atomic_folder",
    "recover_folder",
]


def _open_image(path: Path, data: bytes | None = None) -> Image.Image:
    if data is None and not path.is_file():
        raise DataError(path, "file not found")
    src = path if data is None else io.BytesIO(data)
    try:
        img = Image.open(src)
        img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many unrelated types for a bad file
        # PIL names a stream by its repr: name the file instead, as for a path
        msg = str(exc).replace(repr(src), repr(str(path))) if data is not None else str(exc)
        raise DataError(path, f"unreadable image ({type(exc).__name__}: {msg})") from None
    return img


def _to_uint8(arr: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Bring a 16- or 32-bit integer image to 8 bits by its bit depth (`bits`, where the
    file says it; else from the dtype, and for 32-bit values from their range)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        bits = 16
    arr = np.clip(arr, 0, None).astype(np.int64)
    if bits is None:
        # 32-bit mode "I" of unknown depth: 8-bit values stay, larger ones are read as
        # 16-bit (or by their own width past that), never clipped to white
        top = int(arr.max()) if arr.size else 0
        bits = 8 if top <= 0xFF else 16 if top <= 0xFFFF else top.bit_length()
    return (arr >> max(0, bits - 8)).clip(0, 255).astype(np.uint8)


def read_rgb(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Read an image as uint8 (H, W, 3); grey, palette and RGBA images are converted to RGB.

    `data`: the file's bytes (an upload, say), decoded instead of reading `path`, which then
    only names the file in errors.
    """
    path = Path(path)
    img = _open_image(path, data)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # a PNG in mode "I" is a 16-bit one (older Pillow opens them so)
        grey = _to_uint8(np.asarray(img), 16 if img.format == "PNG" else None)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any PIL failure is a bad file
            raise DataError(path, f"cannot convert image mode {img.mode} to RGB: {exc}") from None
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(path, f"expected an H x W x 3 image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def read_gt(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as uint8 (H, W), keeping its per-pixel values.

    Mode L is read as is; for a colour mask the maximum over the colour channels is taken
    (alpha ignored); a 1-bit mask becomes 0/255; palette masks keep their indices.
    """
    path = Path(path)
    img = _open_image(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        channels = arr.shape[2]
        arr = arr[:, :, :3].max(axis=2) if channels >= 3 else arr[:, :, 0]
    if arr.ndim != 2:
        raise DataError(path, f"expected a 2-D mask, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype != np.bool_ and arr.size and int(arr.max()) <= 255 and int(arr.min()) >= 0:
            arr = arr.astype(np.uint8)
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        else:
            arr = (arr > 0).astype(np.uint8) * 255
    return np.ascontiguousarray(arr)


# Coordinates beyond this many metres from the origin are never a real point.
MAX_ABS_COORD = 1e6
# A point farther from the cloud's median than this many times the median distance of the
# points to it is a far outlier (a sensor glitch such as a finite 1e30), not part of the scene.
FAR_FACTOR = 100.0
# the far-outlier test's median and spread come from at most this many evenly spaced valid
# points: an estimate within a few percent, against a factor of FAR_FACTOR. 4,096 instead of
# 65,536 made reading a 320 x 240 cloud 6.6 -> 2.3 ms (RESULTS.md, round 13)
MEDIAN_POINTS = 1 << 12



def read_sample_gt(path: Path | None, size: tuple[int, int], image: Path,
                   label: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(bool defect mask, its per-pixel values or None) of one sample: its gt file checked
    against the (H, W) `size` of its `image`, or an empty mask when it has none; a warning
    when the mask disagrees with the label."""
    gt_values: np.ndarray | None = None
    if path is not None:
        gt_values = read_gt(path)
        if gt_values.shape != size:
            raise DataError(path, f"size {gt_values.shape[1]}x{gt_values.shape[0]} (W x H) "
                                  f"differs from {image.name} {size[1]}x{size[0]}")
        gt = gt_values > 0
    else:
        gt = np.zeros(size, dtype=bool)
    if label == 1 and not gt.any():
        logger.warning("%s: defect sample with an empty gt mask", path)
    elif label == 0 and gt.any():
        logger.warning("%s: normal sample with defect pixels in its gt mask", path)
    return gt, gt_values

def clean_cloud(xyz: np.ndarray, valid: np.ndarray, path: str | Path | None) -> None:
    """Mark far outliers invalid in place (set to exactly 0) and refuse a cloud without any
    valid point.

    Far outliers are coordinates beyond `MAX_ABS_COORD` metres, and points farther from the
    per-axis median of the valid points than `FAR_FACTOR` times the median distance of the
    valid points to it (both medians over at most `MEDIAN_POINTS` evenly spaced points).
    One warning per file (with the NaN/inf count of `read_xyz`)."""
    if not valid.any():
        raise DataError(path, "point cloud has no valid point (all NaN, inf or zero)")
    flat = xyz.reshape(-1, 3)
    # a coordinate beyond MAX_ABS_COORD: point by point only if the whole array's extremes
    # (invalid points included, which can only make this check run) go beyond it
    with np.errstate(invalid="ignore"):
        hi = max(-float(np.nanmin(xyz)), float(np.nanmax(xyz)))
    far = np.zeros(valid.shape, dtype=bool)
    if not hi <= MAX_ABS_COORD:
        with np.errstate(invalid="ignore"):
            far = valid & (np.abs(xyz) > MAX_ABS_COORD).any(axis=2)
    # the median and the spread on at most MEDIAN_POINTS evenly spaced valid points (an
    # estimate; tests/test_data.py checks that it marks the points exact medians mark), the
    # distances in float32 over the whole grid: with exact medians and gathers of the valid
    # points, reading an 800 x 720 cloud took 303 ms, of which the TIFF itself 4 ms
    keep = np.flatnonzero((valid & ~far).ravel())
    if len(keep):
        sub = flat[keep[:: -(-len(keep) // MEDIAN_POINTS)]].astype(np.float64)
        centre = np.median(sub, axis=0)
        spread = float(np.median(np.sqrt(((sub - centre) ** 2).sum(axis=1))))
        limit = np.float32((FAR_FACTOR * max(spread, 1e-9)) ** 2)
        d2 = np.zeros(valid.shape, dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            for k in range(3):
                t = xyz[..., k] - np.float32(centre[k])
                t *= t
                d2 += t
            far |= valid & (d2 > limit)
    n_far = int(np.count_nonzero(far))
    if n_far:
        valid &= ~far
        xyz[far] = 0.0
        logger.warning("%s: %d far outlier points (beyond %g m, or %g times the cloud's median "
                       "spread from its median) marked invalid", path, n_far, MAX_ABS_COORD,
                       FAR_FACTOR)
    if not valid.any():
        raise DataError(path, "point cloud has no valid point (all NaN, inf, zero or far "
                              "outliers)")


def read_xyz(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an organized point cloud TIFF as (xyz float32 (H, W, 3), valid bool (H, W)).

    NaN and inf points are invalid (one warning per file), and so are all-zero points and
    far outliers (`clean_cloud`); every invalid point is set to exactly (0, 0, 0). A cloud
    without any valid point is a `DataError`. `data`: as for `read_rgb`.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise DataError(path, "file not found")
    try:
        arr = tifffile.imread(path if data is None else io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a bad file
        raise DataError(path, f"unreadable TIFF ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(path, f"expected an H x W x 3 point cloud, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(path, f"expected float coordinates in metres, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(path, f"empty point cloud of shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        xyz = np.ascontiguousarray(arr, dtype=np.float32)
    # per axis (strided views) rather than reductions over the short last axis: faster
    finite = np.isfinite(xyz[..., 0]) & np.isfinite(xyz[..., 1]) & np.isfinite(xyz[..., 2])
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad:
        logger.warning("%s: %d NaN/inf points marked invalid", path, n_bad)
    with np.errstate(invalid="ignore"):
        nonzero = (xyz[..., 0] != 0) | (xyz[..., 1] != 0) | (xyz[..., 2] != 0)
    valid = finite & nonzero
    xyz[~valid] = 0.0
    clean_cloud(xyz, valid, path)
    return xyz, valid


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of a PNG/JPEG or TIFF, read from the header only (the pixels are not decoded).

    For a TIFF the shape must be H x W x 3; anything else raises `DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(int(s) for s in series.shape)
        except Exception as exc:  # noqa: BLE001 - any tifffile failure is a bad file
            raise DataError(path, f"unreadable TIFF ({type(exc).__name__}: {exc})") from None
        if len(shape) != 3 or shape[2] != 3:
            raise DataError(path, f"expected an H x W x 3 point cloud, got shape {shape}")
        return shape[0], shape[1]
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as exc:  # noqa: BLE001 - any PIL failure is a bad file
        raise DataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from None
    return int(h), int(w)


def _create_temp_beside(path: Path) -> tuple[Path, int]:
    """Create an empty, new temporary file beside `path` with the mode the umask gives.

    The file is opened with mode 0o666 and `O_EXCL`, so the kernel applies the process
    umask (0o644 under umask 022), unlike `tempfile.mkstemp`, which always gives 0o600.
    Returns the temporary path and its permission bits.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The result has the ordinary mode the umask gives (0o666 & ~umask), even when `write`
    replaces `tmp` by a file of its own (safetensors' `save_file` writes a 0o600 file and
    renames it over its target), so outputs are readable like any other file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, mode = _create_temp_beside(path)
    except OSError as exc:
        raise OutputError(path, f"cannot write: {exc.strerror or exc}") from None
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        pause_point("write:before-rename")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(path, f"cannot write: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` atomically."""
    write_atomic(Path(path), lambda tmp: tmp.write_bytes(data))


def tiff_bytes(arr: np.ndarray) -> bytes:
    """An array encoded as a TIFF file: (H, W) as one grey page, (H, W, 3) as one page of 3
    samples per pixel (what `write_tiff_atomic` writes)."""
    arr = np.asarray(arr)
    photometric = "rgb" if arr.ndim == 3 and arr.shape[2] in (3, 4) else "minisblack"
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric=photometric)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, compress_level: int | None = None) -> bytes:
    """A uint8 (H, W) or (H, W, 3|4) array (or a bool mask, as 0/255) encoded as a PNG file
    (zlib level `compress_level`, PIL's default when None; what `write_png_atomic` writes)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"png_bytes expects uint8 or bool, got {arr.dtype}")
    opts = {} if compress_level is None else {"compress_level": compress_level}
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **opts)
    return buf.getvalue()


def write_tiff_atomic(path: str | Path, arr: np.ndarray) -> None:
    """Write an array as a TIFF atomically (e.g. a float32 anomaly map or xyz cloud).

    (H, W) is written as one grey page, (H, W, 3) as one page of 3 samples per pixel.
    """
    write_bytes_atomic(path, tiff_bytes(arr))


def write_png_atomic(path: str | Path, arr: np.ndarray, compress_level: int | None = None) -> None:
    """Write a uint8 (H, W) or (H, W, 3|4) array as a PNG atomically (zlib level
    `compress_level`, PIL's default when None)."""
    write_bytes_atomic(path, png_bytes(arr, compress_level))


@contextlib.contextmanager
def atomic_folder(out: str | Path, is_ours: Callable[[Path], bool]) -> Iterator[Path]:
    """Build a folder whole, then put it in place: yields a fresh temporary sibling of `out`
    to write into; on success it replaces `out` (an earlier output that `is_ours` accepts),
    on any failure it is removed, so `out` is the old output or the new one, never a mix.
    A non-empty `out` that `is_ours` rejects is refused before any work.

    The swap is two renames (`out` to a hidden `.old` sibling, the new folder to `out`). A
    process killed between them leaves no `out` but the whole earlier output in the `.old`
    sibling; the next run (or `recover_folder`) renames it back before doing anything, and
    clears the hidden siblings of killed runs, so a rerun needs no manual cleanup."""
    out = Path(out)
    recover_folder(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_ours(out))):
        raise OutputError(out, "exists and is not an earlier output of this command; "
                               "choose a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise OutputError(out, f"cannot write: {exc.strerror or exc}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        pause_point("folder:built")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            pause_point("folder:old-moved")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(out, f"cannot write: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(out: str | Path) -> None:
    """Undo what a killed `atomic_folder` left beside `out`: a whole earlier output moved to
    a hidden `.old` sibling goes back to `out` when `out` is missing; half-built `.tmp`
    siblings and leftover `.old` ones are removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    stale = sorted(p for p in out.parent.glob(f".{out.name}.*")
                   if p.is_dir() and not p.is_symlink() and p.suffix in (".tmp", ".old"))
    olds = [p for p in stale if p.suffix == ".old"]
    if olds and not out.exists() and not out.is_symlink():
        os.replace(olds[-1], out)
        logger.warning("%s: restored the earlier output that an interrupted run had moved "
                       "aside", out)
    for p in stale:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
