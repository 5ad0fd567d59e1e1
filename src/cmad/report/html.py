"""A self-contained `index.html` for a benchmark report: inline CSS, relative image links."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from cmad.report.tables import Table, comparison_lines

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
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 520px), 1fr));
         gap: 16px; }
.grid2 > * { min-width: 0; }
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 560px), 1fr));
          gap: 12px 16px; }
.panels > figure { min-width: 0; margin: 0; }
figure img { width: 100%; max-width: 900px; }
.stack figure img { max-width: 1600px; }
p.timing { color: #5b4a00; }
header .sub, dl.kv dd, figcaption, p.note { overflow-wrap: anywhere; }
@media (max-width: 900px) {
  header, nav { padding-left: 12px; padding-right: 12px; }
  main { padding: 4px 10px 32px; }
  section { padding: 12px; }
}
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


def table_html(table: Table, heading: int | None = 3) -> str:
    """A table as HTML, best cells bold and highlighted, n/a cells greyed; under a heading
    of that level (None: no heading, for a table whose section or summary names it)."""
    out = [] if heading is None else [
        f'<h{heading} id="{escape(table.slug or "t")}">{escape(table.title)}</h{heading}>']
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


SUMMARY_PANELS = 4      # panels on the summary page: the first defective sample per category
DETAILS = "details.html"


def render_index(results: Mapping[str, Any], *, headline: Table,
                 charts: Sequence[tuple[str, str]], panels: Sequence[PanelLink],
                 n_panels: int, files: Sequence[tuple[str, str]],
                 side_by_side: bool = True) -> str:
    """The summary page: the headline table, the charts, a few panels, the run and machine.

    `charts` are (src, caption), shown side by side where there is room unless
    `side_by_side` is False (wide charts, of many methods); `panels` the ones to show here
    (`n_panels` in all, on the details page); `files` are (href, description).
    """
    sections: list[tuple[str, str, str]] = []
    compared = comparison_lines(results)
    leads = ("" if not compared else
             '<p class="note">How sure the differences are (the reference minus each method, '
             'mean over categories; <a href="' + DETAILS + '#comparison">details</a>):</p><ul>'
             + "".join(f"<li><code>{escape(line)}</code></li>" for line in compared) + "</ul>")
    sections.append(("summary", "Summary", table_html(headline, None) + leads
                     + _timing_note(results)
                     + f'<p class="note">Every table, per category and per defect type, and '
                       f'all {n_panels} anomaly-map panels: <a href="{DETAILS}">details</a>.'
                       "</p>"))
    if charts:
        sections.append(("charts", "Charts", _charts(charts, side_by_side)))
    if panels:
        sections.append(("panels", "Anomaly maps", '<p class="note">One defective test '
                         f'sample of each category; all {n_panels} panels are on the '
                         f'<a href="{DETAILS}#sec-panels">details page</a>.</p>'
                         + _panel_grid(panels)))
    sections.append(("run", "Run and machine", _run_info(results, files)))
    return _page(results, "cmad bench report", sections,
                 extra_nav=[(DETAILS, "Details &rarr;")])


def render_details(results: Mapping[str, Any], *, metric_tables: Sequence[Table],
                   efficiency: Table, per_defect: Sequence[Table], few_shot: Table | None,
                   charts: Sequence[tuple[str, str]], panels: Sequence[PanelLink]) -> str:
    """The details page: every metric table, efficiency, per-defect tables, few-shot and all
    panels, the long parts in collapsible sections."""
    sections: list[tuple[str, str, str]] = []
    sections.append(("metrics", "Accuracy per category", "".join(
        _collapsible(t.title, table_html(t, None), open_=i == 0, anchor=t.slug)
        for i, t in enumerate(metric_tables))))
    sections.append(("efficiency", "Efficiency", table_html(efficiency, None)
                     + _timing_note(results)))
    if per_defect:
        sections.append(("per-defect", "Per defect type", "".join(
            _collapsible(t.title, table_html(t, None), anchor=t.slug) for t in per_defect)))
    if few_shot is not None:
        few_charts = [c for c in charts if "few_shot" in c[0]]
        sections.append(("few-shot", "Few-shot", table_html(few_shot) + _charts(few_charts)))
    if panels:
        sections.append(("panels", "Anomaly maps", _panels(panels)))
    return _page(results, "cmad bench report: details", sections,
                 extra_nav=[("index.html", "&larr; Summary")])


def _page(results: Mapping[str, Any], title: str, sections: Sequence[tuple[str, str, str]],
          extra_nav: Sequence[tuple[str, str]] = ()) -> str:
    nav = "".join(f'<a href="{escape(href)}">{text}</a>' for href, text in extra_nav)
    nav += "".join(f'<a href="#sec-{sid}">{escape(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="sec-{sid}"><h2>{escape(name)}</h2>{content}</section>'
                   for sid, name, content in sections)
    created = escape(str(results.get("created", "")))
    command = results.get("command")
    sub = f"run {created}" if created else ""
    if command:
        sub += f" &middot; <code>{escape(str(command))}</code>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)} {created}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><div class=\"sub\">{sub}</div></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")


def _charts(charts: Sequence[tuple[str, str]], side_by_side: bool = True) -> str:
    """The charts side by side where there is room (else one under the other); each chart
    names itself, so the caption is only the image's alt text."""
    if not charts:
        return ""
    return f'<div class="{"grid2" if side_by_side else "stack"}">' + "".join(
        f'<figure><img src="{escape(src)}" alt="{escape(cap)}" loading="lazy"></figure>'
        for src, cap in charts) + "</div>"


