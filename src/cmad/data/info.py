"""A summary of a dataset folder for `cmad info`: counts, types, sizes, and problems found.

Problems are collected, not raised, so one bad file does not hide the rest of the report.
Image sizes come from file headers only; no point cloud is decoded unless `verify` is set,
which reads every sample as `fit` would (a file truncated after its header is found only
then). Works on every layout `cmad.data.open_dataset` reads (MVTec 3D-AD, Eyecandies).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cmad.data.eyecandies import EyecandiesCategory, EyecandiesRef, read_depth_info
from cmad.data.io import image_size
from cmad.data.layout import open_dataset
from cmad.data.mvtec3d import SPLITS, Category, SampleRef
from cmad.errors import DataError
from cmad.progress import progress as progress_bar

__all__ = ["dataset_info", "format_info"]


def _ref_problems(ref: SampleRef | EyecandiesRef, sizes: set[tuple[int, int]]) -> list[str]:
    """Header sizes of one sample's files; adds rgb/xyz sizes (W, H) to `sizes`, returns the
    problems."""
    problems: list[str] = []
    found: list[tuple[Path, tuple[int, int]]] = []
    for path in (ref.rgb_path, ref.xyz_path, ref.gt_path):
        if path is None:
            continue
        try:
            found.append((path, image_size(path)))
        except DataError as exc:
            problems.append(str(exc))
    if isinstance(ref, EyecandiesRef):
        try:
            read_depth_info(ref.info_path)
        except DataError as exc:
            problems.append(str(exc))
    sizes.update((hw[1], hw[0]) for path, hw in found if path != ref.gt_path)
    if found:
        first_path, first = found[0]
        for path, hw in found[1:]:
            if hw != first:
                problems.append(str(DataError(
                    path, f"size {hw[1]}x{hw[0]} (W x H) differs from {first_path.name} "
                          f"{first[1]}x{first[0]}")))
    return problems


def _category_info(cat: Category | EyecandiesCategory, verify: bool = False,
                   progress: bool = False) -> dict[str, Any]:
    problems: list[str] = []
    splits: dict[str, int] = {}
    sizes: set[tuple[int, int]] = set()
    try:
        _ = cat.class_ids
    except DataError as exc:
        problems.append(str(exc))
    for split in SPLITS:
        refs, found = cat.scan(split)
        problems.extend(str(p) for p in found)
        if not refs and not found:
            problems.append(str(DataError(cat.root / split, "no samples in this split")))
        splits[split] = len(refs)
        for ref in progress_bar(refs, desc=f"{cat.name} {split}", unit="sample",
                                enabled=progress and verify):
            found_here = _ref_problems(ref, sizes)
            problems.extend(found_here)
            if verify and not found_here:
                try:
                    cat.load(ref)  # every pixel decoded, every check of a fit
                except DataError as exc:
                    problems.append(str(exc))
    return {
        "splits": splits,
        "defect_types": cat.defect_types,
        "modalities": list(cat.modalities),
        "image_sizes": [[w, h] for w, h in sorted(sizes)],
        "problems": problems,
    }


def dataset_info(root: str | Path, verify: bool = False, progress: bool = False
                 ) -> dict[str, Any]:
    """Summarise a dataset root (or a single category folder); `verify`: also read every
    sample whole (slower: every file decoded), `progress`: a bar over them.

    Returns {"categories": {NAME: {"splits": {"train": n, "validation": n, "test": n},
    "defect_types": [...], "modalities": [...], "image_sizes": [[W, H], ...],
    "problems": [...]}}}. Split counts are samples whose files paired cleanly.
    A root with no category folder at all (or of an unknown layout) raises `DataError`.
    """
    ds = open_dataset(root)
    categories: dict[str, Any] = {}
    for name in ds.categories:
        try:
            cat = ds.category(name)
        except DataError as exc:
            categories[name] = {"splits": {s: 0 for s in SPLITS}, "defect_types": [],
                                "modalities": [], "image_sizes": [], "problems": [str(exc)]}
            continue
        categories[name] = _category_info(cat, verify, progress)
    return {"categories": categories}


def format_info(info: dict[str, Any]) -> str:
    """A human-readable table of `dataset_info` output, followed by the problems found."""
    header = ["category", *SPLITS, "defect types", "modalities", "sizes (W x H)", "problems"]
    rows = [header]
    for name, c in info["categories"].items():
        rows.append([
            name,
            *(str(c["splits"].get(s, 0)) for s in SPLITS),
            ", ".join(c["defect_types"]) or "-",
            ", ".join(c["modalities"]) or "-",
            ", ".join(f"{w}x{h}" for w, h in c["image_sizes"]) or "-",
            str(len(c["problems"])),
        ])
    numeric = {1, 2, 3, len(header) - 1}
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                       for i, cell in enumerate(r)).rstrip() for r in rows]
    for name, c in info["categories"].items():
        if c["problems"]:
            lines.append("")
            lines.append(f"problems in {name}:")
            lines.extend(f"  - {p}" for p in c["problems"])
    if not any(c["problems"] for c in info["categories"].values()):
        lines.append("")
        lines.append("no problems found")
    return "\n".join(lines)
