"""Report figures: one qualitative panel per test sample and grouped bar charts per metric.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no
global backend switch), rendered to PNG bytes in memory and written atomically.
"""
from __future__ import annotations

import hashlib
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
from matplotlib.ticker import MaxNLocator, MultipleLocator

from cmad.data.io import write_bytes_atomic
from cmad.model.decision import colour_range, defect_mask, heat
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
PANEL_SIZE = (8.8, 5.9)       # inches at DPI: 880 x 590 px
TITLE_PT, TEXT_PT = 11, 10    # panel titles and small print (tick labels, notes)


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
    """RGB | depth | ground truth above cross-modal | RGB bank | 3D bank | fused (PNG)."""
    return _png(panel_figure(panel))


def panel_figure(panel: Mapping[str, Any]) -> Figure:
    """The panel of `render_panel` as a matplotlib Figure."""
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
        cb.ax.tick_params(labelsize=TEXT_PT, length=2, pad=1)
        cb.set_label(label, fontsize=TEXT_PT, labelpad=2)
        if im is fused_im and decided:
            # one tick, at the threshold: end labels would collide with the next bar's
            cb.set_ticks([threshold], labels=[f"threshold {threshold:.2f}"])
            cb.ax.axvline(threshold, color="white", linewidth=1.2)
        else:
            cb.ax.xaxis.set_major_locator(MaxNLocator(nbins=5 if cax is branch_cax else 3))
    fig.text(0.012, 0.012, "dashed white: ground-truth defect   cyan: predicted defect mask   "
             "depth: black = invalid or background", fontsize=TEXT_PT, color="#555555")
    label = panel.get("label")
    label_text = "n/a" if label is None else ("defect" if int(label) else "good")
    title = (f"{panel.get('category', '?')} / {panel.get('defect_type', '?')} / "
             f"{panel.get('stem', '?')}     image score {_fmt_score(score)}")
    if decided:
        title += f" {'>' if anomalous else '<='} threshold {_fmt_score(threshold)}"
    title += f"     label {label if label is not None else 'n/a'} ({label_text})"
    fig.suptitle(title, fontsize=TITLE_PT + 1, fontweight="bold", x=0.012, y=0.99, ha="left",
                 va="top")
    if decided:
        right = label is not None and bool(int(label)) == anomalous
        fig.text(0.988, 0.99, ("ANOMALOUS" if anomalous else "NORMAL")
                 + ("" if label is None else ("  (correct)" if right else "  (wrong)")),
                 fontsize=TITLE_PT + 1, fontweight="bold", ha="right", va="top",
                 color="#c62828" if anomalous else "#2e7d32")
    return fig


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
    mask = defect_mask(arr, anomalous,
                       pixel_threshold if math.isfinite(pixel_threshold) else threshold)
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=MASK_COLOUR, linewidths=1.4)
    ax.set_title(f"{FUSED[1]}: {'ANOMALOUS' if anomalous else 'normal'}", fontsize=10,
                 color="#c62828" if anomalous else "#2e7d32", fontweight="bold")
    return ScalarMappable(norm=Normalize(lo, hi), cmap=cmap)


def _panel_layout() -> tuple[Figure, list[Axes], Axes, Axes]:
    """Two rows of square image axes: RGB | depth | ground truth, then the three branch maps
    and the fused map; colour bars under the maps.

    About 880 px wide, so that a panel shown at half a laptop screen or on an 800 px
    window keeps its text at a readable size (about 11 px and more).
    """
    width, height = PANEL_SIZE
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    margin, gap = 0.012, 0.024
    side = (1 - 2 * margin - 3 * gap) / 4           # in figure widths
    tall = side * width / height                    # the same side in figure heights
    lefts = [margin + i * (side + gap) for i in range(4)]
    top_bottom = 0.905 - tall
    low_bottom = top_bottom - 0.075 - tall
    axes = [fig.add_axes((lx, top_bottom, side, tall)) for lx in lefts[:3]]
    axes += [fig.add_axes((lx, low_bottom, side, tall)) for lx in lefts]
    cb_h, cb_y = 0.022, low_bottom - 0.05
    inset = 0.012                                   # keeps the two bars' end labels apart
    branch_cax = fig.add_axes((lefts[0] + inset, cb_y, lefts[2] + side - lefts[0] - 2 * inset,
                               cb_h))
    fused_cax = fig.add_axes((lefts[3] + inset, cb_y, side - 2 * inset, cb_h))
    return fig, axes, branch_cax, fused_cax


