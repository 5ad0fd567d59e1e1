"""A montage of a dataset in the MVTec 3D-AD layout: one row per category, rgb | depth | gt.

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend
switch), rendered to PNG bytes in memory and written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cmad.data.io import read_gt, read_rgb, read_xyz, write_bytes_atomic
from cmad.errors import DataError

__all__ = ["montage"]

# test folders of cmad synthetic data shown first (any others follow by name)
_PREFER = ["combined", "stain", "dent", "hole", "cut", "contamination"]

_Pick = tuple[str, Path, Path, Path | None]   # title, rgb, xyz, gt (None: a good sample)


def _picks(cat_dir: Path) -> list[_Pick]:
    """The first good training sample and the first sample of each test defect folder."""
    picks: list[_Pick] = []
    tr = sorted((cat_dir / "train" / "good" / "rgb").glob("*.png"))
    if tr:
        picks.append((f"{cat_dir.name} train/good/{tr[0].stem}", tr[0],
                      tr[0].parent.parent / "xyz" / f"{tr[0].stem}.tiff", None))
    test = cat_dir / "test"
    folders = sorted((d for d in test.iterdir() if d.is_dir() and d.name != "good"),
                     key=lambda d: (_PREFER.index(d.name) if d.name in _PREFER else 99,
                                    d.name)) if test.is_dir() else []
    for d in folders:
        files = sorted((d / "rgb").glob("*.png"))
        if files:
            f = files[0]
            picks.append((f"{d.name}/{f.stem}", f, d / "xyz" / f"{f.stem}.tiff",
                          d / "gt" / f"{f.stem}.png"))
    return picks


def montage(root: Path, out_png: Path, per_category: int = 4) -> Path:
    """Save a figure with one row per category under `root`: for a good training sample and
    test samples of different defect types, rgb | depth (invalid points black) | gt.
    Returns `out_png`; DataError if `root` holds no samples."""
    root = Path(root)
    rows: list[list[_Pick]] = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        picks = _picks(cat_dir)
        if picks:
            rows.append(picks[:per_category])
    if not rows:
        raise DataError(root, "no samples found for a montage")
    ncol = 3 * max(len(r) for r in rows)
    fig = Figure(figsize=(1.9 * ncol, 2.0 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    cmap = colormaps["viridis_r"].with_extremes(bad="black")
    for r, picks in enumerate(rows):
        for c, (title, rgb_p, xyz_p, gt_p) in enumerate(picks):
            rgb = read_rgb(rgb_p)
            xyz, valid = read_xyz(xyz_p)
            z = xyz[..., 2]
            lo, hi = np.percentile(z[valid], [1, 99]) if valid.any() else (0.0, 1.0)
            ax_rgb, ax_z, ax_gt = axes[r, 3 * c], axes[r, 3 * c + 1], axes[r, 3 * c + 2]
            ax_rgb.imshow(rgb)
            ax_rgb.set_title(title, fontsize=7)
            ax_z.imshow(np.ma.masked_where(~valid, z), cmap=cmap, vmin=lo, vmax=hi)
            ax_z.set_title(f"z {lo * 1000:.0f}-{hi * 1000:.0f} mm", fontsize=7)
            gt = read_gt(gt_p) if gt_p is not None else np.zeros(rgb.shape[:2], np.uint8)
            ax_gt.imshow(gt, cmap="gray", vmin=0, vmax=255)
            vals = sorted(int(v) for v in np.unique(gt) if v)
            ax_gt.set_title(f"gt {vals}" if vals else "gt: normal", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    out_png = Path(out_png)
    write_bytes_atomic(out_png, buf.getvalue())
    return out_png
