"""The report in headless Chromium: no horizontal overflow at 1400 and 800 px (both pages).

Skipped when no Chromium is installed (apt-get install -y chromium, or set CMAD_CHROMIUM).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cmad.report import write_report
from cmad.report.check import check_report, find_chromium, main

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no headless Chromium (apt-get install -y chromium, or set CMAD_CHROMIUM): "
           "the browser check of the report is not run")


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test report with many methods and stages, so its tables are wider than 1400 px."""
    from test_report import _panels, _results

    res = _results()
    base = res["methods"]["cmad"]
    for i in range(12):
        res["methods"][f"a-long-method-name-{i}"] = {
            **base, "stages_ms": {f"stage number {k}": 1.0 + k for k in range(14)}}
    out = tmp_path_factory.mktemp("browser") / "report"
    write_report(out, res, _panels(), quiet=True)
    return out


def test_report_fits_at_1400_and_800_px(wide_report: Path) -> None:
    results = check_report(wide_report, (1400, 800))
    assert {(r.page, r.width) for r in results} == {
        (p, w) for p in ("index.html", "details.html") for w in (1400, 800)}
    for r in results:
        assert r.ok, f"{r.page} at {r.width} px: {r.error or r.problems}"
        assert r.scroll_width == r.width
        assert r.loaded == r.images > 0, "every figure loads"


def test_overflow_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    cells = "".join(f"<td>column {i} with a long heading</td>" for i in range(60))
    (bad / "index.html").write_text(
        "<!DOCTYPE html><html><head><style>td{white-space:nowrap}</style></head><body>"
        # inside a closed <details>: the check opens it
        f"<section><details><summary>wide</summary><table><tr>{cells}</tr></table></details>"
        "</section></body></html>")
    (r,) = check_report(bad, (800,))
    assert not r.ok and r.scroll_width > 800
    assert any(p["what"] == "page" for p in r.problems)
    assert main([str(bad), "--widths", "800"]) == 1
    assert "OVERFLOW" in capsys.readouterr().out
