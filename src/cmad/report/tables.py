"""Benchmark tables in the literature's format, rendered as markdown and CSV.

Every table is built once as a `Table` (display text, machine values, bold cells) and then
rendered; the HTML renderer in `cmad.report.html` reads the same object. Display text rounds
half up on the value's shortest decimal form, so 0.8765 in results.json reads 0.877 in the
table; CSV cells keep full precision so they parse back to the numbers; a missing or NaN
value reads "n/a" (an empty CSV cell).
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from cmad.evaluate import TARGET_RATES, target_key
from cmad.metrics import METRIC_KEYS as METRICS  # noqa: E402 - the one list of metric names

HEADLINE_METRICS: tuple[str, ...] = ("I-AUROC", "P-AUROC", "AUPRO@30%")
BASELINE = "btf"
NA = "n/a"


@dataclass(frozen=True)
class Table:
    """One table: display header and cells, machine header and values, and bold cells.

    `cells[r][0]` is the row label; `bold` holds (row, column) indices into `cells`.
    """

    title: str
    header: list[str]
    cells: list[list[str]]
    csv_header: list[str]
    values: list[list[Any]]
    bold: frozenset[tuple[int, int]] = frozenset()
    note: str = ""
    align_left: int = 1
    slug: str = field(default="")

    def to_markdown(self, level: int = 3) -> str:
        """A GitHub-flavoured markdown table under a heading, best cells in bold."""
        lines = [f"{'#' * level} {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(_md_escape(h) for h in self.header) + " |")
        lines.append("|" + "|".join(":--" if c < self.align_left else "--:"
                                    for c in range(len(self.header))) + "|")
        for r, row in enumerate(self.cells):
            shown = [f"**{_md_escape(t)}**" if (r, c) in self.bold else _md_escape(t)
                     for c, t in enumerate(row)]
            lines.append("| " + " | ".join(shown) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV with machine-friendly column names and full-precision numbers."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_header)
        for row in self.values:
            writer.writerow([_csv_cell(v) for v in row])
        return buf.getvalue()


def slugify(name: str) -> str:
    """A file-name-safe slug: 'AUPRO@30%' -> 'aupro-30', 'I-AUROC' -> 'i-auroc'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "x"