def render_metric_bars(results: Mapping[str, Any], metric: str) -> bytes:
    """Grouped bars of per-category `metric` by method, plus the Mean group, as PNG."""
    return _png(metric_bars_figure(results, metric))


def metric_bars_figure(results: Mapping[str, Any], metric: str) -> Figure:
    """The chart of `render_metric_bars` as a matplotlib Figure.

    About 800 px wide (more only with many categories and methods), the y-axis within
    [0, 1], the legend under the plot, each method in its fixed colour (`method_colour`).
    """
    methods = methods_of(results)
    names = list(methods)
    cats = categories_of(methods.values())
    groups = [*cats, "Mean"]
    data = np.array([[as_float(((e.get("categories") or {}).get(c) or {}).get(metric))
                      for c in cats] + [as_float((e.get("mean") or {}).get(metric))]
                     for e in methods.values()], dtype=float).reshape(len(names), len(groups))

    n_m = max(len(names), 1)
    bar_w = 0.8 / n_m
    width = min(max(8.0, 1.2 + len(groups) * (0.12 * n_m + 0.3)), 16.0)
    entry_w = 0.4 + 0.075 * max((len(str(n)) for n in names), default=4)  # inches per entry
    legend_cols = max(1, min(len(names), int((width - 0.3) / entry_w)))
    legend_rows = math.ceil(len(names) / legend_cols)
    fig = Figure(figsize=(width, 3.9 + 0.22 * legend_rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(groups), dtype=float)
    lo = axis_floor(data)
    span = 1.0 - lo
    for i, name in enumerate(names):
        xs = x - 0.4 + bar_w * (i + 0.5)
        vals = data[i]
        ok = np.isfinite(vals)
        ax.bar(xs[ok], vals[ok] - lo, bar_w * 0.92, bottom=lo, color=method_colour(name),
               label=name, edgecolor="white", linewidth=0.4, zorder=3)
        for xi in xs[~ok]:
            ax.text(xi, lo + 0.01 * span, "n/a", rotation=90, ha="center", va="bottom",
                    fontsize=8, color="#777777")
        mean_v = vals[-1]
        if math.isfinite(mean_v) and n_m <= 12:
            inside = mean_v - lo > 0.3 * span       # the value written inside the bar's top
            ax.text(xs[-1], mean_v - 0.01 * span if inside else mean_v + 0.01 * span,
                    fmt_metric(mean_v), rotation=90, ha="center",
                    va="top" if inside else "bottom", fontsize=8,
                    color="white" if inside else "#333333", zorder=4)
    if len(groups) > 1:
        ax.axvline(len(groups) - 1.5, color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 6 else 0,
                  ha="right" if len(groups) > 6 else "center", fontsize=10)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(lo, 1.0)
    ax.yaxis.set_major_locator(MultipleLocator(0.1 if span <= 0.6 else 0.2))
    ax.tick_params(axis="y", labelsize=10)
    ax.set_ylabel(metric, fontsize=10)
    ax.yaxis.grid(True, color="#dddddd", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{metric} per category by method", fontsize=12, fontweight="bold")
    if names:
        fig.legend(loc="outside lower center", ncol=legend_cols,
                   frameon=False, fontsize=10, handlelength=1.2, columnspacing=1.2)
    return fig


def axis_floor(data: np.ndarray) -> float:
    """The lower end of a metric axis: 0.1 steps below the smallest value, at most 0.5."""
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0
    return float(min(0.5, max(0.0, math.floor((float(finite.min()) - 0.05) * 10) / 10)))


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
    fig = Figure(figsize=(5.2 * len(metrics) + 1.6, 3.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    xs = [float(k) for k in ks]
    for ax, metric in zip(axes, metrics):
        for name in names:
            ys = [as_float(((by_str.get(k) or {}).get(name, {}).get("mean") or {}).get(metric))
                  for k in ks]
            ax.plot(xs, ys, marker="o", color=method_colour(name), label=name, zorder=3)
            if name in full:
                y_full = as_float((full[name].get("mean") or {}).get(metric))
                if math.isfinite(y_full):
                    ax.axhline(y_full, color=method_colour(name), linestyle="--",
                               linewidth=0.9, alpha=0.8)
        ax.set_xscale("log")
        ax.set_xticks(xs, [k for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("training samples (shots); dashed: all")
        ax.set_ylabel(f"mean {metric}")
        shown = [float(v) for ln in ax.get_lines() for v in np.atleast_1d(ln.get_ydata())]
        ax.set_ylim(axis_floor(np.array(shown, dtype=float)), 1.0)
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
    ax.set_title("RGB", fontsize=TITLE_PT)


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
    ax.set_title("Depth", fontsize=TITLE_PT)


def _show_gt(ax: Axes, gt: np.ndarray | None) -> None:
    if gt is None:
        _empty(ax, "Ground truth")
        return
    ax.imshow(gt, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"Ground truth ({100.0 * gt.mean():.1f}%)" if gt.any() else "Ground truth",
                 fontsize=TITLE_PT)


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
    ax.set_title(f"{title} (max {_fmt_score(peak)})", fontsize=TITLE_PT)
    return im


def _empty(ax: Axes, title: str) -> None:
    ax.set_facecolor("#f2f2f2")
    ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", fontsize=14,
            color="#888888")
    ax.set_title(title, fontsize=TITLE_PT, color="#888888")
    ax.set_aspect("equal")
    for spine in ax.spines.values():
        spine.set_color("#cccccc")


def _cmap(name: str, bad: str) -> Colormap:
    return colormaps[name].with_extremes(bad=bad)


# Fixed colours: a method has the same colour in every report, whatever else it is shown with.
METHOD_COLOURS: dict[str, str] = {
    "cmad": "#1f77b4",        # blue: the method
    "btf": "#d62728",         # red: the baseline
    "align": "#2ca02c",
    "joint-bank": "#9467bd",
    "rgb-bank": "#ff7f0e",
    "xyz-bank": "#8c564b",
    "mapping": "#17becf",
    "geom-bank": "#bcbd22",
    "align-map": "#98df8a",
    "banks": "#ffbb78",
    "cross-modal": "#c5b0d5",
    "btf-full": "#ff9896",
    "full-banks": "#c49c94",
    "cmad-auto": "#aec7e8",
    "cmad-equal": "#393b79",
}
# other names: a colour picked from the name's hash (stable across runs and reports)
_OTHER_COLOURS = ("#e377c2", "#7f7f7f", "#f7b6d2", "#9edae5", "#5254a3", "#637939",
                  "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                  "#756bb1", "#636363", "#6b6ecf", "#b5cf6b", "#e7ba52", "#d6616b")


def method_colour(name: str) -> str:
    """The fixed colour of a method: its entry in METHOD_COLOURS, else one from its name's
    hash, so the same method has the same colour in every report."""
    if name in METHOD_COLOURS:
        return METHOD_COLOURS[name]
    h = int(hashlib.sha256(str(name).encode()).hexdigest(), 16)
    return _OTHER_COLOURS[h % len(_OTHER_COLOURS)]


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
