"""Which reader a dataset folder needs: `open_dataset(root)` detects the layout.

MVTec 3D-AD: `<category>/{train,validation,test}/<type>/{rgb,xyz,gt}/NNN.*`.
Eyecandies: `<Category>/{train,val,test_public,test_private}/data/NNN_image_K.png, ...`.
Either as a folder of categories or as one category folder. Eyecandies is checked first:
its category folders also have a train/ folder.
"""
from __future__ import annotations

from pathlib import Path

from cmad.data.eyecandies import EyecandiesDataset, EyecandiesOptions, is_eyecandies_category
from cmad.data.mvtec3d import Dataset, is_category_dir
from cmad.errors import DataError

__all__ = ["EXPECTED_LAYOUTS", "detect_layout", "open_dataset"]

EXPECTED_LAYOUTS = (
    "expected an MVTec 3D-AD category (<category>/{train,validation,test}/<type>/"
    "{rgb,xyz,gt}/NNN.*) or an Eyecandies category (<Category>/{train,val,test_public}/data/"
    "NNN_image_K.png, NNN_depth.png, NNN_info_depth.yaml, ...), or a folder of such "
    "categories"
)


def _kind(folder: Path) -> str | None:
    if is_eyecandies_category(folder):
        return "eyecandies"
    if is_category_dir(folder):
        return "mvtec3d"
    return None


def detect_layout(root: str | Path) -> str:
    """"mvtec3d" or "eyecandies" for a category folder or a folder of categories.

    A missing folder, one holding neither layout, or one mixing categories of both raises
    `DataError` naming the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    own = _kind(root)
    if own is not None:
        return own
    kinds: dict[str, list[str]] = {}
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            k = _kind(d)
            if k is not None:
                kinds.setdefault(k, []).append(d.name)
    if not kinds:
        raise DataError(root, f"unknown dataset layout: {EXPECTED_LAYOUTS}")
    if len(kinds) > 1:
        raise DataError(root, "mixed dataset layouts: MVTec 3D-AD categories "
                              f"({', '.join(kinds['mvtec3d'])}) beside Eyecandies categories "
                              f"({', '.join(kinds['eyecandies'])}); keep them in separate folders")
    return next(iter(kinds))


def open_dataset(root: str | Path,
                 eyecandies: EyecandiesOptions | None = None) -> Dataset | EyecandiesDataset:
    """The reader for `root`: `Dataset` (MVTec 3D-AD layout) or `EyecandiesDataset`.

    `eyecandies` sets the Eyecandies reader options (lighting, depth scale, focal length)
    and is ignored for MVTec 3D-AD data.
    """
    if detect_layout(root) == "eyecandies":
        return EyecandiesDataset(root, eyecandies)
    return Dataset(root)