def as_float(v: Any) -> float:
    """A float, NaN for None, missing or non-numeric values."""
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def fmt_metric(v: Any, digits: int = 3) -> str:
    """A metric to `digits` decimals, rounding half up on the shortest repr; NaN -> n/a."""
    x = as_float(v)
    if not math.isfinite(x):
        return NA
    q = Decimal(repr(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{q:.{digits}f}"


def fmt_number(v: Any) -> str:
    """A duration or rate with about three significant digits; NaN -> n/a."""
    x = as_float(v)
    if not math.isfinite(x):
        return NA
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1 or a == 0:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_int(v: Any) -> str:
    """An integer count with thousands separators; NaN -> n/a."""
    x = as_float(v)
    return f"{round(x):,}" if math.isfinite(x) else NA


def fmt_bytes(v: Any) -> str:
    """A byte count as B, KB, MB or GB (powers of 1000); NaN -> n/a."""
    x = as_float(v)
    if not math.isfinite(x):
        return NA
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= scale:
            return f"{fmt_number(x / scale)} {unit}"
    return f"{round(x)} B"


def fmt_ratio(v: Any) -> str:
    """A ratio written like 0.25x; NaN -> n/a."""
    x = as_float(v)
    if not math.isfinite(x):
        return NA
    return f"{x:.2f}x" if abs(x) < 10 else f"{x:.1f}x"


def load_range(entry: Mapping[str, Any]) -> tuple[float, float]:
    """The lowest and highest 1-minute load average while a method was timed (NaN if not
    recorded)."""
    v = entry.get("load_average")
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return as_float(v[0]), as_float(v[1])
    return math.nan, math.nan


def fmt_load(lo: Any, hi: Any) -> str:
    """A load-average range: '1.20' or '1.20-3.40'; n/a when not recorded."""
    a, b = as_float(lo), as_float(hi)
    if not (math.isfinite(a) and math.isfinite(b)):
        return NA
    return f"{a:.2f}" if f"{a:.2f}" == f"{b:.2f}" else f"{a:.2f}-{b:.2f}"


LOAD_HEADER = "load avg (1 min)"


def ratio(num: Any, den: Any) -> float:
    """num / den, NaN when either is missing or den is not positive."""
    a, b = as_float(num), as_float(den)
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return math.nan
    return a / b


def methods_of(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The methods of a results dict, in their given order."""
    return dict(results.get("methods") or {})


def categories_of(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The union of the categories of several method entries, in first-seen order."""
    seen: dict[str, None] = {}
    for entry in entries:
        for cat in entry.get("categories") or {}:
            seen.setdefault(str(cat), None)
    return list(seen)


def metric_table(results: Mapping[str, Any], metric: str) -> Table:
    """One metric: methods as rows, categories plus Mean as columns, best per column bold."""
    methods = methods_of(results)
    cats = categories_of(methods.values())
    values: list[list[Any]] = []
    for name, entry in methods.items():
        per_cat = entry.get("categories") or {}
        row = [as_float((per_cat.get(c) or {}).get(metric)) for c in cats]
        row.append(as_float((entry.get("mean") or {}).get(metric)))
        values.append([name, *row])
    cells = [[str(v[0]), *(fmt_metric(x) for x in v[1:])] for v in values]
    return Table(title=metric, header=["Method", *cats, "Mean"], cells=cells,
                 csv_header=["method", *cats, "mean"], values=values,
                 bold=best_cells(cells, range(1, len(cats) + 2)), slug=slugify(metric))


def best_cells(cells: Sequence[Sequence[str]], columns: Iterable[int],
               higher_is_better: bool = True) -> frozenset[tuple[int, int]]:
    """The (row, column) cells holding the best displayed value of each column.

    Ties at the displayed precision are all bold; a column with fewer than two numbers has
    nothing to compare and no bold cell.
    """
    bold: set[tuple[int, int]] = set()
    for c in columns:
        nums = {r: float(row[c]) for r, row in enumerate(cells) if _is_number(row[c])}
        if len(nums) < 2:
            continue
        best = max(nums.values()) if higher_is_better else min(nums.values())
        bold.update((r, c) for r, x in nums.items() if x == best)
    return frozenset(bold)


def stage_names(results: Mapping[str, Any]) -> list[str]:
    """The union of all methods' stage names, in first-seen order."""
    seen: dict[str, None] = {}
    for entry in methods_of(results).values():
        for stage in entry.get("stages_ms") or {}:
            seen.setdefault(str(stage), None)
    return list(seen)


def efficiency_table(results: Mapping[str, Any], baseline: str = BASELINE) -> Table:
    """Time, memory and size per method, with ratios against `baseline` when it is present.

    "time vs btf" is the ratio of inference milliseconds per sample, "size vs btf" the
    ratio of model bytes, "banks vs btf" the ratio of memory-bank bytes; below 1 means
    cheaper than the baseline.
    """
    methods = methods_of(results)
    stages = stage_names(results)
    base = methods.get(baseline)
    header = ["Method", "fit (s)", "infer (ms/sample)", "samples/s",
              *(f"{s} (ms)" for s in stages), "model size", "bank entries", "bank size",
              "peak RSS (MB)", LOAD_HEADER]
    csv_header = ["method", "fit_s", "infer_ms_per_sample", "samples_per_s",
                  *(f"stage_{slugify(s).replace('-', '_')}_ms" for s in stages),
                  "model_bytes", "bank_entries", "bank_bytes", "peak_rss_mb",
                  "load_avg_min", "load_avg_max"]
    if base is not None:
        header += [f"time vs {baseline}", f"size vs {baseline}", f"banks vs {baseline}"]
        csv_header += [f"time_vs_{baseline}", f"size_vs_{baseline}", f"banks_vs_{baseline}"]
    cells: list[list[str]] = []
    values: list[list[Any]] = []
    for name, e in methods.items():
        infer = as_float(e.get("infer_ms_per_sample"))
        per_s = 1000.0 / infer if math.isfinite(infer) and infer > 0 else math.nan
        st = e.get("stages_ms") or {}
        row_v: list[Any] = [name, as_float(e.get("fit_s")), infer, per_s,
                            *(as_float(st.get(s)) for s in stages),
                            as_float(e.get("model_bytes")), as_float(e.get("bank_entries")),
                            as_float(e.get("bank_bytes")), as_float(e.get("peak_rss_mb"))]
        row_t = [str(name), *(fmt_number(x) for x in row_v[1:4 + len(stages)]),
                 fmt_bytes(row_v[-4]), fmt_int(row_v[-3]), fmt_bytes(row_v[-2]), fmt_number(row_v[-1])]
        load = load_range(e)
        row_v += list(load)
        row_t.append(fmt_load(*load))
        if base is not None:
            t = ratio(infer, base.get("infer_ms_per_sample"))
            s = ratio(e.get("model_bytes"), base.get("model_bytes"))
            b = ratio(e.get("bank_bytes"), base.get("bank_bytes"))
            row_v += [t, s, b]
            row_t += [fmt_ratio(t), fmt_ratio(s), fmt_ratio(b)]
        values.append([_int_if_whole(v) for v in row_v])
        cells.append(row_t)
    note = ("Inference is the median per sample over the test set after warm-up; "
            "stage columns are milliseconds per sample; the load average is the machine's "
            "while the method was timed (above the CPU count, other work slowed it).")
    if base is not None:
        note += (f" Ratios are against `{baseline}`: inference time per sample, model size "
                 "and bank size (below 1x is cheaper).")
    return Table(title="Efficiency", header=header, cells=cells, csv_header=csv_header,
                 values=values, note=note, slug="efficiency")


def runtime_table(results: Mapping[str, Any]) -> Table | None:
    """Torch against ONNX Runtime per method (`cmad bench --onnx`), or None without them."""
    rows = {n: e["runtime"] for n, e in methods_of(results).items() if e.get("runtime")}
    if not rows:
        return None
    header = ["Method", "torch (ms/sample)", "onnx (ms/sample)", "onnx vs torch", "ONNX file",
              "max |score diff|", "max |map diff|"]
    csv_header = ["method", "torch_ms", "onnx_ms", "onnx_vs_torch", "onnx_bytes",
                  "max_score_diff", "max_map_diff"]
    cells, values = [], []
    for name, r in rows.items():
        if "error" in r:
            cells.append([str(name), NA, NA, NA, NA, NA, str(r["error"])])
            values.append([name, None, None, None, None, None, None])
            continue
        q = ratio(r.get("onnx_ms"), r.get("torch_ms"))
        v = [name, as_float(r.get("torch_ms")), as_float(r.get("onnx_ms")), q,
             as_float(r.get("onnx_bytes")), as_float(r.get("max_score_diff")),
             as_float(r.get("max_map_diff"))]
        cells.append([str(name), fmt_number(v[1]), fmt_number(v[2]), fmt_ratio(q),
                      fmt_bytes(v[4]), f"{v[5]:.1e}", f"{v[6]:.1e}"])
        values.append(v)
    note = ("The same prepared test samples, one at a time, the two runtimes alternating: "
            "median ms per sample from the prepared sample to the score and the map at "
            "working resolution (features, branches, fusion; FPFH is numba in both), after "
            "warm-up. Differences are the largest over the test samples.")
    return Table(title="Runtimes", header=header, cells=cells, csv_header=csv_header,
                 values=values, note=note, slug="runtime")


def stream_table(results: Mapping[str, Any], baseline: str = BASELINE) -> Table | None:
    """Samples per second end to end, streamed (`cmad bench --stream`), or None without."""
    rows = {n: e for n, e in methods_of(results).items() if e.get("stream")}
    if not rows:
        return None
    base = rows.get(baseline, {}).get("stream", {}).get("samples_per_s")
    header = ["Method", "samples/s (streamed)", "ms/sample (streamed)",
              "ms/sample (one at a time)", f"speed vs {baseline}" if base else "speed",
              "load average"]
    csv_header = ["method", "samples_per_s", "ms_per_sample", "latency_ms", "speed_vs_baseline",
                  "load_min", "load_max"]
    cells, values = [], []
    for name, e in rows.items():
        st = e["stream"]
        q = ratio(st.get("samples_per_s"), base) if base else None
        loads = [x for x in st.get("load_average") or [] if x is not None]
        lo, hi = (min(loads), max(loads)) if loads else (None, None)
        v = [name, as_float(st.get("samples_per_s")), as_float(st.get("ms_per_sample")),
             as_float(e.get("infer_ms_per_sample")), q, lo, hi]
        cells.append([str(name), fmt_number(v[1]), fmt_number(v[2]), fmt_number(v[3]),
                      fmt_ratio(q), NA if lo is None else f"{lo:.2f}-{hi:.2f}"])
        values.append(v)
    note = ("Each fitted method saved, loaded back and run over the test files as `cmad "
            "predict` streams them (read, preprocess, features, branches, fusion, maps at the "
            "original size; batches overlapping on the worker threads; no files written), "
            "after one warm-up batch; over all categories' test samples together. One at a "
            "time is the Efficiency table's sum of stage medians for a single sample. Speed "
            "above 1x is faster than the baseline.")
    return Table(title="Throughput", header=header, cells=cells, csv_header=csv_header,
                 values=values, note=note, slug="throughput")


def per_defect_tables(results: Mapping[str, Any],
                      metrics: Sequence[str] = HEADLINE_METRICS) -> list[Table]:
    """For each method with per-defect results: rows category / defect type, metric columns."""
    tables = []
    for name, e in methods_of(results).items():
        per_defect = e.get("per_defect") or {}
        values: list[list[Any]] = []
        for cat, defects in per_defect.items():
            for defect, m in (defects or {}).items():
                values.append([f"{cat} / {defect}", *(as_float((m or {}).get(k))
                                                       for k in metrics)])
        if not values:
            continue
        cells = [[v[0], *(fmt_metric(x) for x in v[1:])] for v in values]
        tables.append(Table(title=f"{name}: per defect type", header=["Category / defect",
                                                                      *metrics],
                            cells=cells, csv_header=["category_defect", *metrics],
                            values=values, slug=f"per-defect-{slugify(name)}"))
    return tables


def per_defect_long_csv(results: Mapping[str, Any]) -> str:
    """All per-defect results in one long CSV: method, category, defect, every metric."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "category", "defect_type", *METRICS])
    for name, e in methods_of(results).items():
        for cat, defects in (e.get("per_defect") or {}).items():
            for defect, m in (defects or {}).items():
                writer.writerow([name, cat, defect,
                                 *(_csv_cell(as_float((m or {}).get(k))) for k in METRICS)])
    return buf.getvalue()


def shot_counts(results: Mapping[str, Any]) -> list[str]:
    """The shot counts of results["shots"], sorted numerically where they are numbers."""
    keys = [str(k) for k in (results.get("shots") or {})]
    return sorted(keys, key=lambda k: (0, float(k), k) if _is_number(k) else (1, 0.0, k))


def few_shot_table(results: Mapping[str, Any]) -> Table | None:
    """Rows method @ K shots (and @ all, the full-data run, for reference); None without shots.

    Columns: mean I-AUROC, P-AUROC and AUPRO@30%, then I-AUROC per category.
    """
    shots = results.get("shots") or {}
    if not shots:
        return None
    full = methods_of(results)
    ordered = [(k, m, e) for k in shot_counts(results)
               for m, e in (shots.get(k) or shots.get(_num_key(k, shots)) or {}).items()]
    shot_methods = list(dict.fromkeys(m for _, m, _ in ordered))
    rows = ordered + [("all", m, full[m]) for m in shot_methods if m in full]
    cats = categories_of(e for _, _, e in rows)
    header = ["Method @ shots", *(f"{k} (mean)" for k in HEADLINE_METRICS),
              *(f"I-AUROC {c}" for c in cats)]
    csv_header = ["method", "shots", *(f"mean_{k}" for k in HEADLINE_METRICS),
                  *(f"I-AUROC_{c}" for c in cats)]
    cells: list[list[str]] = []
    values: list[list[Any]] = []
    for k, m, e in rows:
        mean = e.get("mean") or {}
        per_cat = e.get("categories") or {}
        nums = [as_float(mean.get(x)) for x in HEADLINE_METRICS]
        nums += [as_float((per_cat.get(c) or {}).get("I-AUROC")) for c in cats]
        cells.append([f"{m} @ {k}", *(fmt_metric(x) for x in nums)])
        values.append([m, _int_if_whole(as_float(k)) if _is_number(k) else k, *nums])
    note = ("Fitted on K training samples chosen with the seed; '@ all' is the full-data run "
            "of the same method, for reference.")
    return Table(title="Few-shot", header=header, cells=cells, csv_header=csv_header,
                 values=values, note=note, slug="few-shot")


def fmt_rate(v: Any) -> str:
    """A rate as a percentage with no decimals (0.1 -> 10%); NaN -> n/a."""
    x = as_float(v)
    return f"{100.0 * x:.0f}%" if math.isfinite(x) else NA


def _target(entry: Mapping[str, Any]) -> float:
    """The target false-positive rate of a method's stored thresholds (NaN if they differ)."""
    rates = {as_float((d or {}).get("target_fpr")) for d in (entry.get("decision") or {}).values()}
    return rates.pop() if len(rates) == 1 else math.nan


def decision_table(results: Mapping[str, Any]) -> Table | None:
    """The stored threshold's error rates on the test split, per method: FPR (good parts
    judged anomalous) and FNR (defective parts judged normal) per category and mean; None
    when no method has them."""
    methods = {n: e for n, e in methods_of(results).items() if e.get("decision")}
    if not methods:
        return None
    cats = list(dict.fromkeys(c for e in methods.values() for c in e["decision"]))
    header = ["Method", "target FPR", "FPR (mean)", "FNR (mean)", *(f"{c} FPR / FNR" for c in cats),
              "best TPR at 10% FPR (mean)"]
    csv_header = ["method", "target_fpr", "mean_fpr", "mean_fnr",
                  *(f"{c}_{k}" for c in cats for k in ("fpr", "fnr", "threshold")),
                  "mean_tpr_at_fpr10"]
    cells: list[list[str]] = []
    values: list[list[Any]] = []
    for name, e in methods.items():
        mean = e.get("decision_mean") or {}
        per = e.get("decision") or {}
        target = _target(e)
        row_v: list[Any] = [name, target, as_float(mean.get("fpr")), as_float(mean.get("fnr"))]
        row_t = [str(name), fmt_rate(target) if target >= 0.01 or not math.isfinite(target)
                 else f"{100 * target:.2g}%", fmt_rate(row_v[2]), fmt_rate(row_v[3])]
        for c in cats:
            d = per.get(c) or {}
            row_v += [as_float(d.get("fpr")), as_float(d.get("fnr")), as_float(d.get("threshold"))]
            row_t.append(f"{fmt_rate(d.get('fpr'))} / {fmt_rate(d.get('fnr'))}")
        row_v.append(as_float(mean.get("tpr_at_fpr10")))
        row_t.append(fmt_rate(row_v[-1]))
        values.append(row_v)
        cells.append(row_t)
    note = ("The stored threshold of each model (chosen on validation normals for the target "
            "false-positive rate) applied to the test split, which played no part in choosing "
            "it. FPR: good parts judged anomalous; FNR: defective parts judged normal. Best TPR "
            "at 10% FPR: the largest share of defective parts that any one threshold flags "
            "while it flags at most 10% of the good parts, read off the test split's ROC: the "
            "ceiling of every threshold chosen without test data, not a decision.")
    return Table(title="Decision at the stored threshold", header=header, cells=cells,
                 csv_header=csv_header, values=values, note=note, slug="decision")


def targets_table(results: Mapping[str, Any]) -> Table | None:
    """Per method, the false-positive and true-positive rates on the test split when the
    model's rule picks the threshold for each target rate of `TARGET_RATES` (means over
    the categories): whether a target a user sets is kept. None when no method has them."""
    keys = [(r, target_key(r, "fpr"), target_key(r, "tpr")) for r in TARGET_RATES]
    methods = {n: e.get("decision_mean") or {} for n, e in methods_of(results).items()}
    methods = {n: m for n, m in methods.items()
               if any(math.isfinite(as_float(m.get(k))) for _, k, _ in keys)}
    if not methods:
        return None
    header = ["Method", *(f"target {fmt_rate(r)}: FPR / TPR" for r, _, _ in keys)]
    csv_header = ["method", *(f"target_{r:g}_{w}" for r, _, _ in keys for w in ("fpr", "tpr"))]
    cells, values = [], []
    for name, m in methods.items():
        v = [as_float(m.get(k)) for _, f, t in keys for k in (f, t)]
        values.append([name, *v])
        cells.append([str(name), *(f"{fmt_rate(v[2 * i])} / {fmt_rate(v[2 * i + 1])}"
                                   for i in range(len(keys)))])
    note = ("The threshold each model's rule gives for a target false-positive rate "
            "(`cmad predict --fpr F`), chosen on validation normals only, applied to the test "
            "split: FPR, the share of good parts flagged (to compare with the target); TPR, "
            "the share of defective parts flagged. Means over the categories.")
    return Table(title="Target false-positive rates kept", header=header, cells=cells,
                 csv_header=csv_header, values=values, note=note, slug="targets")


def fmt_signed(v: Any, digits: int = 3) -> str:
    """A difference with its sign (+0.018, -0.004); NaN -> n/a."""
    x = as_float(v)
    if not math.isfinite(x):
        return NA
    # a negative value keeps its sign even where it rounds to 0 (-0.000): an interval
    # whose low end is below 0 must not read as if it cleared 0
    return ("-" if x < 0 else "+") + fmt_metric(abs(x), digits)


COMPARED = ("I-AUROC", "AUPRO@30%")


def fmt_difference(d: Mapping[str, Any] | None) -> str:
    """A difference and its interval: "+0.028 [+0.008, +0.049]"; n/a without one."""
    if not d:
        return NA
    return f"{fmt_signed(d.get('mean'))} [{fmt_signed(d.get('low'))}, {fmt_signed(d.get('high'))}]"


def comparison_table(results: Mapping[str, Any]) -> Table | None:
    """The reference method against each other method: the mean I-AUROC and AUPRO@30%
    differences with their paired bootstrap intervals (`results["comparison"]`); None
    without one."""
    comp = results.get("comparison") or {}
    rows = comp.get("methods") or {}
    if not rows:
        return None
    ref = str(comp.get("reference") or "cmad")
    level = fmt_rate(comp.get("level", 0.95))
    header = ["Method", *(h for k in COMPARED
                          for h in (f"{ref} minus method, {k} [{level} interval]",
                                    f"{k}: replicates with {ref} not above")), "categories"]
    csv_header = ["method", "reference",
                  *(f"{slugify(k).replace('-', '_')}_{v}" for k in COMPARED
                    for v in ("mean_difference", "low", "high", "p_not_above")), "categories"]
    cells, values = [], []
    for name, row in rows.items():
        v: list[Any] = [name, ref]
        t = [str(name)]
        for k in COMPARED:
            d = row.get(k) or {}
            v += [as_float(d.get(x)) for x in ("mean", "low", "high", "p_not_above")]
            t += [fmt_difference(d), fmt_rate(d.get("p_not_above"))]
        n = (row.get("I-AUROC") or {}).get("categories")
        values.append([*v, n])
        cells.append([*t, fmt_int(n)])
    note = (f"How sure a difference in the mean over categories is. Each of {comp.get('n_boot')} "
            "bootstrap replicates redraws every category's good and defective test parts with "
            f"replacement, scores {ref} and the method on the same draw and averages the "
            f"differences over the categories; the interval holds the middle {level} of them "
            "(AUPRO on each draw is read off the maps at 500 fixed thresholds and one above "
            "every normal pixel, within about "
            "0.001 of the exact metric; the difference shown is the exact one). With a few good "
            "test parts per category one part moves a category's I-AUROC by several points: "
            "a difference whose interval spans 0 is not shown to be one.")
    return Table(title=f"{ref} against each method (paired bootstrap)", header=header,
                 cells=cells, csv_header=csv_header, values=values, note=note,
                 slug="comparison")


def comparison_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per compared method: "cmad - btf: +0.028 [+0.008, +0.049] I-AUROC, ..."."""
    comp = results.get("comparison") or {}
    lines = []
    for name, row in (comp.get("methods") or {}).items():
        parts = [f"{fmt_difference(row[k])} {k}" for k in COMPARED
                 if math.isfinite(as_float((row.get(k) or {}).get("mean")))]
        if parts:
            lines.append(f"{comp.get('reference')} - {name}: " + ", ".join(parts)
                         + f" ({fmt_rate(comp.get('level', 0.95))} paired bootstrap intervals "
                           "over the test parts)")
    return lines


def headline_table(results: Mapping[str, Any], baseline: str = BASELINE) -> Table:
    """Mean accuracy and the cost of each method in one table (the report's first table)."""
    methods = methods_of(results)
    base = methods.get(baseline)
    header = ["Method", *(f"{k} (mean)" for k in HEADLINE_METRICS), "FPR / FNR at threshold",
              "infer (ms/sample)", LOAD_HEADER, "model size"]
    csv_header = ["method", *(f"mean_{k}" for k in HEADLINE_METRICS), "mean_fpr", "mean_fnr",
                  "infer_ms_per_sample", "load_avg_min", "load_avg_max", "model_bytes"]
    if base is not None:
        header += [f"time vs {baseline}", f"size vs {baseline}"]
        csv_header += [f"time_vs_{baseline}", f"size_vs_{baseline}"]
    cells: list[list[str]] = []
    values: list[list[Any]] = []
    for name, e in methods.items():
        nums = [as_float((e.get("mean") or {}).get(k)) for k in HEADLINE_METRICS]
        infer, size = as_float(e.get("infer_ms_per_sample")), as_float(e.get("model_bytes"))
        dm = e.get("decision_mean") or {}
        fpr, fnr = as_float(dm.get("fpr")), as_float(dm.get("fnr"))
        load = load_range(e)
        row_v: list[Any] = [name, *nums, fpr, fnr, infer, *load, _int_if_whole(size)]
        row_t = [str(name), *(fmt_metric(x) for x in nums),
                 f"{fmt_rate(fpr)} / {fmt_rate(fnr)}", fmt_number(infer), fmt_load(*load),
                 fmt_bytes(size)]
        if base is not None:
            t = ratio(infer, base.get("infer_ms_per_sample"))
            s = ratio(size, base.get("model_bytes"))
            row_v += [t, s]
            row_t += [fmt_ratio(t), fmt_ratio(s)]
        values.append(row_v)
        cells.append(row_t)
    return Table(title="Headline", header=header, cells=cells, csv_header=csv_header,
                 values=values, bold=best_cells(cells, range(1, len(HEADLINE_METRICS) + 1)),
                 note="Mean over categories; best accuracy per column in bold. FPR / FNR: good "
                      "parts judged anomalous / defective parts judged normal by the stored "
                      "threshold (chosen on validation normals) on the test split. The load "
                      "average is the machine's while each method was timed.",
                 slug="headline")


def summary_text(results: Mapping[str, Any], baseline: str = BASELINE,
                 method: str = "cmad") -> str:
    """A compact plain-text table of mean I-AUROC, P-AUROC and AUPRO@30% per method.

    The best value of each column is marked with '*'. With a paired comparison in the
    results, one line per compared method gives the reference's I-AUROC and AUPRO@30% lead
    and its intervals. When both `method` and `baseline` are present a last line gives the
    inference-time and model-size ratios between them.
    """
    methods = methods_of(results)
    if not methods:
        return "no methods in the results\n"
    cells = [[str(n), *(fmt_metric((e.get("mean") or {}).get(k)) for k in HEADLINE_METRICS)]
             for n, e in methods.items()]
    bold = best_cells(cells, range(1, len(HEADLINE_METRICS) + 1))
    header = ["method", *HEADLINE_METRICS]
    if any(e.get("decision_mean") for e in methods.values()):
        # the stored threshold on the test split: good parts flagged, defective parts missed
        header += ["FPR@thr", "FNR@thr"]
        for row, e in zip(cells, methods.values()):
            dm = e.get("decision_mean") or {}
            row += [fmt_rate(dm.get("fpr")), fmt_rate(dm.get("fnr"))]
    shown = [[t + ("*" if (r, c) in bold else " ") if c else t for c, t in enumerate(row)]
             for r, row in enumerate(cells)]
    widths = [max(len(header[c]) + (1 if c else 0), *(len(row[c]) for row in shown))
              for c in range(len(header))]
    lines = ["  ".join(h.ljust(widths[c]) if c == 0 else (h + " ").rjust(widths[c])
                       for c, h in enumerate(header))]
    lines += ["  ".join(t.ljust(widths[c]) if c == 0 else t.rjust(widths[c])
                        for c, t in enumerate(row)) for row in shown]
    lines += comparison_lines(results)
    if method in methods and baseline in methods:
        a, b = methods[method], methods[baseline]
        t = ratio(a.get("infer_ms_per_sample"), b.get("infer_ms_per_sample"))
        s = ratio(a.get("model_bytes"), b.get("model_bytes"))
        lines.append(
            f"{method} vs {baseline}: {fmt_ratio(t)} the inference time per sample "
            f"({fmt_number(a.get('infer_ms_per_sample'))} ms vs "
            f"{fmt_number(b.get('infer_ms_per_sample'))} ms), {fmt_ratio(s)} the model size "
            f"({fmt_bytes(a.get('model_bytes'))} vs {fmt_bytes(b.get('model_bytes'))})")
        k = ratio(a.get("bank_bytes"), b.get("bank_bytes"))
        if math.isfinite(k):
            lines[-1] += (f", {fmt_ratio(k)} the bank size ({fmt_bytes(a.get('bank_bytes'))} vs "
                          f"{fmt_bytes(b.get('bank_bytes'))})")
    return "\n".join(lines) + "\n"


def _num_key(k: str, shots: Mapping[Any, Any]) -> Any:
    """The original key of `shots` whose string form is `k` (keys may be ints)."""
    return next((orig for orig in shots if str(orig) == k), k)


def _is_number(text: Any) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def _int_if_whole(v: Any) -> Any:
    """Byte and entry counts as ints in CSV; other numbers unchanged."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) >= 1:
        return int(v)
    return v


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")
