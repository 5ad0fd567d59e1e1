"""The MVTec 3D-AD folder layout: categories, splits, and rgb/xyz/gt files paired by stem.

```
<root>/<category>/{train,validation}/good/{rgb,xyz}/NNN.*
<root>/<category>/test/<defect_type>/{rgb,xyz,gt}/NNN.*
```

Any category name is accepted. A category without `xyz/` folders is RGB-only, one without
`rgb/` folders is 3D-only. Files are paired by stem, never by position in two sorted lists;
any mismatch is a `DataError` naming the missing file.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmad.data.io import read_rgb, read_sample_gt, read_xyz
from cmad.errors import DataError
from cmad.progress import progress as progress_bar
from cmad.types import Sample, SamplePaths

logger = logging.getLogger(__name__)

__all__ = ["MODALITIES", "SPLITS", "Category", "Dataset", "SampleRef", "is_category_dir",
           "parse_class_ids"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
MODALITIES: tuple[str, ...] = ("rgb", "xyz")
NORMAL = "good"
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "rgb": (".png", ".jpg", ".jpeg", ".bmp"),
    "xyz": (".tiff", ".tif"),
    "gt": (".png",),
}


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's files are, before anything is read."""

    category: str
    split: str
    defect_type: str
    stem: str
    rgb_path: Path | None
    xyz_path: Path | None
    gt_path: Path | None
    label: int

    @property
    def key(self) -> str:
        """category/split/defect_type/stem, as `Sample.key`."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"

    @property
    def paths(self) -> SamplePaths:
        return SamplePaths(rgb=self.rgb_path, xyz=self.xyz_path, gt=self.gt_path)


def _stem_order(stem: str) -> tuple[int, int, str]:
    """Numeric stems in numeric order, then the rest alphabetically."""
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def is_category_dir(folder: Path) -> bool:
    """True if `folder` holds at least one split folder (train/, validation/ or test/)."""
    return folder.is_dir() and any((folder / s).is_dir() for s in SPLITS)


def _list_files(folder: Path, kind: str, problems: list[DataError]) -> dict[str, Path]:
    """Stem -> file for the files of one modality folder; two files with one stem is a problem."""
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.suffix.lower() not in _SUFFIXES[kind]:
            continue
        if f.stem in found:
            problems.append(DataError(f, f"two {kind} files share the stem {f.stem!r}: "
                                         f"{found[f.stem].name} and {f.name}"))
            continue
        found[f.stem] = f
    return found


def _gt_value(v: object) -> int | None:
    """A gt pixel value 0..255 from a JSON int or a string of digits, else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and v.strip().isdigit():
        n = int(v.strip())
    else:
        return None
    return n if 0 <= n <= 255 else None


def _is_name(v: object) -> bool:
    return isinstance(v, str) and bool(v.strip()) and not v.strip().isdigit()


def parse_class_ids(raw: object, path: Path) -> dict[str, int]:
    """Defect name -> gt value from a parsed class_ids.json, in either orientation.

    value -> name (keys digit strings, values names: the real MVTec 3D-AD files) or
    name -> value (keys names, values 0..255). Anything else, or two entries sharing a name
    or a value, raises `DataError` naming `path`.
    """
    if not isinstance(raw, dict):
        raise DataError(path, "invalid class_ids.json: expected a JSON object")
    items = list(raw.items())
    expected = ('expected {"<gt value>": "<defect name>", ...} (as MVTec 3D-AD ships it) '
                'or {"<defect name>": <gt value 0-255>, ...}')
    if all(_gt_value(k) is not None and _is_name(v) for k, v in items):
        pairs = [(str(v).strip(), int(_gt_value(k))) for k, v in items]  # type: ignore[arg-type]
    elif all(_is_name(k) and _gt_value(v) is not None for k, v in items):
        pairs = [(k.strip(), int(_gt_value(v))) for k, v in items]  # type: ignore[arg-type]
    else:
        bad = next((f"{k!r}: {v!r}" for k, v in items
                    if not (_gt_value(k) is not None and _is_name(v))
                    and not (_is_name(k) and _gt_value(v) is not None)), None)
        what = f"entry {bad} fits neither orientation" if bad else "the entries mix orientations"
        raise DataError(path, f"invalid class_ids.json: {what}; {expected}")
    out: dict[str, int] = {}
    for name, value in pairs:
        if name in out:
            raise DataError(path, f"invalid class_ids.json: defect name {name!r} appears twice")
        if value in out.values():
            raise DataError(path, f"invalid class_ids.json: gt value {value} appears twice")
        out[name] = value
    return out


