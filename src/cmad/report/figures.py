"""Report figures: one qualitative panel per test sample and grouped bar charts per metric.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no
global backend switch), rendered to PNG bytes in memory and written atomically.
"""
from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from cmad.data.io import write_bytes_atomic
from cmad.model.decision import colour_range, heat
from cmad.report.tables import as_float, categories_of, fmt_metric, methods_of, shot_counts

logger = logging.getLogger(__name__)

BRANCHES: tuple[tuple[str, str], ...] = (("cross-modal", "Cross-modal"),
                                         ("rgb-bank", "RGB bank"), ("3d-bank", "3D bank"))
FUSED = ("fused", "Fused")
MAP_CMAP = "inferno"
DEPTH_CMAP = "viridis"
GT_COLOUR = "#ffffff"      # ground-truth outline (dashed)
MASK_COLOUR = "#00e6ff"    # predicted defect mask outline, as in `cmad predict` overlays
DPI = 100


def panel_filename(category: str, defect_type: str, stem: str) -> str:
    """`panel_<category>_<defect>_<stem>.png` with unsafe characters replaced by '-'."""
    parts = [re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)).strip("-.") or "x"
             for p in (category, defect_type, stem)]
    return "panel_" + "_".join(parts) + ".png"


def map_scale(maps: Sequence[np.ndarray | None]) -> tuple[float, float]:
    """A shared colour range for standardised maps: 0 (normal median) to max(1, largest value).

    1 is about the normal 99th percentile, so a normal sample stays dark and a defect that
    rises far above it is the brightest thing in the row.
    """
    highs = [float(np.nanmax(m)) for m in maps
             if m is not None and m.size and np.isfinite(m).any()]
    return 0.0, max([1.0, *(h for h in highs if math.isfinite(h))])


def render_panel(panel: Mapping[str, Any]) -> bytes:
    """One row: RGB | depth | ground truth | cross-modal | RGB bank | 3D bank | fused (PNG)."""
    maps = panel.get("maps") or {}
    gt = _as_array(panel.get("gt"))
    gt = gt.astype(bool) if gt is not None else None
    branch_maps = [_as_array(maps.get(k)) for k, _ in BRANCHES]
    fused = _as_array(maps.get(FUSED[0]))
    b_lo, b_hi = map_scale(branch_maps)
    f_lo, f_hi = map_scale([fused])

    fig, axes, branch_cax, fused_cax = _panel_layout()
    _show_rgb(axes[0], _as_array(panel.get("rgb")))
    _show_depth(axes[1], _as_array(panel.get("depth")))
    _show_gt(axes[2], gt)
    branch_im = None
    for ax, arr, (_, title) in zip(axes[3:6], branch_maps, BRANCHES):
        im = _show_map(ax, arr, title, b_lo, b_hi, gt)
        if branch_im is None:
            branch_im = im
    threshold = as_float(panel.get("threshold"))
    pixel_threshold = as_float(panel.get("pixel_threshold"))
    score = as_float(panel.get("score"))
    decided = math.isfinite(threshold) and fused is not None
    anomalous = decided and math.isfinite(score) and score > threshold
    if decided:
        f_lo, f_hi = colour_range(threshold, fused)
        fused_im = _show_decision(axes[6], fused, _as_array(panel.get("rgb")), threshold,
                                  pixel_threshold, anomalous, f_lo, f_hi, gt)
    else:
        fused_im = _show_map(axes[6], fused, FUSED[1], f_lo, f_hi, gt)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fused_label = "fused score"
    if decided:
        fused_label = f"fused score {f_lo:.2f}-{f_hi:.2f} (none below {f_lo:.2f})"
    for cax, im, label in ((branch_cax, branch_im,
                            "branch score (0 = normal median, 1 = normal p99)"),
                           (fused_cax, fused_im, fused_label)):
        if im is None:
            cax.set_visible(False)
            continue
        cb = fig.colorbar(im, cax=cax, orientation="horizontal")
        cb.ax.tick_params(labelsize=7, length=2, pad=1)
        cb.set_label(label, fontsize=7, labelpad=1)
        if im is fused_im and decided:
            # one tick, at the threshold: end labels would collide with the next bar's
            cb.set_ticks([threshold], labels=[f"threshold {threshold:.2f}"])
            cb.ax.axvline(threshold, color="white", linewidth=1.2)
    fig.text(0.004, 0.03, "dashed white: ground-truth defect   cyan: predicted defect mask   "
             "depth: black = invalid or background", fontsize=7.5, color="#555555")
    label = panel.get("label")
    label_text = "n/a" if label is None else ("defect" if int(label) else "good")
    title = (f"{panel.get('category', '?')} / {panel.get('defect_type', '?')} / "
             f"{panel.get('stem', '?')}     image score {_fmt_score(score)}")
    if decided:
        title += f" {'>' if anomalous else '<='} threshold {_fmt_score(threshold)}"
    title += f"     label {label if label is not None else 'n/a'} ({label_text})"
    fig.suptitle(title, fontsize=11, fontweight="bold", x=0.004, y=0.985, ha="left", va="top")
    if decided:
        right = label is not None and bool(int(label)) == anomalous
        fig.text(0.996, 0.985, ("ANOMALOUS" if anomalous else "NORMAL")
                 + ("" if label is None else ("  (correct)" if right else "  (wrong)")),
                 fontsize=11, fontweight="bold", ha="right", va="top",
                 color="#c62828" if anomalous else "#2e7d32")
    return _png(fig)