def _collapsible(title: str, content: str, open_: bool = False, anchor: str = "") -> str:
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return (f"<details{ident}{' open' if open_ else ''}><summary>{escape(title)}</summary>"
            f"{content}</details>")


def timing_context(results: Mapping[str, Any]) -> str:
    """One sentence on where the timings were measured: CPU model, CPUs, threads, load."""
    m = results.get("machine") or {}
    if not m:
        return "Machine not recorded."
    cpu = m.get("cpu_model") or m.get("processor") or "unknown CPU"
    parts = [f"Timings measured on {cpu}, {m.get('cpu_count', '?')} CPUs, "
             f"{m.get('threads', '?')} threads"]
    start, end = _load1(m.get("load_average_start")), _load1(m.get("load_average_end"))
    if start is not None or end is not None:
        parts.append(f"1-minute load average {_fmt_load(start)} at the start and "
                     f"{_fmt_load(end)} at the end")
    text = "; ".join(parts) + "."
    busiest = max((x for x in (start, end) if x is not None), default=None)
    cpus = m.get("cpu_count")
    if busiest is not None and isinstance(cpus, (int, float)) and busiest > cpus:
        text += (" The load exceeded the CPU count: other work shared the CPUs, so every time "
                 "here is longer than on an idle machine.")
    return text


def _timing_note(results: Mapping[str, Any]) -> str:
    return f'<p class="note timing">{escape(timing_context(results))}</p>'


def _load1(v: Any) -> float | None:
    if isinstance(v, (list, tuple)) and v:
        v = v[0]
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _fmt_load(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _run_info(results: Mapping[str, Any], files: Sequence[tuple[str, str]]) -> str:
    machine = results.get("machine") or {}
    run = {"created": results.get("created"), "command": results.get("command")}
    out = ['<div class="grid2"><div><h3>Run</h3>' + _kv(run) + "</div>"]
    out.append("<div><h3>Machine</h3>" + (_kv(machine) if machine else
                                           '<p class="note">not recorded</p>') + "</div></div>")
    config = results.get("config")
    if config:
        out.append("<details><summary>Configuration</summary><pre>"
                   + escape(json.dumps(config, indent=2, default=str, allow_nan=True))
                   + "</pre></details>")
    if files:
        out.append("<details><summary>Files</summary><ul>" + "".join(
            f'<li><a href="{escape(href)}">{escape(href)}</a> &mdash; {escape(desc)}</li>'
            for href, desc in files) + "</ul></details>")
    return "".join(out)


def _kv(d: Mapping[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        if v is None:
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str, allow_nan=True)
        rows.append(f"<dt>{escape(str(k))}</dt><dd>{escape(text)}</dd>")
    return '<dl class="kv">' + "".join(rows) + "</dl>"


def _panel_figure(p: PanelLink) -> str:
    score = f"{p.score:.3g}" if math.isfinite(p.score) else "n/a"
    label = "n/a" if p.label is None else ("defect" if p.label else "good")
    return (f'<figure class="panel"><a href="{escape(p.src)}"><img src="{escape(p.src)}" '
            f'loading="lazy" alt="{escape(p.category)} {escape(p.defect_type)} '
            f'{escape(p.stem)}"></a><figcaption>{escape(p.category)} / {escape(p.defect_type)}'
            f" / {escape(p.stem)}: image score {score}, label {label}</figcaption></figure>")


def _panel_grid(panels: Sequence[PanelLink]) -> str:
    return '<div class="panels">' + "".join(_panel_figure(p) for p in panels) + "</div>"


def _panels(panels: Sequence[PanelLink]) -> str:
    groups: dict[str, dict[str, list[PanelLink]]] = {}
    for p in panels:
        groups.setdefault(p.category, {}).setdefault(p.defect_type, []).append(p)
    out = []
    for cat, defects in groups.items():
        n = sum(len(v) for v in defects.values())
        inner = "".join(
            f"<h3>{escape(cat)} / {escape(defect)} ({len(items)})</h3>" + _panel_grid(items)
            for defect, items in defects.items())
        out.append(_collapsible(f"{cat} ({n} panels)", inner))
    return "".join(out)


def summary_panels(panels: Sequence[PanelLink], n: int = SUMMARY_PANELS) -> list[PanelLink]:
    """One panel per category, at most `n`: its first sample with a single defect type, else
    its first defective one ("combined" holds several), else its first."""
    chosen: list[PanelLink] = []
    seen: set[str] = set()
    for single in (True, False):
        for p in panels:
            if p.label and p.category not in seen and (p.defect_type != "combined" or not single):
                chosen.append(p)
                seen.add(p.category)
    for p in panels:
        if p not in chosen and p.category not in seen:
            chosen.append(p)
            seen.add(p.category)
    return chosen[:n]
