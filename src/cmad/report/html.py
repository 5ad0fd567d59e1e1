"""A self-contained `index.html` for a benchmark report: inline CSS, relative image links."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from cmad.report.tables import Table

CSS = """
:root { --ink: #1d2330; --muted: #667085; --line: #e4e7ec; --accent: #1f6feb; --best: #e8f3ff; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
       sans-serif; color: var(--ink); background: #f7f8fa; }
header { background: #1d2330; color: #fff; padding: 20px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: #c4cad6; font-size: 13px; }
header code { color: #fff; background: rgba(255,255,255,.1); padding: 1px 5px; border-radius: 4px; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
      padding: 8px 32px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
main { padding: 8px 32px 48px; max-width: 1700px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
          margin: 20px 0; }
h2 { margin: 0 0 12px; font-size: 18px; }
h3 { margin: 18px 0 8px; font-size: 15px; }
p.note { color: var(--muted); margin: 4px 0 10px; font-size: 13px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 4px 0 12px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: #f2f4f7; font-weight: 600; text-align: right; }
td { text-align: right; }
th.label, td.label { text-align: left; }
tbody tr:hover td { background: #fafbfc; }
td.best { font-weight: 700; background: var(--best); }
td.na { color: #98a2b3; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px;
           word-break: break-word; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      font-size: 12px; overflow-x: auto; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 8px 0 16px; }
figure.panel { border-top: 1px solid var(--line); padding-top: 8px; }
figcaption { color: var(--muted); font-size: 12px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
details > summary { cursor: pointer; font-weight: 600; margin: 6px 0; }
"""


@dataclass(frozen=True)
class PanelLink:
    """One panel figure as the page shows it."""

    category: str
    defect_type: str
    stem: str
    score: float
    label: int | None
    src: str


def table_html(table: Table, heading: int = 3) -> str:
    """A table as HTML, best cells bold and highlighted, n/a cells greyed."""
    out = [f'<h{heading} id="{escape(table.slug or "t")}">{escape(table.title)}</h{heading}>']
    if table.note:
        out.append(f'<p class="note">{escape(table.note)}</p>')
    out.append('<div class="scroll"><table><thead><tr>')
    out += [f'<th class="{"label" if c < table.align_left else ""}">{escape(h)}</th>'
            for c, h in enumerate(table.header)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(table.cells):
        out.append("<tr>")
        for c, text in enumerate(row):
            cls = []
            if c < table.align_left:
                cls.append("label")
            if (r, c) in table.bold:
                cls.append("best")
            if text == "n/a":
                cls.append("na")
            out.append(f'<td class="{" ".join(cls)}">{escape(text)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_index(results: Mapping[str, Any], *, headline: Table, metric_tables: Sequence[Table],
                 efficiency: Table, per_defect: Sequence[Table], few_shot: Table | None,
                 charts: Sequence[tuple[str, str]], panels: Sequence[PanelLink],
                 files: Sequence[tuple[str, str]]) -> str:
    """The whole page. `charts` are (src, caption); `files` are (href, description)."""
    sections: list[tuple[str, str, str]] = []
    sections.append(("summary", "Summary", _summary(results, headline, files)))
    sections.append(("metrics", "Accuracy",
                     "".join(table_html(t) for t in metric_tables)))
    if charts:
        sections.append(("charts", "Charts", '<div class="grid2">' + "".join(
            f'<figure><img src="{escape(src)}" alt="{escape(cap)}" loading="lazy">'
            f"<figcaption>{escape(cap)}</figcaption></figure>" for src, cap in charts)
            + "</div>"))
    sections.append(("efficiency", "Efficiency", table_html(efficiency)))
    if per_defect:
        sections.append(("per-defect", "Per defect type",
                         "".join(table_html(t) for t in per_defect)))
    if few_shot is not None:
        sections.append(("few-shot", "Few-shot", table_html(few_shot)))
    if panels:
        sections.append(("panels", "Anomaly maps", _panels(panels)))
    nav = "".join(f'<a href="#sec-{sid}">{escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="sec-{sid}"><h2>{escape(title)}</h2>{content}</section>'
                   for sid, title, content in sections)
    created = escape(str(results.get("created", "")))
    command = results.get("command")
    sub = f"run {created}" if created else ""
    if command:
        sub += f" &middot; <code>{escape(str(command))}</code>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>cmad bench {created}</title><style>{CSS}</style></head><body>"
            f"<header><h1>cmad bench report</h1><div class=\"sub\">{sub}</div></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")


def _summary(results: Mapping[str, Any], headline: Table,
             files: Sequence[tuple[str, str]]) -> str:
    out = [table_html(headline)]
    machine = results.get("machine") or {}
    run = {"created": results.get("created"), "command": results.get("command")}
    out.append('<div class="grid2"><div><h3>Run</h3>' + _kv(run) + "</div>")
    out.append("<div><h3>Machine</h3>" + (_kv(machine) if machine else
                                           '<p class="note">not recorded</p>') + "</div></div>")
    config = results.get("config")
    if config:
        out.append("<details><summary>Configuration</summary><pre>"
                   + escape(json.dumps(config, indent=2, default=str, allow_nan=True))
                   + "</pre></details>")
    if files:
        out.append("<h3>Files</h3><ul>" + "".join(
            f'<li><a href="{escape(href)}">{escape(href)}</a> &mdash; {escape(desc)}</li>'
            for href, desc in files) + "</ul>")
    return "".join(out)


def _kv(d: Mapping[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        if v is None:
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str, allow_nan=True)
        rows.append(f"<dt>{escape(str(k))}</dt><dd>{escape(text)}</dd>")
    return '<dl class="kv">' + "".join(rows) + "</dl>"


def _panels(panels: Sequence[PanelLink]) -> str:
    groups: dict[str, dict[str, list[PanelLink]]] = {}
    for p in panels:
        groups.setdefault(p.category, {}).setdefault(p.defect_type, []).append(p)
    out = []
    for cat, defects in groups.items():
        out.append(f"<h3>{escape(cat)}</h3>")
        for defect, items in defects.items():
            out.append(f"<details open><summary>{escape(cat)} / {escape(defect)} "
                       f"({len(items)})</summary>")
            for p in items:
                score = f"{p.score:.3g}" if math.isfinite(p.score) else "n/a"
                label = "n/a" if p.label is None else ("defect" if p.label else "good")
                out.append(f'<figure class="panel"><img src="{escape(p.src)}" loading="lazy" '
                           f'alt="{escape(cat)} {escape(defect)} {escape(p.stem)}">'
                           f"<figcaption>{escape(p.stem)}: image score {score}, label {label}"
                           "</figcaption></figure>")
            out.append("</details>")
    return "".join(out)