def _show_decision(ax: Axes, amap: np.ndarray, rgb: np.ndarray | None, threshold: float,
                   pixel_threshold: float, anomalous: bool, lo: float, hi: float,
                   gt: np.ndarray | None) -> Any:
    """The fused map over the image as in `cmad predict` overlays: colour relative to the
    threshold (none below its low end), the predicted mask outlined; returns a mappable
    for the colour bar."""
    from matplotlib.cm import ScalarMappable

    arr = np.nan_to_num(amap.astype(np.float64), nan=lo)
    c, alpha = heat(arr, threshold)
    cmap = colormaps[MAP_CMAP]
    col = cmap(c)[..., :3]
    if rgb is not None and rgb.shape[:2] == arr.shape:
        base = rgb[..., :3].astype(np.float64) / 255.0
    else:
        base = np.full(arr.shape + (3,), 0.5)
    ax.imshow(base * (1 - alpha[..., None]) + col * alpha[..., None], interpolation="antialiased")
    if gt is not None and gt.shape == arr.shape and gt.any() and not gt.all():
        ax.contour(gt.astype(np.float32), levels=[0.5], colors=GT_COLOUR, linewidths=0.9,
                   linestyles="dashed")
    mask = arr > (pixel_threshold if math.isfinite(pixel_threshold) else threshold)
    if anomalous and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=MASK_COLOUR, linewidths=1.4)
    ax.set_title(f"{FUSED[1]}: {'ANOMALOUS' if anomalous else 'normal'}", fontsize=10,
                 color="#c62828" if anomalous else "#2e7d32", fontweight="bold")
    return ScalarMappable(norm=Normalize(lo, hi), cmap=cmap)


def _panel_layout() -> tuple[Figure, list[Axes], Axes, Axes]:
    """Seven square image axes in one row, a gap before the maps, colour bars underneath."""
    width, height = 15.4, 3.3
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    margin, gap, group_gap = 0.004, 0.005, 0.012
    side = (1 - 2 * margin - 5 * gap - group_gap) / 7
    tall = side * width / height
    bottom = 0.84 - tall
    lefts, x = [], margin
    for i in range(7):
        lefts.append(x)
        x += side + (group_gap if i == 2 else gap)
    axes = [fig.add_axes((lx, bottom, side, tall)) for lx in lefts]
    cb_h, cb_y = 0.045, bottom - 0.075
    branch_cax = fig.add_axes((lefts[3], cb_y, lefts[5] + side - lefts[3], cb_h))
    fused_cax = fig.add_axes((lefts[6], cb_y, side, cb_h))
    return fig, axes, branch_cax, fused_cax


