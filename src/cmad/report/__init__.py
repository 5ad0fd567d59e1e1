"""The `cmad bench` report: results.json, tables (markdown, CSV), figures and index.html.

`write_report(out_dir, results, panels)` writes everything into one new folder per run;
every file is written atomically (temporary file, then rename), nothing is appended.
`summary_text(results)` is the compact table for the terminal.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmad.data.io import write_bytes_atomic
from cmad.progress import progress as progress_bar
from cmad.report.figures import (
    panel_filename,
    render_few_shot,
    render_metric_bars,
    render_panel,
    write_png,
)
from cmad.report.html import DETAILS, PanelLink, render_details, render_index, summary_panels
from cmad.report.tables import (
    METRICS,
    Table,
    as_float,
    comparison_table,
    decision_table,
    efficiency_table,
    few_shot_table,
    headline_table,
    metric_table,
    per_defect_long_csv,
    per_defect_tables,
    runtime_table,
    stream_table,
    summary_text,
    targets_table,
)

__all__ = ["summary_text", "to_json", "write_report"]

logger = logging.getLogger(__name__)

BAR_CHARTS: tuple[tuple[str, str], ...] = (("I-AUROC", "iauroc_by_method.png"),
                                           ("AUPRO@30%", "aupro_by_method.png"))


def to_json(results: Mapping[str, Any]) -> str:
    """results as indented JSON; NaN and inf become null, numpy scalars and arrays plain."""
    return json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"


def write_report(out_dir: Path, results: dict, panels: list[dict], *,
                 quiet: bool = False) -> Path:
    """Write the whole report into `out_dir` (created if needed); returns index.html's path.

    Files: results.json, tables.md, tables/<metric>.md|.csv, tables/comparison.md|.csv (with
    per-part scores of two or more methods), tables/efficiency.md|.csv,
    tables/per_defect.md|.csv, tables/few_shot.md|.csv (with shots), figures/*.png,
    index.html (the summary: headline table, charts, a few panels) and details.html (every
    table and panel). `quiet` hides the progress bar over panels.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "results.json", to_json(results))

    metric_tables = [metric_table(results, m) for m in METRICS]
    efficiency = efficiency_table(results)
    per_defect = per_defect_tables(results)
    few_shot = few_shot_table(results)
    headline = headline_table(results)
    decisions = [t for t in (decision_table(results), targets_table(results)) if t is not None]
    # the paired comparison belongs with the accuracy tables
    compared = [t for t in (comparison_table(results),) if t is not None]
    files: list[tuple[str, str]] = [("results.json", "all numbers, for scripts"),
                                    ("tables.md", "every table in one markdown file")]
    for t in [*metric_tables, *compared, efficiency, *decisions]:
        _write_table(out / "tables", t)
        files.append((f"tables/{t.slug}.csv", f"{t.title} as CSV"))
    if per_defect:
        _write_text(out / "tables" / "per_defect.md",
                    "## Per defect type\n\n" + "\n".join(t.to_markdown() for t in per_defect))
        _write_text(out / "tables" / "per_defect.csv", per_defect_long_csv(results))
        files.append(("tables/per_defect.csv", "every metric per method, category and defect"))
    runtimes = runtime_table(results)
    if runtimes is not None:
        _write_table(out / "tables", runtimes)
        files.append((f"tables/{runtimes.slug}.csv", "torch against ONNX Runtime as CSV"))
    throughput = stream_table(results)
    if throughput is not None:
        _write_table(out / "tables", throughput)
        files.append((f"tables/{throughput.slug}.csv", "samples per second, streamed, as CSV"))
    if few_shot is not None:
        _write_text(out / "tables" / "few_shot.md", few_shot.to_markdown(level=2))
        _write_text(out / "tables" / "few_shot.csv", few_shot.to_csv())
        files.append(("tables/few_shot.csv", "few-shot results as CSV"))
    _write_text(out / "tables.md", _all_tables_md(results, headline, [*metric_tables, *compared],
                                                  efficiency,
                                                  per_defect, few_shot, decisions, runtimes,
                                                  throughput))

    charts: list[tuple[str, str]] = []
    widest = 0
    for metric, name in BAR_CHARTS:
        png = render_metric_bars(results, metric)
        widest = max(widest, png_width(png))
        write_png(out / "figures" / name, png)
        charts.append((f"figures/{name}", f"{metric} per category by method"))
    few_png = render_few_shot(results)
    if few_png is not None:
        write_png(out / "figures" / "few_shot.png", few_png)
        charts.append(("figures/few_shot.png", "mean accuracy against the number of shots"))

    links: list[PanelLink] = []
    used: set[str] = set()
    for panel in progress_bar(panels, desc="report panels", unit="panel",
                              enabled=not quiet and bool(panels)):
        name = _unique(panel_filename(str(panel.get("category", "")),
                                      str(panel.get("defect_type", "")),
                                      str(panel.get("stem", ""))), used)
        write_png(out / "figures" / name, render_panel(panel))
        label = panel.get("label")
        links.append(PanelLink(category=str(panel.get("category", "")),
                               defect_type=str(panel.get("defect_type", "")),
                               stem=str(panel.get("stem", "")),
                               score=as_float(panel.get("score")),
                               label=None if label is None else int(label),
                               src=f"figures/{name}"))

    index = out / "index.html"
    accuracy = [*metric_tables, *compared, *decisions, *([runtimes] if runtimes else []),
                *([throughput] if throughput else [])]
    files.insert(0, (DETAILS, "every table and all anomaly-map panels"))
    _write_text(out / DETAILS, render_details(results, metric_tables=accuracy,
                                              efficiency=efficiency, per_defect=per_defect,
                                              few_shot=few_shot, charts=charts, panels=links))
    _write_text(index, render_index(results, headline=headline,
                                    charts=[c for c in charts if "few_shot" not in c[0]],
                                    panels=summary_panels(links), n_panels=len(links),
                                    files=files, side_by_side=widest <= WIDE_CHART_PX))
    logger.debug("report written to %s (%d panels)", out, len(links))
    return index


def _all_tables_md(results: Mapping[str, Any], headline: Table, metric_tables: Sequence[Table],
                   efficiency: Table, per_defect: Sequence[Table], few_shot: Table | None,
                   decisions: Sequence[Table] = (), runtimes: Table | None = None,
                   throughput: Table | None = None) -> str:
    parts = ["# cmad bench tables", ""]
    if results.get("created"):
        parts.append(f"Run {results['created']}" + (f": `{results['command']}`"
                                                    if results.get("command") else ""))
        parts.append("")
    parts += ["## Summary", "", headline.to_markdown(level=3),
              "## Accuracy", "", *(t.to_markdown(level=3) for t in metric_tables),
              *(["## Decision", "", *(t.to_markdown(level=3) for t in decisions)]
                if decisions else []),
              "## Efficiency", "", efficiency.to_markdown(level=3)]
    if runtimes is not None:
        parts += ["## Runtimes", "", runtimes.to_markdown(level=3)]
    if throughput is not None:
        parts += ["## Throughput", "", throughput.to_markdown(level=3)]
    if per_defect:
        parts += ["## Per defect type", "", *(t.to_markdown(level=3) for t in per_defect)]
    if few_shot is not None:
        parts += ["## Few-shot", "", few_shot.to_markdown(level=3)]
    return "\n".join(parts)


WIDE_CHART_PX = 1000   # wider charts (many methods) are shown one under the other


def png_width(png: bytes) -> int:
    """The width in pixels from a PNG's IHDR chunk (0 if it is not a PNG)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return 0
    return int.from_bytes(png[16:20], "big")


def _write_table(folder: Path, table: Table) -> None:
    _write_text(folder / f"{table.slug}.md", table.to_markdown(level=2))
    _write_text(folder / f"{table.slug}.csv", table.to_csv())


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _unique(name: str, used: set[str]) -> str:
    stem, n = name[:-4], 2
    while name in used:
        name = f"{stem}-{n}.png"
        n += 1
    used.add(name)
    return name


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v