class Category:
    """One category folder (e.g. `bagel/`) of an MVTec 3D-AD style dataset."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "category folder not found")
        self.root = root
        self.name = root.name
        if not is_category_dir(root):
            raise DataError(root, "empty category: no train/, validation/ or test/ folder")
        self.modalities = self._detect_modalities()
        if not self.modalities:
            raise DataError(root, "empty category: no rgb/ or xyz/ folders under its splits")
        self._class_ids: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"Category({str(self.root)!r}, modalities={self.modalities})"

    def _sample_dirs(self) -> Iterator[Path]:
        for split in SPLITS:
            split_dir = self.root / split
            if split_dir.is_dir():
                yield from _visible_dirs(split_dir)

    def _detect_modalities(self) -> list[str]:
        present: set[str] = set()
        for d in self._sample_dirs():
            present.update(m for m in MODALITIES if (d / m).is_dir())
        return [m for m in MODALITIES if m in present]

    @property
    def splits(self) -> list[str]:
        """The split folders present on disk."""
        return [s for s in SPLITS if (self.root / s).is_dir()]

    @property
    def class_ids(self) -> dict[str, int]:
        """Defect type -> gt pixel value from class_ids.json, or {} where there is none.

        The file may map value -> name (the real dataset: `{"255": "cut", "0": "good"}`) or
        name -> value; see `parse_class_ids`.
        """
        if self._class_ids is None:
            path = self.root / "class_ids.json"
            if not path.is_file():
                self._class_ids = {}
            else:
                try:
                    raw = json.loads(path.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise DataError(path, f"invalid class_ids.json: {exc}") from None
                self._class_ids = parse_class_ids(raw, path)
        return self._class_ids

    def _check_class_ids(self) -> None:
        """Reading samples does not need class_ids.json; a broken one is warned about once."""
        if self._class_ids is None and not getattr(self, "_class_ids_warned", False):
            try:
                self.class_ids  # noqa: B018 - parse it once
            except DataError as exc:
                self._class_ids_warned = True
                logger.warning("%s (ignored: the samples are read without it)", exc)

    @property
    def defect_types(self) -> list[str]:
        """The defect-type folders of test/ (sorted), without `good`."""
        test_dir = self.root / "test"
        if not test_dir.is_dir():
            return []
        return [d.name for d in _visible_dirs(test_dir) if d.name != NORMAL]

    def scan(self, split: str) -> tuple[list[SampleRef], list[DataError]]:
        """Pair the files of one split, collecting problems instead of raising.

        Returns the references that paired cleanly and one `DataError` per problem.
        """
        if split not in SPLITS:
            raise DataError(self.root / split, f"unknown split {split!r}; expected one of {SPLITS}")
        problems: list[DataError] = []
        refs: list[SampleRef] = []
        split_dir = self.root / split
        if not split_dir.is_dir():
            return refs, [DataError(split_dir, "missing split folder")]
        dirs = _visible_dirs(split_dir)
        if split != "test":
            for d in dirs:
                if d.name != NORMAL:
                    problems.append(DataError(d, f"unexpected folder in {split}/: only "
                                                 f"{NORMAL}/ (normal samples) is allowed"))
            dirs = [d for d in dirs if d.name == NORMAL]
            if not dirs:
                problems.append(DataError(split_dir / NORMAL, "missing folder of normal samples"))
        else:
            dirs = sorted(dirs, key=lambda d: (d.name != NORMAL, d.name))
            if not dirs:
                problems.append(DataError(split_dir, "no good/ or defect-type folders"))
        for d in dirs:
            refs.extend(self._pair(split, d, problems))
        return refs, problems

    def _pair(self, split: str, d: Path, problems: list[DataError]) -> list[SampleRef]:
        label = 0 if d.name == NORMAL else 1
        files: dict[str, dict[str, Path]] = {}
        for m in self.modalities:
            if not (d / m).is_dir():
                problems.append(DataError(d / m, f"missing {m}/ folder (other folders of "
                                                 f"{self.name} have {m} data)"))
                return []
            files[m] = _list_files(d / m, m, problems)
        gt_files: dict[str, Path] | None = None
        if split == "test":
            if (d / "gt").is_dir():
                gt_files = _list_files(d / "gt", "gt", problems)
            elif label == 1:
                problems.append(DataError(d / "gt", "missing gt/ folder for defect samples"))
                return []
        stems: set[str] = set().union(*(f.keys() for f in files.values()))
        refs: list[SampleRef] = []
        for stem in sorted(stems, key=_stem_order):
            present = {m: files[m][stem] for m in self.modalities if stem in files[m]}
            missing = [m for m in self.modalities if m not in present]
            if missing:
                have = next(iter(present.values()))
                m = missing[0]
                expected = d / m / f"{stem}{_SUFFIXES[m][0]}"
                problems.append(DataError(expected, f"missing: {have.parent.name}/{have.name} "
                                                    f"has no matching {m} file"))
                continue
            gt_path: Path | None = None
            if gt_files is not None:
                gt_path = gt_files.get(stem)
                if gt_path is None and label == 1:
                    have = next(iter(present.values()))
                    problems.append(DataError(d / "gt" / f"{stem}.png",
                                              f"missing: {have.parent.name}/{have.name} "
                                              f"has no matching gt mask"))
                    continue
            refs.append(SampleRef(
                category=self.name, split=split, defect_type=d.name, stem=stem,
                rgb_path=present.get("rgb"), xyz_path=present.get("xyz"), gt_path=gt_path,
                label=label,
            ))
        if gt_files is not None:
            for stem in sorted(set(gt_files) - stems, key=_stem_order):
                problems.append(DataError(gt_files[stem], "gt mask has no matching "
                                                          f"{'/'.join(self.modalities)} file"))
        return refs

    def refs(self, split: str) -> list[SampleRef]:
        """The paired sample references of a split; any problem raises `DataError`."""
        refs, problems = self.scan(split)
        if problems:
            raise problems[0]
        if not refs:
            raise DataError(self.root / split, "no samples in this split")
        return refs

    def load(self, ref: SampleRef) -> Sample:
        """Read one sample, checking that its rgb, xyz and gt sizes agree."""
        rgb = read_rgb(ref.rgb_path) if ref.rgb_path is not None else None
        xyz: np.ndarray | None = None
        valid: np.ndarray | None = None
        if ref.xyz_path is not None:
            xyz, valid = read_xyz(ref.xyz_path)
        first = rgb if rgb is not None else xyz
        first_path = ref.rgb_path if ref.rgb_path is not None else ref.xyz_path
        if first is None or first_path is None:
            raise DataError(None, f"{ref.key}: sample has neither an rgb nor an xyz file")
        size = first.shape[:2]
        if rgb is not None and xyz is not None and xyz.shape[:2] != size:
            raise DataError(ref.xyz_path, f"size {_wh(xyz.shape)} (W x H) differs from "
                                          f"{first_path.name} {_wh(size)}")
        if valid is None:
            valid = np.ones(size, dtype=bool)
        gt, gt_values = read_sample_gt(ref.gt_path, size, first_path, ref.label)
        return Sample(
            rgb=rgb, xyz=xyz, valid=valid, gt=gt, label=ref.label,
            defect_type=ref.defect_type, stem=ref.stem, category=self.name, split=ref.split,
            paths=ref.paths, gt_values=gt_values,
        )

    def samples(self, split: str, limit: int | None = None,
                progress: bool = False) -> list[Sample]:
        """Load the samples of a split (the first `limit` of them, in stem order)."""
        refs = self.refs(split)
        self._check_class_ids()
        if limit is not None:
            refs = refs[:limit]
        it = progress_bar(refs, desc=f"load {self.name}/{split}", unit="sample", enabled=progress)
        return [self.load(r) for r in it]


def _wh(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


class Dataset:
    """A dataset root holding category folders, or a single category folder itself."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "dataset folder not found")
        self.root = root
        if is_category_dir(root):
            self._dirs = {root.name: root}
        else:
            self._dirs = {d.name: d for d in _visible_dirs(root) if is_category_dir(d)}
        if not self._dirs:
            raise DataError(root, "no category folders found (a category folder holds "
                                  "train/, validation/ or test/)")

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, categories={self.categories})"

    @property
    def categories(self) -> list[str]:
        """Category names, sorted."""
        return sorted(self._dirs)

    def category(self, name: str) -> Category:
        """The named category; an unknown name raises `DataError` listing the known ones."""
        if name not in self._dirs:
            raise DataError(self.root, f"unknown category {name!r}; available: "
                                       f"{', '.join(self.categories)}")
        return Category(self._dirs[name])

    def __iter__(self) -> Iterator[Category]:
        return (Category(self._dirs[n]) for n in self.categories)