def render_metric_bars(results: Mapping[str, Any], metric: str) -> bytes:
    """Grouped bars of per-category `metric` by method, plus the Mean group, as PNG."""
    methods = methods_of(results)
    names = list(methods)
    cats = categories_of(methods.values())
    groups = [*cats, "Mean"]
    data = np.array([[as_float(((e.get("categories") or {}).get(c) or {}).get(metric))
                      for c in cats] + [as_float((e.get("mean") or {}).get(metric))]
                     for e in methods.values()], dtype=float).reshape(len(names), len(groups))

    n_m = max(len(names), 1)
    bar_w = 0.8 / n_m
    width = min(max(7.0, 1.6 + len(groups) * (0.16 * n_m + 0.45)), 22.0)
    fig = Figure(figsize=(width, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = _method_colours(names)
    x = np.arange(len(groups), dtype=float)
    finite = data[np.isfinite(data)]
    lo = 0.0 if finite.size == 0 else max(0.0, math.floor((finite.min() - 0.05) * 10) / 10)
    lo = min(lo, 0.5)
    for i, name in enumerate(names):
        xs = x - 0.4 + bar_w * (i + 0.5)
        vals = data[i]
        ok = np.isfinite(vals)
        ax.bar(xs[ok], vals[ok] - lo, bar_w * 0.92, bottom=lo, color=colours[name],
               label=name, edgecolor="white", linewidth=0.4, zorder=3)
        for xi in xs[~ok]:
            ax.text(xi, lo + 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=6,
                    color="#777777")
        mean_v = vals[-1]
        if math.isfinite(mean_v):
            ax.text(xs[-1], mean_v + 0.005, fmt_metric(mean_v), rotation=90, ha="center",
                    va="bottom", fontsize=7 if n_m <= 6 else 6, zorder=4)
    if len(groups) > 1:
        ax.axvline(len(groups) - 1.5, color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 6 else 0,
                  ha="right" if len(groups) > 6 else "center")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(lo, 1.0 + (0.08 if lo < 0.5 else 0.06) * (1.0 - lo) / 0.5)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per category by method", fontsize=12, fontweight="bold")
    ax.yaxis.grid(True, color="#dddddd", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if names:
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=9,
                  title="method", title_fontsize=9)
    return _png(fig)


def render_few_shot(results: Mapping[str, Any],
                    metrics: Sequence[str] = ("I-AUROC", "AUPRO@30%")) -> bytes | None:
    """Mean `metrics` against the number of shots, one line per method (None without shots).

    The full-data result of each method is drawn as a dashed horizontal line.
    """
    shots = results.get("shots") or {}
    ks = [k for k in shot_counts(results) if _finite_num(k)]
    if not ks:
        return None
    by_str = {str(k): v for k, v in shots.items()}
    names = list(dict.fromkeys(m for k in ks for m in (by_str.get(k) or {})))
    full = methods_of(results)
    colours = _method_colours(list(dict.fromkeys([*full, *names])))
    fig = Figure(figsize=(5.2 * len(metrics) + 1.6, 3.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    xs = [float(k) for k in ks]
    for ax, metric in zip(axes, metrics):
        for name in names:
            ys = [as_float(((by_str.get(k) or {}).get(name, {}).get("mean") or {}).get(metric))
                  for k in ks]
            ax.plot(xs, ys, marker="o", color=colours[name], label=name, zorder=3)
            if name in full:
                y_full = as_float((full[name].get("mean") or {}).get(metric))
                if math.isfinite(y_full):
                    ax.axhline(y_full, color=colours[name], linestyle="--", linewidth=0.9,
                               alpha=0.8)
        ax.set_xscale("log")
        ax.set_xticks(xs, [k for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("training samples (shots); dashed: all")
        ax.set_ylabel(f"mean {metric}")
        ax.set_title(f"mean {metric} by shots", fontsize=11, fontweight="bold")
        ax.yaxis.grid(True, color="#dddddd", linewidth=0.8, zorder=0)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return _png(fig)


def write_png(path: Path, png: bytes) -> Path:
    """Write PNG bytes atomically and return the path."""
    write_bytes_atomic(path, png)
    return path


def _show_rgb(ax: Axes, rgb: np.ndarray | None) -> None:
    if rgb is None:
        _empty(ax, "RGB")
        return
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    ax.imshow(rgb, interpolation="antialiased")
    ax.set_title("RGB", fontsize=10)


def _show_depth(ax: Axes, depth: np.ndarray | None) -> None:
    if depth is None:
        _empty(ax, "Depth")
        return
    depth = depth.astype(np.float64)
    valid = np.isfinite(depth) & (depth != 0)
    cmap = _cmap(DEPTH_CMAP, bad="black")
    if valid.any():
        lo, hi = np.percentile(depth[valid], [1, 99])
        hi = hi if hi > lo else lo + 1e-6
    else:
        lo, hi = 0.0, 1.0
    ax.imshow(np.ma.masked_array(depth, ~valid), cmap=cmap, norm=Normalize(lo, hi),
              interpolation="nearest")
    ax.set_title("Depth", fontsize=10)


def _show_gt(ax: Axes, gt: np.ndarray | None) -> None:
    if gt is None:
        _empty(ax, "Ground truth")
        return
    ax.imshow(gt, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"Ground truth ({100.0 * gt.mean():.1f}%)" if gt.any() else "Ground truth",
                 fontsize=10)


def _show_map(ax: Axes, amap: np.ndarray | None, title: str, lo: float, hi: float,
              gt: np.ndarray | None) -> Any:
    if amap is None:
        _empty(ax, title)
        return None
    arr = amap.astype(np.float64)
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=_cmap(MAP_CMAP, bad="#303030"),
                   norm=Normalize(lo, hi, clip=True), interpolation="antialiased")
    if gt is not None and gt.shape == arr.shape and gt.any() and not gt.all():
        ax.contour(gt.astype(np.float32), levels=[0.5], colors=GT_COLOUR, linewidths=0.9,
                   linestyles="dashed")
    peak = float(np.nanmax(arr)) if np.isfinite(arr).any() else math.nan
    ax.set_title(f"{title}  (max {_fmt_score(peak)})", fontsize=10)
    return im


def _empty(ax: Axes, title: str) -> None:
    ax.set_facecolor("#f2f2f2")
    ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", fontsize=14,
            color="#888888")
    ax.set_title(title, fontsize=10, color="#888888")
    ax.set_aspect("equal")
    for spine in ax.spines.values():
        spine.set_color("#cccccc")


def _cmap(name: str, bad: str) -> Colormap:
    return colormaps[name].with_extremes(bad=bad)


def _method_colours(names: Sequence[str]) -> dict[str, Any]:
    """A stable colour per method: tab10 up to ten methods, tab20 beyond."""
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def _as_array(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    arr = np.asarray(v)
    return arr if arr.size else None


def _fmt_score(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _finite_num(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()
