"""A bad-input corpus generated from the tiny synthetic data (used by tests/test_corpus.py).

Each `Case` builds its inputs in a fresh folder from the session's tiny dataset and fitted
model, and names the `cmad` command line to run on them, the exit code it must give, what
its message must name (a file, a folder or an option), and for a correct but warned success
the warning it must log. `CASES` lists them all; `KINDS` counts them by kind.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

FAST = "size: 64\nbank_min_entries: 16\nalign:\n  epochs: 3\n  hidden: 32\n"


@dataclass
class Env:
    """What every case builds from: the tiny dataset, its first category, a fitted model
    (read-only: cases that change a model copy it first)."""

    root: Path
    category: str
    other: str
    model: Path

    def pair(self, folder: str = "good", stem: str = "000") -> tuple[Path, Path]:
        d = self.root / self.category / "test" / folder
        return d / "rgb" / f"{stem}.png", d / "xyz" / f"{stem}.tiff"

    def cloud(self) -> np.ndarray:
        return tifffile.imread(self.pair()[1])


@dataclass
class Case:
    kind: str
    name: str
    # (env, case folder) -> argv; inputs are built inside the case folder
    build: Callable[[Env, Path], list[str]]
    code: int = 2
    # substrings the output must hold; "{d}" is replaced by the case folder
    names: tuple[str, ...] = ()
    warn: str | None = None
    # paths (relative to the case folder) the command may write: left out of the check
    # that every input is byte-identical afterwards
    outputs: tuple[str, ...] = ("out",)
    slow: bool = False  # runs a whole fit or evaluate (seconds, not a fraction of one)


CASES: list[Case] = []


def _imwrite(path: Path, arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    tifffile.imwrite(path, arr, photometric="rgb" if arr.ndim == 3 and arr.shape[2] in (3, 4)
                     else "minisblack")


def case(kind: str, name: str, code: int = 2, names: tuple[str, ...] = (), warn: str | None = None,
         outputs: tuple[str, ...] = ("out",), slow: bool = False):
    def deco(fn: Callable[[Env, Path], list[str]]) -> Callable[[Env, Path], list[str]]:
        CASES.append(Case(kind, name, fn, code, names, warn, outputs, slow))
        return fn
    return deco


# ------------------------------------------------------------------------------ helpers
def _predict(env: Env, d: Path, rgb: Path | None, xyz: Path | None, model: Path | None = None,
             *more: str) -> list[str]:
    argv = ["predict", "--model", str(model or env.model), "--out", str(d / "out"), "--quiet",
            "--threads", "1"]
    if rgb is not None:
        argv += ["--rgb", str(rgb)]
    if xyz is not None:
        argv += ["--xyz", str(xyz)]
    return argv + list(more)


def _with_rgb(env: Env, d: Path, write: Callable[[Path], None], name: str = "a.png") -> list[str]:
    p = d / name
    write(p)
    return _predict(env, d, p, env.pair()[1])


def _with_cloud(env: Env, d: Path, arr: np.ndarray | None = None, raw: bytes | None = None,
                name: str = "a.tiff") -> list[str]:
    p = d / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        _imwrite(p, arr)
    return _predict(env, d, env.pair()[0], p)


def _image(env: Env) -> Image.Image:
    return Image.open(env.pair()[0]).convert("RGB")


def _copy_category(env: Env, d: Path, name: str = "data") -> Path:
    root = d / name
    shutil.copytree(env.root / env.category, root / env.category, symlinks=True)
    return root


def _evaluate(env: Env, root: Path, model: Path | None = None, *more: str) -> list[str]:
    return ["evaluate", "--model", str(model or env.model), "--data", str(root), "--category",
            env.category, "--threads", "1", "--json", *more]


def _fit(env: Env, d: Path, root: Path | None = None, *more: str, cfg: Path | None = None
         ) -> list[str]:
    if cfg is None:
        cfg = d / "fast.yaml"
        cfg.write_text(FAST)
    return ["fit", "--data", str(root or env.root), "--category", env.category, "--out",
            str(d / "out"), "--config", str(cfg), "--threads", "1", "--quiet", *more]


def _copy_model(env: Env, d: Path) -> Path:
    m = d / "model"
    shutil.copytree(env.model, m)
    return m


def _edit_model(env: Env, d: Path, edit: Callable[[dict], None]) -> list[str]:
    m = _copy_model(env, d)
    meta = json.loads((m / "config.json").read_text())
    edit(meta)
    (m / "config.json").write_text(json.dumps(meta))
    rgb, xyz = env.pair()
    return _predict(env, d, rgb, xyz, m)


def _tensor_file(m: Path) -> Path:
    return next(m.glob("model-*.safetensors"))


def _first(root: Path, cat: str, split: str, folder: str, kind: str) -> Path:
    ext = {"rgb": "png", "xyz": "tiff", "gt": "png"}[kind]
    return sorted((root / cat / split / folder / kind).glob(f"*.{ext}"))[0]


def _defect(env: Env) -> str:
    return sorted(p.name for p in (env.root / env.category / "test").iterdir()
                  if p.name != "good" and (p / "gt").is_dir() and any((p / "gt").iterdir()))[0]


# =============================================================================== data files
# --- single RGB files given to predict
@case("data: rgb file", "missing rgb file", names=("{d}/nope.png",))
def _(env, d):
    return _predict(env, d, d / "nope.png", env.pair()[1])


@case("data: rgb file", "zero-byte png", names=("{d}/a.png",))
def _(env, d):
    return _with_rgb(env, d, lambda p: p.write_bytes(b""))


@case("data: rgb file", "truncated png", names=("{d}/a.png",))
def _(env, d):
    raw = env.pair()[0].read_bytes()
    return _with_rgb(env, d, lambda p: p.write_bytes(raw[: len(raw) // 2]))


@case("data: rgb file", "text file named .png", names=("{d}/a.png",))
def _(env, d):
    return _with_rgb(env, d, lambda p: p.write_text("not an image\n"))


@case("data: rgb file", "directory given as --rgb", names=("{d}/a.png",))
def _(env, d):
    return _with_rgb(env, d, lambda p: p.mkdir())


@case("data: rgb file", "symlink loop as --rgb", names=("{d}/a.png",))
def _(env, d):
    return _with_rgb(env, d, lambda p: p.symlink_to(p))


@case("data: rgb file", "png of another size than the cloud", names=("{d}/a.png",))
def _(env, d):
    img = _image(env)
    return _with_rgb(env, d, lambda p: img.resize((img.width + 8, img.height)).save(p))


@case("data: rgb file", "16-bit grayscale png", code=0)
def _(env, d):
    g = np.asarray(_image(env).convert("L"), dtype=np.uint16) * 257
    return _with_rgb(env, d, lambda p: Image.fromarray(g).save(p))


@case("data: rgb file", "8-bit grayscale png", code=0)
def _(env, d):
    return _with_rgb(env, d, lambda p: _image(env).convert("L").save(p))


@case("data: rgb file", "RGBA png", code=0)
def _(env, d):
    return _with_rgb(env, d, lambda p: _image(env).convert("RGBA").save(p))


@case("data: rgb file", "palette png", code=0)
def _(env, d):
    return _with_rgb(env, d, lambda p: _image(env).convert("P").save(p))


@case("data: rgb file", "1-bit png", code=0)
def _(env, d):
    return _with_rgb(env, d, lambda p: _image(env).convert("1").save(p))


@case("data: rgb file", "JPEG named .png", code=0)
def _(env, d):
    return _with_rgb(env, d, lambda p: _image(env).save(p, format="JPEG"))


@case("data: rgb file", "unicode and spaces in the path", code=0)
def _(env, d):
    sub = d / "dätä mit leer zeichen ✓"
    sub.mkdir()
    shutil.copy(env.pair()[0], sub / "bïld 1.png")
    shutil.copy(env.pair()[1], sub / "wolke 1.tiff")
    return _predict(env, d, sub / "bïld 1.png", sub / "wolke 1.tiff")


# --- single point clouds given to predict
@case("data: xyz file", "missing tiff", names=("{d}/nope.tiff",))
def _(env, d):
    return _predict(env, d, env.pair()[0], d / "nope.tiff")


@case("data: xyz file", "zero-byte tiff", names=("{d}/a.tiff",))
def _(env, d):
    return _with_cloud(env, d, raw=b"")


@case("data: xyz file", "truncated tiff", names=("{d}/a.tiff",))
def _(env, d):
    raw = env.pair()[1].read_bytes()
    return _with_cloud(env, d, raw=raw[: len(raw) // 3])


@case("data: xyz file", "text file named .tiff", names=("{d}/a.tiff",))
def _(env, d):
    return _with_cloud(env, d, raw=b"II*\0 this is not a tiff")


@case("data: xyz file", "2-D tiff", names=("{d}/a.tiff", "shape"))
def _(env, d):
    return _with_cloud(env, d, env.cloud()[:, :, 2])


@case("data: xyz file", "4-channel tiff", names=("{d}/a.tiff", "shape"))
def _(env, d):
    c = env.cloud()
    return _with_cloud(env, d, np.concatenate([c, c[:, :, :1]], axis=2))


@case("data: xyz file", "int16 tiff", names=("{d}/a.tiff", "dtype"))
def _(env, d):
    return _with_cloud(env, d, (env.cloud() * 1000).astype(np.int16))


@case("data: xyz file", "uint8 tiff", names=("{d}/a.tiff", "dtype"))
def _(env, d):
    return _with_cloud(env, d, np.zeros(env.cloud().shape, np.uint8))


@case("data: xyz file", "tiff of another size than the png", names=("{d}/a.tiff",))
def _(env, d):
    return _with_cloud(env, d, env.cloud()[:-4])


@case("data: xyz file", "transposed tiff (W x H)", names=("{d}/a.tiff",))
def _(env, d):
    return _with_cloud(env, d, np.ascontiguousarray(env.cloud().transpose(1, 0, 2)))


@case("data: xyz file", "float64 tiff", code=0)
def _(env, d):
    return _with_cloud(env, d, env.cloud().astype(np.float64))


@case("data: xyz file", "float16 tiff", code=0)
def _(env, d):
    return _with_cloud(env, d, env.cloud().astype(np.float16))


@case("data: xyz file", "all-NaN cloud", names=("{d}/a.tiff", "no valid point"))
def _(env, d):
    return _with_cloud(env, d, np.full(env.cloud().shape, np.nan, np.float32))


@case("data: xyz file", "all-inf cloud", names=("{d}/a.tiff", "no valid point"))
def _(env, d):
    return _with_cloud(env, d, np.full(env.cloud().shape, np.inf, np.float32))


@case("data: xyz file", "all-zero cloud", names=("{d}/a.tiff", "no valid point"))
def _(env, d):
    return _with_cloud(env, d, np.zeros(env.cloud().shape, np.float32))


@case("data: xyz file", "cloud of only far outliers", names=("{d}/a.tiff", "no valid point"))
def _(env, d):
    return _with_cloud(env, d, np.full(env.cloud().shape, 1e30, np.float32))


@case("data: xyz file", "half-NaN cloud", code=0, warn="NaN/inf points marked invalid")
def _(env, d):
    c = env.cloud().copy()
    c[: c.shape[0] // 2] = np.nan
    return _with_cloud(env, d, c)


@case("data: xyz file", "one finite 1e30 point", code=0, warn="far outlier")
def _(env, d):
    c = env.cloud().copy()
    c[c.shape[0] // 2, c.shape[1] // 2] = 1e30
    return _with_cloud(env, d, c)


@case("data: xyz file", "points 1 km from the rest", code=0, warn="far outlier")
def _(env, d):
    c = env.cloud().copy()
    c[5:8, 5:9, 2] = 1000.0
    return _with_cloud(env, d, c)


@case("data: xyz file", "negative far outliers", code=0, warn="far outlier")
def _(env, d):
    c = env.cloud().copy()
    c[-3:, -3:] = -3e8
    return _with_cloud(env, d, c)


@case("data: xyz file", "cloud in millimetres", names=("{d}/a.tiff", "unit"))
def _(env, d):
    return _with_cloud(env, d, env.cloud() * 1000)


@case("data: xyz file", "cloud in kilometres", names=("{d}/a.tiff", "unit"))
def _(env, d):
    return _with_cloud(env, d, env.cloud() / 1000)


@case("data: xyz file", "inf and NaN mixed into one point each", code=0,
      warn="NaN/inf points marked invalid")
def _(env, d):
    c = env.cloud().copy()
    c[0, 0, 0], c[1, 1, 2] = np.inf, np.nan
    return _with_cloud(env, d, c)


# --- predict --input folders
@case("data: predict folder", "input folder missing", names=("{d}/in",))
def _(env, d):
    return ["predict", "--model", str(env.model), "--input", str(d / "in"), "--out",
            str(d / "out"), "--quiet"]


def _input_folder(env: Env, d: Path, stems_rgb=("000",), stems_xyz=("000",)) -> list[str]:
    src = env.root / env.category / "test" / "good"
    (d / "in" / "rgb").mkdir(parents=True)
    (d / "in" / "xyz").mkdir(parents=True)
    for s in stems_rgb:
        shutil.copy(src / "rgb" / "000.png", d / "in" / "rgb" / f"{s}.png")
    for s in stems_xyz:
        shutil.copy(src / "xyz" / "000.tiff", d / "in" / "xyz" / f"{s}.tiff")
    return ["predict", "--model", str(env.model), "--input", str(d / "in"), "--out",
            str(d / "out"), "--quiet", "--threads", "1"]


@case("data: predict folder", "empty input folder", names=("{d}/in",))
def _(env, d):
    return _input_folder(env, d, (), ())


@case("data: predict folder", "unpaired rgb", names=("{d}/in/xyz/001.tiff",))
def _(env, d):
    return _input_folder(env, d, ("000", "001"), ("000",))


@case("data: predict folder", "unpaired xyz", names=("{d}/in/rgb/001.png",))
def _(env, d):
    return _input_folder(env, d, ("000",), ("000", "001"))


@case("data: predict folder", "extra files are ignored", code=0)
def _(env, d):
    argv = _input_folder(env, d)
    (d / "in" / "rgb" / "notes.txt").write_text("hello")
    (d / "in" / "readme.md").write_text("hello")
    return argv


@case("data: predict folder", "rgb only for an rgb+xyz model", names=("xyz",))
def _(env, d):
    argv = _input_folder(env, d, ("000",), ())
    return argv


# --- dataset trees (fit / evaluate)
def _tree_eval(env: Env, d: Path, edit: Callable[[Path], None]) -> list[str]:
    root = _copy_category(env, d)
    edit(root / env.category)
    return _evaluate(env, root)


@case("data: dataset", "data root missing", names=("{d}/data",))
def _(env, d):
    return _evaluate(env, d / "data")


@case("data: dataset", "unknown category", names=("nope",))
def _(env, d):
    return ["evaluate", "--model", str(env.model), "--data", str(env.root), "--category", "nope"]


@case("data: dataset", "empty category folder", names=("{d}/data",))
def _(env, d):
    (d / "data" / env.category).mkdir(parents=True)
    return _evaluate(env, d / "data")


@case("data: dataset", "test split missing", names=("test",))
def _(env, d):
    return _tree_eval(env, d, lambda c: shutil.rmtree(c / "test"))


@case("data: dataset", "missing gt of a defect sample", names=("gt",))
def _(env, d):
    return _tree_eval(env, d, lambda c: _first(c.parent, c.name, "test", _defect(env), "gt").unlink())


@case("data: dataset", "missing test xyz", names=("xyz",))
def _(env, d):
    return _tree_eval(env, d, lambda c: _first(c.parent, c.name, "test", "good", "xyz").unlink())


@case("data: dataset", "missing test rgb", names=("rgb",))
def _(env, d):
    return _tree_eval(env, d, lambda c: _first(c.parent, c.name, "test", "good", "rgb").unlink())


@case("data: dataset", "zero-byte test png", names=("test/good/rgb/000.png",))
def _(env, d):
    return _tree_eval(env, d, lambda c: _first(c.parent, c.name, "test", "good", "rgb").write_bytes(b""))


@case("data: dataset", "truncated test tiff", names=("test/good/xyz/000.tiff",))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", "good", "xyz")
        p.write_bytes(p.read_bytes()[:200])
    return _tree_eval(env, d, edit)


@case("data: dataset", "all-NaN test cloud", names=("test/good/xyz/000.tiff", "no valid point"))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", "good", "xyz")
        _imwrite(p, np.full(tifffile.imread(p).shape, np.nan, np.float32))
    return _tree_eval(env, d, edit)


@case("data: dataset", "test cloud in millimetres", names=("test/good/xyz/000.tiff", "unit"))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", "good", "xyz")
        _imwrite(p, tifffile.imread(p) * 1000)
    return _tree_eval(env, d, edit)


@case("data: dataset", "gt of the wrong size", names=("gt",))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", _defect(env), "gt")
        Image.open(p).resize((10, 10)).save(p)
    return _tree_eval(env, d, edit)


@case("data: dataset", "gt that is not an image", names=("gt",))
def _(env, d):
    return _tree_eval(env, d, lambda c: _first(c.parent, c.name, "test", _defect(env), "gt")
                      .write_text("nope"))


@case("data: dataset", "symlink loop in a modality folder", names=("000.png",))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", "good", "rgb")
        p.unlink()
        p.symlink_to(p)
    return _tree_eval(env, d, edit)


@case("data: dataset", "two rgb files with one stem", names=("000",))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", "good", "rgb")
        shutil.copy(p, p.with_suffix(".jpg"))
    return _tree_eval(env, d, edit)


@case("data: dataset", "class_ids.json malformed", code=0, warn="class_ids.json", slow=True)
def _(env, d):
    return _tree_eval(env, d, lambda c: (c / "class_ids.json").write_text("{not json"))


@case("data: dataset", "class_ids.json a list", code=0, warn="class_ids.json", slow=True)
def _(env, d):
    return _tree_eval(env, d, lambda c: (c / "class_ids.json").write_text("[1, 2]"))


@case("data: dataset", "class_ids.json mixed orientations", code=0, warn="class_ids.json", slow=True)
def _(env, d):
    return _tree_eval(env, d, lambda c: (c / "class_ids.json").write_text(
        json.dumps({"good": 0, "255": "cut"})))


@case("data: dataset", "gt values 0/1 instead of 0/255", code=0, slow=True)
def _(env, d):
    def edit(c):
        for p in (c / "test").glob("*/gt/*.png"):
            a = np.asarray(Image.open(p).convert("L"))
            Image.fromarray((a > 0).astype(np.uint8)).save(p)
    return _tree_eval(env, d, edit)


@case("data: dataset", "class_ids.json value->name (as MVTec ships it)", code=0, slow=True)
def _(env, d):
    def edit(c):
        ids = json.loads((c / "class_ids.json").read_text())
        (c / "class_ids.json").write_text(json.dumps({str(v): k for k, v in ids.items()}))
    return _tree_eval(env, d, edit)


@case("data: dataset", "camera json and class_ids.json missing", code=0, slow=True)
def _(env, d):
    def edit(c):
        shutil.rmtree(c / "calibration")
        (c / "class_ids.json").unlink()
    return _tree_eval(env, d, edit)


@case("data: dataset", "defect sample with an empty gt", code=0, warn="empty gt mask", slow=True)
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", _defect(env), "gt")
        Image.fromarray(np.zeros(np.asarray(Image.open(p)).shape[:2], np.uint8)).save(p)
    return _tree_eval(env, d, edit)


@case("data: dataset", "far outlier in a test cloud (evaluate)", code=0, warn="far outlier",
      slow=True, outputs=("out", "maps"))
def _(env, d):
    def edit(c):
        p = _first(c.parent, c.name, "test", "good", "xyz")
        a = tifffile.imread(p)
        a[3, 3] = 1e30
        _imwrite(p, a)
    return _tree_eval(env, d, edit) + ["--maps", str(d / "maps")]


@case("data: dataset", "zero train samples (fit)", names=("train",))
def _(env, d):
    root = _copy_category(env, d)
    for p in (root / env.category / "train" / "good").glob("*/*"):
        p.unlink()
    return _fit(env, d, root)


@case("data: dataset", "train split missing (fit)", names=("train",))
def _(env, d):
    root = _copy_category(env, d)
    shutil.rmtree(root / env.category / "train")
    return _fit(env, d, root)


@case("data: dataset", "zero-byte train tiff (fit)", names=("train/good/xyz/000.tiff",))
def _(env, d):
    root = _copy_category(env, d)
    _first(root, env.category, "train", "good", "xyz").write_bytes(b"")
    return _fit(env, d, root)


@case("data: dataset", "all-zero train cloud (fit)", names=("train/good/xyz/000.tiff",))
def _(env, d):
    root = _copy_category(env, d)
    p = _first(root, env.category, "train", "good", "xyz")
    _imwrite(p, np.zeros(tifffile.imread(p).shape, np.float32))
    return _fit(env, d, root)


@case("data: dataset", "unpaired train rgb (fit)", names=("train/good",))
def _(env, d):
    root = _copy_category(env, d)
    _first(root, env.category, "train", "good", "xyz").unlink()
    return _fit(env, d, root)


@case("data: dataset", "unexpected folder in train/ (fit)", names=("train",))
def _(env, d):
    root = _copy_category(env, d)
    shutil.copytree(root / env.category / "train" / "good", root / env.category / "train" / "bad")
    return _fit(env, d, root)


@case("data: dataset", "no validation split: held back from train (fit)", code=0,
      warn="no validation split", slow=True)
def _(env, d):
    root = _copy_category(env, d)
    shutil.rmtree(root / env.category / "validation")
    return _fit(env, d, root)


# ============================================================================= model folders
@case("model", "model folder missing", names=("{d}/nope",))
def _(env, d):
    return _predict(env, d, *env.pair(), d / "nope")


@case("model", "model path is a file", names=("{d}/m",))
def _(env, d):
    (d / "m").write_text("x")
    return _predict(env, d, *env.pair(), d / "m")


@case("model", "config.json missing", names=("config.json",))
def _(env, d):
    m = _copy_model(env, d)
    (m / "config.json").unlink()
    return _predict(env, d, *env.pair(), m)


@case("model", "tensor file missing", names=(".safetensors",))
def _(env, d):
    m = _copy_model(env, d)
    _tensor_file(m).unlink()
    return _predict(env, d, *env.pair(), m)


@case("model", "tensor file truncated", names=(".safetensors",))
def _(env, d):
    m = _copy_model(env, d)
    t = _tensor_file(m)
    t.write_bytes(t.read_bytes()[:100])
    return _predict(env, d, *env.pair(), m)


@case("model", "config.json truncated", names=("config.json",))
def _(env, d):
    m = _copy_model(env, d)
    c = m / "config.json"
    c.write_bytes(c.read_bytes()[:50])
    return _predict(env, d, *env.pair(), m)


@case("model", "config.json a list", names=("config.json",))
def _(env, d):
    m = _copy_model(env, d)
    (m / "config.json").write_text("[]")
    return _predict(env, d, *env.pair(), m)


@case("model", "future format version", names=("config.json", "version"))
def _(env, d):
    return _edit_model(env, d, lambda m: m.update(format_version=99))


@case("model", "unknown top-level key", names=("config.json", "shiny"))
def _(env, d):
    return _edit_model(env, d, lambda m: m.update(shiny=1))


@case("model", "unknown key in the detector config", names=("config.json", "shiny"))
def _(env, d):
    return _edit_model(env, d, lambda m: m["config"].update(shiny=1))


@case("model", "unknown nested key in the detector config", names=("config.json", "shiny"))
def _(env, d):
    return _edit_model(env, d, lambda m: m["config"]["align"].update(shiny=1))


@case("model", "norm lacks an active branch", names=("config.json",))
def _(env, d):
    return _edit_model(env, d, lambda m: m["norm"].pop(sorted(m["norm"])[0]))


@case("model", "threshold of the wrong type", names=("config.json", "threshold"))
def _(env, d):
    return _edit_model(env, d, lambda m: m.update(threshold="high"))


@case("model", "empty branch list", names=("config.json", "branch"))
def _(env, d):
    return _edit_model(env, d, lambda m: m.update(branches=[]))


@case("model", "unknown branch", names=("config.json", "nope"))
def _(env, d):
    return _edit_model(env, d, lambda m: m.update(branches=["nope"]))


@case("model", "tensor file name that escapes the folder", names=("config.json",))
def _(env, d):
    return _edit_model(env, d, lambda m: m.update(tensors="../x.safetensors"))


@case("model", "model of another extractor", names=("config.json", "extractor"))
def _(env, d):
    return _edit_model(env, d, lambda m: m["extractor"].update(shiny=1))


@case("model", "pickle renamed .safetensors", names=(".safetensors",))
def _(env, d):
    import hashlib
    import pickle

    m = _copy_model(env, d)
    t = _tensor_file(m)
    blob = pickle.dumps({"a": [1, 2, 3]})
    t.write_bytes(blob)
    meta = json.loads((m / "config.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()  # so the format check is reached
    (m / "config.json").write_text(json.dumps(meta))
    return _predict(env, d, *env.pair(), m)


@case("model", "mixed save: tensors of another model", names=(".safetensors", "mixed"))
def _(env, d):
    from safetensors.numpy import load, save

    m = _copy_model(env, d)
    t = _tensor_file(m)
    tensors = load(t.read_bytes())
    k = sorted(tensors)[0]
    tensors[k] = tensors[k] + 1
    t.write_bytes(save(tensors))
    return _predict(env, d, *env.pair(), m)


@case("model", "tensors of the wrong shape (hash updated)", names=("config.json",))
def _(env, d):
    import hashlib

    from safetensors.numpy import load, save

    m = _copy_model(env, d)
    t = _tensor_file(m)
    tensors = load(t.read_bytes())
    k = sorted(tensors)[0]
    tensors[k] = np.zeros((3,), tensors[k].dtype)
    blob = save(tensors)
    t.write_bytes(blob)
    meta = json.loads((m / "config.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (m / "config.json").write_text(json.dumps(meta))
    return _predict(env, d, *env.pair(), m)


@case("model", "model of another category (evaluate)", code=0, warn="fitted on category",
      slow=True)
def _(env, d):
    m = _copy_model(env, d)
    meta = json.loads((m / "config.json").read_text())
    meta["category"] = env.other
    (m / "config.json").write_text(json.dumps(meta))
    return _evaluate(env, env.root, m)


@case("model", "old model without the stored cloud scale", code=0)
def _(env, d):
    return _edit_model(env, d, lambda m: m.pop("xyz_scale"))


# ================================================================================ CLI values
for _opt, _val in (("--threads", "-1"), ("--threads", "0"), ("--threads", "abc")):
    case("cli", f"predict {_opt} {_val}", names=(_opt,))(
        lambda env, d, o=_opt, v=_val: _predict(env, d, *env.pair(), None, o, v))

for _val in ("0", "-1", "abc", "1.5", ""):
    case("cli", f"fit --shots {_val!r}", names=("--shots",))(
        lambda env, d, v=_val: _fit(env, d, None, "--shots", v))

case("cli", "fit --seed -1", names=("--seed",))(lambda env, d: _fit(env, d, None, "--seed", "-1"))
case("cli", "fit --threads -1", names=("--threads",))(
    lambda env, d: _fit(env, d, None, "--threads", "-1"))
case("cli", "fit --shots 10000 (more than the training set)", code=0,
     warn="only 4 training samples", slow=True)(lambda env, d: _fit(env, d, None, "--shots", "10000"))


@case("cli", "fit --out is a file", names=("{d}/out",))
def _(env, d):
    (d / "out").write_text("my notes")
    return _fit(env, d)


@case("cli", "fit --out a user's non-empty folder", names=("{d}/out",))
def _(env, d):
    (d / "out").mkdir()
    (d / "out" / "config.json").write_text('{"mine": true}')
    return _fit(env, d)


@case("cli", "predict --out is a file", names=("{d}/out",))
def _(env, d):
    (d / "out").write_text("my notes")
    return _predict(env, d, *env.pair())


@case("cli", "predict --out a user's non-empty folder", names=("{d}/out",))
def _(env, d):
    (d / "out").mkdir()
    (d / "out" / "thesis.txt").write_text("mine")
    return _predict(env, d, *env.pair())


@case("cli", "predict --out an earlier predict output is replaced", code=0, outputs=("out",))
def _(env, d):
    (d / "out" / "maps").mkdir(parents=True)
    (d / "out" / "scores.json").write_text("{}")
    return _predict(env, d, *env.pair())


@case("cli", "predict --input and --rgb/--xyz both", names=("--input",))
def _(env, d):
    return _predict(env, d, *env.pair(), None, "--input", str(env.pair()[0].parent.parent))


@case("cli", "predict without inputs", names=("--input",))
def _(env, d):
    return _predict(env, d, None, None)


@case("cli", "predict --rgb only for an rgb+xyz model", names=("--xyz",))
def _(env, d):
    return _predict(env, d, env.pair()[0], None)


for _opt, _val in (("--limit", "0"), ("--limit", "-3"), ("--size", "7"), ("--size", "0"),
                   ("--runtime", "tpu"), ("--threads", "-1")):
    case("cli", f"features {_opt} {_val}", names=(_opt,))(
        lambda env, d, o=_opt, v=_val: ["features", "--data", str(env.root), "--category",
                                        env.category, o, v, "--json"])


def _bench(env: Env, d: Path, *more: str) -> list[str]:
    return ["bench", "--data", str(env.root), "--out", str(d / "out"), "--quiet",
            "--threads", "1", *more]


for _opt, _val in (("--resolution", "7"), ("--resolution", "-224"), ("--shots", "0,5"),
                   ("--shots", "a,b"), ("--shots", "-1"), ("--methods", "nope"),
                   ("--seed", "-1"), ("--threads", "0")):
    case("cli", f"bench {_opt} {_val}", names=(_opt,) if _opt != "--methods" else ("nope",))(
        lambda env, d, o=_opt, v=_val: _bench(env, d, o, v))

case("cli", "bench --categories nope", names=("nope",))(
    lambda env, d: _bench(env, d, "--categories", "nope", "--methods", "rgb-bank"))


@case("cli", "bench --out a non-empty folder", names=("{d}/out",))
def _(env, d):
    (d / "out").mkdir()
    (d / "out" / "mine.txt").write_text("mine")
    return _bench(env, d)


@case("cli", "bench --out is a file", names=("{d}/out",))
def _(env, d):
    (d / "out").write_text("mine")
    return _bench(env, d)


case("cli", "evaluate --resolution sideways", names=("--resolution",))(
    lambda env, d: _evaluate(env, env.root, None, "--resolution", "sideways"))
case("cli", "evaluate --threads -1", names=("--threads",))(
    lambda env, d: _evaluate(env, env.root, None, "--threads", "-1"))


@case("cli", "evaluate --maps is a file", names=("{d}/maps",), outputs=())
def _(env, d):
    (d / "maps").write_text("mine")
    return _evaluate(env, env.root, None, "--maps", str(d / "maps"))


@case("cli", "evaluate --maps/<category> holds a user's files", names=("{d}/maps",), outputs=())
def _(env, d):
    (d / "maps" / env.category).mkdir(parents=True)
    (d / "maps" / env.category / "mine.txt").write_text("mine")
    return _evaluate(env, env.root, None, "--maps", str(d / "maps"))


for _opt, _val in (("--size", "gigantic"), ("--train", "0"), ("--categories", "0"),
                   ("--seed", "-1"), ("--categories", "nope")):
    case("cli", f"synth {_opt} {_val}", names=(_opt,) if _val != "nope" else ("nope",))(
        lambda env, d, o=_opt, v=_val: ["synth", "--out", str(d / "out"), "--size", "tiny",
                                        "--quiet", o, v])

case("cli", "demo --seed -1", names=("--seed",))(
    lambda env, d: ["demo", "--out", str(d / "out"), "--seed", "-1"])
case("cli", "demo --size gigantic", names=("gigantic",))(
    lambda env, d: ["demo", "--out", str(d / "out"), "--size", "gigantic"])


# ============================================================================== config files
def _config_case(name: str, text: str, names: tuple[str, ...], suffix: str = ".yaml"):
    def build(env, d, text=text, suffix=suffix):
        cfg = d / f"cfg{suffix}"
        cfg.write_text(text)
        return _fit(env, d, None, cfg=cfg)
    case("config", name, names=("{d}/cfg",) + names)(build)


_config_case("unknown top-level key", "shiny: 1\n", ("shiny",))
_config_case("unknown key in align", "align: {shiny: 1}\n", ("align.shiny",))
_config_case("unknown key in preprocess", "preprocess: {shiny: 1}\n", ("preprocess.shiny",))
_config_case("unknown key in rgb", "rgb: {shiny: 1}\n", ("rgb.shiny",))
_config_case("unknown key in xyz", "xyz: {shiny: 1}\n", ("xyz.shiny",))
_config_case("unknown key in geometry", "geometry: {shiny: 1}\n", ("geometry.shiny",))
_config_case("size of the wrong type", "size: big\n", ("size",))
_config_case("size not a multiple of 8", "size: 60\n", ("size",))
_config_case("bank_fraction out of range", "bank_fraction: 2\n", ("bank_fraction",))
_config_case("bank_fraction a string", "bank_fraction: lots\n", ("bank_fraction",))
_config_case("branches a string", "branches: align\n", ("branches",))
_config_case("branches empty", "branches: []\n", ("branches",))
_config_case("unknown branch", "branches: [align, nope]\n", ("nope",))
_config_case("unknown weights mode", "weights: bogus\n", ("weights",))
_config_case("align.epochs negative", "align: {epochs: -1}\n", ("align", "epochs"))
_config_case("align.variant unknown", "align: {variant: psychic}\n", ("align", "variant"))
_config_case("align given a number", "align: 5\n", ("align",))
_config_case("plane_threshold zero", "preprocess: {plane_threshold: 0}\n",
             ("plane_threshold",))
_config_case("bank_dtype unknown", "bank_dtype: int3\n", ("bank_dtype",))
_config_case("malformed YAML", "size: [64\n", ())
_config_case("a list, not a mapping", "- 1\n- 2\n", ())
_config_case("JSON with a wrong type", '{"seed": "zero"}', ("seed",), suffix=".json")
_config_case("size inside preprocess", "preprocess: {size: 128}\n", ("preprocess.size",))


@case("config", "config file missing", names=("{d}/nope.yaml",))
def _(env, d):
    return _fit(env, d, None, cfg=d / "nope.yaml")


KINDS = Counter(c.kind for c in CASES)
