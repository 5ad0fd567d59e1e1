"""The `cmad bench` report: files, table contents, CSV and JSON round trips, figures, HTML."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cmad.report import summary_text, write_report
from cmad.report.figures import panel_filename
from cmad.report.tables import METRICS, fmt_bytes, fmt_metric, fmt_ratio, slugify

NAN = float("nan")
CATS = ("bagel", "foam")


def _metrics(base: float) -> dict[str, float]:
    return {m: round(base - 0.01 * i, 4) for i, m in enumerate(METRICS)}


def _results() -> dict[str, Any]:
    cmad_cats = {"bagel": _metrics(0.8765), "foam": _metrics(0.95)}
    cmad_cats["foam"]["AUPRO@1%"] = NAN
    btf_cats = {"bagel": _metrics(0.9), "foam": _metrics(0.7)}
    return {
        "methods": {
            "cmad": {"categories": cmad_cats, "mean": _metrics(0.91325),
                     "per_defect": {"bagel": {"crack": _metrics(0.81), "hole": _metrics(0.93)}},
                     "fit_s": 12.5, "infer_ms_per_sample": 10.0,
                     "stages_ms": {"rgb features": 6.0, "bank search": 1.5},
                     "model_bytes": 2_000_000, "bank_entries": 1500, "bank_bytes": 1_500_000,
                     "peak_rss_mb": 900.0, "load_average": [1.25, 3.5]},
            "btf": {"categories": btf_cats, "mean": _metrics(0.8),
                    "per_defect": {"bagel": {"crack": _metrics(0.85), "hole": _metrics(0.95)}},
                    "fit_s": 30.0, "infer_ms_per_sample": 40.0,
                    "stages_ms": {"rgb features": 6.0, "fpfh": 20.0, "bank search": 14.0},
                    "model_bytes": 50_000_000, "bank_entries": 90000, "bank_bytes": 49_000_000,
                    "peak_rss_mb": 1500.0},
        },
        "shots": {"5": {"cmad": {"categories": {"bagel": _metrics(0.7), "foam": _metrics(0.6)},
                                 "mean": _metrics(0.65)}}},
        "machine": {"cpu_model": "test cpu", "cpu_count": 2, "threads": 2,
                    "load_average_start": [3.5, 2.0, 1.0], "load_average_end": [1.25, 1.5, 1.0]},
        "config": {"resolution": 224, "weights": [1.0, 1.0, 1.0]},
        "created": "2025-01-02T03:04:05",
        "command": "cmad bench --data d --out r",
    }


def _panels() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    s = 32
    panels = []
    for i, (cat, defect, has_3d) in enumerate((("bagel", "crack", True), ("foam", "good", False))):
        depth = rng.uniform(0.4, 0.6, (s, s)).astype(np.float32)
        depth[:4] = 0.0
        gt = np.zeros((s, s), dtype=bool)
        if defect != "good":
            gt[10:16, 12:20] = True
        maps = {k: rng.normal(0, 1, (s, s)).astype(np.float32)
                for k in ("cross-modal", "rgb-bank", "fused")}
        if has_3d:
            maps["3d-bank"] = rng.normal(0, 1, (s, s)).astype(np.float32)
        panels.append({"category": cat, "defect_type": defect, "stem": f"{i:03d}",
                       "score": float(maps["fused"].max()), "label": int(defect != "good"),
                       "rgb": rng.integers(0, 256, (s, s, 3), dtype=np.uint8), "depth": depth,
                       "gt": gt, "maps": maps})
    return panels


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("bench") / "report"
    index = write_report(out, _results(), _panels(), quiet=True)
    return out, index


def _md_rows(path: Path) -> list[list[str]]:
    rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows
            if not re.fullmatch(r"\|[:\-|]+\|", r)]


def test_files_written(report: tuple[Path, Path]) -> None:
    out, index = report
    assert index == out / "index.html"
    expected = ["results.json", "tables.md", "index.html", "tables/efficiency.md",
                "tables/efficiency.csv", "tables/per_defect.md", "tables/few_shot.md",
                "tables/few_shot.csv", "figures/iauroc_by_method.png",
                "figures/aupro_by_method.png", "figures/panel_bagel_crack_000.png",
                "figures/panel_foam_good_001.png"]
    expected += [f"tables/{slugify(m)}.{ext}" for m in METRICS for ext in ("md", "csv")]
    for rel in expected:
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_metric_table_markdown(report: tuple[Path, Path]) -> None:
    out, _ = report
    rows = _md_rows(out / "tables" / "i-auroc.md")
    assert rows[0] == ["Method", "bagel", "foam", "Mean"]
    body = {r[0]: r[1:] for r in rows[1:]}
    assert list(body) == ["cmad", "btf"]
    assert body["cmad"] == ["0.877", "**0.950**", "**0.913**"]
    assert body["btf"] == ["**0.900**", "0.700", "0.800"]
    aupro1 = {r[0]: r[1:] for r in _md_rows(out / "tables" / "aupro-1.md")[1:]}
    assert aupro1["cmad"][1] == "n/a"
    assert aupro1["btf"][1] == "0.650"  # the only number in the column: nothing to compare
    everything = (out / "tables.md").read_text()
    for m in METRICS:
        assert f"### {m}" in everything
    assert "### Efficiency" in everything and "### Few-shot" in everything


def test_metric_csv_round_trip(report: tuple[Path, Path]) -> None:
    out, _ = report
    given = _results()["methods"]
    for metric in METRICS:
        with open(out / "tables" / f"{slugify(metric)}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["method"] for r in rows] == ["cmad", "btf"]
        for r in rows:
            entry = given[r["method"]]
            for cat in CATS:
                want = entry["categories"][cat][metric]
                got = float(r[cat]) if r[cat] else NAN
                assert (math.isnan(want) and math.isnan(got)) or got == want
            assert float(r["mean"]) == entry["mean"][metric]


def test_results_json_round_trip(report: tuple[Path, Path]) -> None:
    out, _ = report
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    want = _results()
    want["methods"]["cmad"]["categories"]["foam"]["AUPRO@1%"] = None
    assert loaded == want


def test_efficiency_ratios(report: tuple[Path, Path]) -> None:
    out, _ = report
    rows = _md_rows(out / "tables" / "efficiency.md")
    header, body = rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    for stage in ("rgb features", "bank search", "fpfh"):
        assert f"{stage} (ms)" in header
    assert body["cmad"]["time vs btf"] == "0.25x"
    assert body["cmad"]["size vs btf"] == "0.04x"
    assert body["btf"]["time vs btf"] == "1.00x"
    assert body["cmad"]["samples/s"] == "100"
    assert body["cmad"]["model size"] == "2.00 MB"
    assert body["cmad"]["bank size"] == "1.50 MB"
    assert body["cmad"]["banks vs btf"] == "0.03x"
    assert body["cmad"]["fpfh (ms)"] == "n/a"
    with open(out / "tables" / "efficiency.csv", newline="") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["cmad"]["time_vs_btf"]) == 0.25
    assert int(csv_rows["btf"]["model_bytes"]) == 50_000_000


def test_per_defect_and_few_shot(report: tuple[Path, Path]) -> None:
    out, _ = report
    per_defect = (out / "tables" / "per_defect.md").read_text()
    assert "### cmad: per defect type" in per_defect and "### btf: per defect type" in per_defect
    rows = _md_rows(out / "tables" / "per_defect.md")
    assert ["bagel / crack", "0.810", "0.800", "0.790"] in rows
    few = {r[0]: r[1:] for r in _md_rows(out / "tables" / "few_shot.md")}
    assert few["cmad @ 5"][:4] == ["0.650", "0.640", "0.630", "0.700"]
    assert few["cmad @ all"][0] == "0.913"
    with open(out / "tables" / "few_shot.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert first["method"] == "cmad" and first["shots"] == "5"
    assert float(first["I-AUROC_foam"]) == 0.6


def _srcs(html: str) -> set[str]:
    return set(re.findall(r'<img src="([^"]+)"', html))


def test_summary_and_details_pages(report: tuple[Path, Path]) -> None:
    out, index = report
    summary, details = index.read_text(), (out / "details.html").read_text()
    pngs = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    # the details page shows every figure; the summary the two charts and a few panels
    assert pngs and _srcs(details) | _srcs(summary) == pngs
    assert {p for p in pngs if "panel_" in p} <= _srcs(details)
    assert {"figures/iauroc_by_method.png", "figures/aupro_by_method.png"} <= _srcs(summary)
    assert _srcs(summary) & {p for p in pngs if "panel_" in p} == {
        "figures/panel_bagel_crack_000.png", "figures/panel_foam_good_001.png"}
    assert 'href="details.html"' in summary and 'href="index.html"' in details
    for needle in ("test cpu", "2025-01-02T03:04:05", "cmad bench --data d --out r",
                   '<td class="best">0.913</td>'):
        assert needle in summary
    for needle in ('<td class="best">0.900</td>', '<td class="label">bagel / crack</td>',
                   "cmad: per defect type"):
        assert needle in details and needle not in summary
    # per-defect tables and panel groups are collapsed; the first metric table is open
    assert '<details id="per-defect-cmad"><summary>cmad: per defect type</summary>' in details
    assert '<details id="i-auroc" open><summary>I-AUROC</summary>' in details
    for html in (summary, details):
        assert "<link" not in html and "<script" not in html
        # every table scrolls inside its own box instead of widening the page
        assert html.count("<table>") == html.count('<div class="scroll"><table>') > 0


def test_load_average_and_cpu_beside_the_timings(report: tuple[Path, Path]) -> None:
    out, index = report
    summary = index.read_text()
    assert "test cpu, 2 CPUs, 2 threads" in summary
    assert "1-minute load average 3.50 at the start and 1.25 at the end" in summary
    assert "The load exceeded the CPU count" in summary
    head = _md_rows(out / "tables" / "efficiency.md")
    col = head[0].index("load avg (1 min)")
    assert head[1][col] == "1.25-3.50" and head[2][col] == "n/a"
    with open(out / "tables" / "efficiency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["load_avg_min"] == "1.25" and rows[0]["load_avg_max"] == "3.5"
    assert "load avg (1 min)" in summary.split("</table>")[0]


def test_panel_is_two_rows_with_readable_text() -> None:
    from cmad.report.figures import TEXT_PT, panel_figure

    fig = panel_figure(_panels()[0])
    w_px = fig.get_figwidth() * fig.dpi
    assert 700 <= w_px <= 900, "shown near full size on a laptop or an 800 px window"
    fig.canvas.draw()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and
                                    hasattr(a, "get_text")) if t.get_text().strip()]
    assert texts and min(t.get_fontsize() for t in texts) >= TEXT_PT >= 9
    # the two colour bars' tick labels never overlap (no "1.00.0")
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        lo, hi = sorted(ax.get_xlim())
        boxes += [lab.get_window_extent(renderer)
                  for loc, lab in zip(ax.get_xticks(), ax.get_xticklabels())
                  if lab.get_text() and lo - 1e-9 <= loc <= hi + 1e-9]  # the ones drawn
    assert len(boxes) >= 4
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "colour-bar labels collide"
    # the image axes lie in two rows
    rows = {round(ax.get_position().y0, 3) for ax in fig.axes[:7]}
    assert len(rows) == 2
    # and their titles stay inside the figure and clear of each other
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes[:7]]
    width = fig.get_figwidth() * fig.dpi
    assert all(0 <= b.x0 and b.x1 <= width for b in titles)
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1:])


def test_panel_png_is_not_blank(report: tuple[Path, Path]) -> None:
    out, _ = report
    with Image.open(out / "figures" / "panel_foam_good_001.png") as img:
        arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 10, "the panel is not blank"


def test_chart_axes_stay_within_unit_interval() -> None:
    from cmad.report.figures import metric_bars_figure

    res = _results()
    res["methods"]["cmad"]["mean"]["I-AUROC"] = 1.0
    for metric in ("I-AUROC", "AUPRO@30%"):
        fig = metric_bars_figure(res, metric)
        lo, hi = fig.axes[0].get_ylim()
        assert 0.0 <= lo < hi == 1.0


def test_charts_of_many_methods_stack(tmp_path: Path) -> None:
    from cmad.report import png_width

    res = _results()
    assert '<div class="grid2"><figure><img src="figures/iauroc' in _summary_of(res, tmp_path / "a")
    for i in range(30):            # a full bench's worth of methods
        res["methods"][f"m{i}"] = res["methods"]["btf"]
    with open(tmp_path / "a" / "figures" / "iauroc_by_method.png", "rb") as f:
        assert 0 < png_width(f.read()) <= 1000
    assert '<div class="stack"><figure><img src="figures/iauroc' in _summary_of(res, tmp_path / "b")


def _summary_of(res: dict, out: Path) -> str:
    return write_report(out, res, [], quiet=True).read_text()


def test_method_colours_are_fixed() -> None:
    from matplotlib.colors import to_rgb

    from cmad.report.figures import method_colour, metric_bars_figure

    assert method_colour("cmad") != method_colour("btf")
    assert method_colour("some-new-method") == method_colour("some-new-method")

    def bar_colours(results: dict) -> dict[str, tuple]:
        ax = metric_bars_figure(results, "I-AUROC").axes[0]
        return {c.get_label(): c.patches[0].get_facecolor()[:3] for c in ax.containers}

    res = _results()
    both = bar_colours(res)
    del res["methods"]["cmad"]          # btf alone, first in the list
    alone = bar_colours(res)
    assert alone["btf"] == both["btf"] == to_rgb(method_colour("btf"))
    assert both["cmad"] == to_rgb(method_colour("cmad"))


def test_summary_text() -> None:
    text = summary_text(_results())
    lines = text.splitlines()
    assert lines[0].split() == ["method", "I-AUROC", "P-AUROC", "AUPRO@30%"]
    assert lines[1].split() == ["cmad", "0.913*", "0.903*", "0.893*"]
    assert lines[2].split() == ["btf", "0.800", "0.790", "0.780"]
    assert "0.25x the inference time" in lines[3] and "0.04x the model size" in lines[3]
    assert "0.03x the bank size (1.50 MB vs 49.0 MB)" in lines[3]
    res = _results()
    del res["methods"]["btf"]
    assert "vs btf" not in summary_text(res)


def test_comparison_table_and_summary_lines(tmp_path: Path) -> None:
    res = _results()
    res["comparison"] = {"reference": "cmad", "level": 0.95, "n_boot": 2000, "methods": {
        "btf": {"I-AUROC": {"mean": 0.0183, "low": -0.0121, "high": 0.0475, "p_not_above": 0.12,
                            "categories": 2},
                "AUPRO@30%": {"mean": 0.0021, "low": -0.004, "high": 0.0085,
                              "p_not_above": 0.25, "categories": 2}},
        "rgb-bank": {"I-AUROC": {"mean": -0.2, "low": -0.3, "high": -0.1, "p_not_above": 1.0,
                                 "categories": 1}}}}
    write_report(tmp_path / "r", res, [], quiet=True)
    rows = _md_rows(tmp_path / "r" / "tables" / "comparison.md")
    assert rows[0][:2] == ["Method", "cmad minus method, I-AUROC [95% interval]"]
    assert rows[1] == ["btf", "+0.018 [-0.012, +0.048]", "12%", "+0.002 [-0.004, +0.009]",
                       "25%", "2"]
    assert rows[2] == ["rgb-bank", "-0.200 [-0.300, -0.100]", "100%", "n/a", "n/a", "1"]
    with open(tmp_path / "r" / "tables" / "comparison.csv") as f:
        got = list(csv.DictReader(f))
    assert float(got[0]["i_auroc_low"]) == -0.0121 and got[0]["reference"] == "cmad"
    assert float(got[0]["aupro_30_high"]) == 0.0085 and got[1]["aupro_30_high"] == ""
    assert "paired bootstrap" in (tmp_path / "r" / "details.html").read_text()
    line = [x for x in summary_text(res).splitlines() if x.startswith("cmad - btf")]
    assert line == ["cmad - btf: +0.018 [-0.012, +0.048] I-AUROC, +0.002 [-0.004, +0.009] "
                    "AUPRO@30% (95% paired bootstrap intervals over the test parts)"]
    # the same lines on the summary page, linked to the table
    index = (tmp_path / "r" / "index.html").read_text()
    assert "<code>" + line[0] + "</code>" in index and 'href="details.html#comparison"' in index
    assert 'id="comparison"' in (tmp_path / "r" / "details.html").read_text()
    write_report(tmp_path / "r2", _results(), [], quiet=True)  # no comparison: no table
    assert not (tmp_path / "r2" / "tables" / "comparison.md").exists()
    assert "paired bootstrap" not in (tmp_path / "r2" / "index.html").read_text()


def test_without_baseline_or_shots(tmp_path: Path) -> None:
    res = _results()
    del res["methods"]["btf"]
    res["shots"] = {}
    write_report(tmp_path / "r", res, [], quiet=True)
    header = _md_rows(tmp_path / "r" / "tables" / "efficiency.md")[0]
    assert not any("vs btf" in h for h in header)
    assert not (tmp_path / "r" / "tables" / "few_shot.md").exists()
    assert "Few-shot" not in (tmp_path / "r" / "index.html").read_text()


def test_formatting() -> None:
    from cmad.report.tables import fmt_signed

    # a low end just below 0 keeps its sign: the interval does not clear 0
    assert fmt_signed(-0.000236) == "-0.000" and fmt_signed(0.0) == "+0.000"
    assert fmt_signed(0.0183) == "+0.018" and fmt_signed(NAN) == "n/a"
    assert fmt_metric(0.8765) == "0.877"
    assert fmt_metric(0.8764) == "0.876"
    assert fmt_metric(NAN) == "n/a" and fmt_metric(None) == "n/a"
    assert fmt_ratio(10 / 40) == "0.25x"
    assert fmt_bytes(1500) == "1.50 KB" and fmt_bytes(512) == "512 B"
    assert slugify("AUPRO@30%") == "aupro-30"
    assert panel_filename("cable gland", "a/b", "001") == "panel_cable-gland_a-b_001.png"
