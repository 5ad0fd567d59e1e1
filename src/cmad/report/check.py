"""Check a bench report in headless Chromium: no horizontal overflow at each window width.

    python -m cmad.report.check REPORT_DIR [--widths 1400,800] [--screenshots DIR]

Each page of the report (index.html, details.html) is loaded at each width from a copy
in a temporary folder with a small script added (the report itself is never modified; a
<base> element points the copy's relative links back at the report). The script opens
every collapsed <details> section, then reports the page's scroll width against the
window's, and every element that sticks out of the window or out of its own box without
being inside something that scrolls (tables sit in `overflow-x: auto` boxes, so a wide
table is fine; a wide table without one is not). Exit status 0 when every page fits at
every width, 1 when something overflows (each problem is printed), 2 when Chromium or the
report is missing.

Chromium: `chromium`, `chromium-browser` or `google-chrome` on PATH, or $CMAD_CHROMIUM
(on Debian/Ubuntu: `apt-get install -y chromium`).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PAGES = ("index.html", "details.html")
WIDTHS = (1400, 800)
HEIGHT = 900
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Runs after load; writes its findings as JSON into <pre id="cmad-check">, which --dump-dom
# prints. Elements inside a box that scrolls or clips horizontally are that box's business.
PROBE = r"""
<script>
window.addEventListener("load", () => {
  // open every collapsed section, so that what it holds is measured too (images are sized
  // by the style sheet, so the layout does not wait for them)
  document.querySelectorAll("details").forEach((d) => { d.open = true; });
  void document.body.offsetWidth;  // lay the opened sections out
  const W = document.documentElement.clientWidth;
  const CLIPS = ["auto", "scroll", "hidden", "clip"];
  const clips = (el) => CLIPS.includes(getComputedStyle(el).overflowX);
  const scrolled = (el) => {
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (clips(a)) return true;
    }
    return false;
  };
  const name = (el) => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += "#" + el.id;
    if (typeof el.className === "string" && el.className.trim()) {
      s += "." + el.className.trim().split(/\s+/).join(".");
    }
    const sec = el.closest("section");
    if (sec && sec.id) s += " in section#" + sec.id;
    return s;
  };
  const problems = [];
  const page = document.documentElement.scrollWidth;
  if (page > W + 1) {
    problems.push({what: "page", detail: `scrollWidth ${page} px > window ${W} px`});
  }
  const blocks = new Set(["BODY", "MAIN", "SECTION", "DIV", "HEADER", "NAV", "FIGURE",
                          "DETAILS", "P", "DL", "UL", "H1", "H2", "H3"]);
  for (const el of document.querySelectorAll("body *")) {
    if (el.id === "cmad-check") continue;
    const r = el.getBoundingClientRect();
    if ((r.width === 0 && r.height === 0) || scrolled(el)) continue;
    if (r.right > W + 1 || r.left < -1) {
      const span = `${Math.round(r.left)}..${Math.round(r.right)} px`;
      problems.push({what: name(el), detail: `spans ${span}, window ${W} px`});
    } else if (blocks.has(el.tagName) && !clips(el) && el.clientWidth > 0
               && el.scrollWidth > el.clientWidth + 1) {
      const sizes = `${el.scrollWidth} px wider than its box ${el.clientWidth} px`;
      problems.push({what: name(el), detail: `content ${sizes}`});
    }
  }
  const imgs = Array.from(document.images);
  const loaded = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement("pre");
  out.id = "cmad-check";
  out.textContent = JSON.stringify({
    width: W, scrollWidth: page, height: document.documentElement.scrollHeight,
    images: imgs.length, loaded: loaded, problems: problems.slice(0, 50),
    n_problems: problems.length});
  document.body.appendChild(out);
});
</script>
"""


@dataclass
class PageCheck:
    page: str
    width: int
    scroll_width: int = 0
    height: int = 0
    images: int = 0
    loaded: int = 0
    problems: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and not self.problems


def find_chromium() -> str | None:
    """The Chromium executable: $CMAD_CHROMIUM, else the first of CANDIDATES on PATH."""
    env = os.environ.get("CMAD_CHROMIUM")
    if env:
        return env if Path(env).is_file() or shutil.which(env) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _base_args(chromium: str, width: int, height: int) -> list[str]:
    args = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-extensions", "--allow-file-access-from-files",
            f"--window-size={width},{height}", "--virtual-time-budget=10000"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return args


def _probe_copy(page: Path, tmp: Path) -> Path:
    """A copy of `page` in `tmp` with the probe added and links resolved against the report."""
    text = page.read_text(encoding="utf-8")
    base = f'<base href="{page.parent.resolve().as_uri()}/">'
    text = text.replace("<head>", "<head>" + base, 1) if "<head>" in text else base + text
    text = text.replace("</body>", PROBE + "</body>", 1) if "</body>" in text else text + PROBE
    out = tmp / f"probe-{page.name}"
    out.write_text(text, encoding="utf-8")
    return out


def check_page(chromium: str, page: Path, width: int, height: int = HEIGHT,
               timeout: float = 120.0) -> PageCheck:
    """Load `page` at `width` x `height` and return what the probe found."""
    result = PageCheck(page=page.name, width=width)
    with tempfile.TemporaryDirectory(prefix="cmad-check-") as tmp:
        probe = _probe_copy(page, Path(tmp))
        args = [*_base_args(chromium, width, height), f"--user-data-dir={tmp}/profile",
                "--dump-dom", probe.as_uri()]
        try:
            run = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            result.error = f"chromium failed: {exc}"
            return result
    m = re.search(r'<pre id="cmad-check">(.*?)</pre>', run.stdout, re.S)
    if not m:
        tail = (run.stderr or "").strip().splitlines()[-3:]
        result.error = f"no probe result (chromium exit {run.returncode}): {' | '.join(tail)}"
        return result
    data = json.loads(html.unescape(m.group(1)))
    result.scroll_width = int(data["scrollWidth"])
    result.height = int(data["height"])
    result.images, result.loaded = int(data["images"]), int(data["loaded"])
    result.problems = list(data["problems"])
    if data["n_problems"] > len(result.problems):
        result.problems.append({"what": "...", "detail": f"{data['n_problems']} in all"})
    return result


def screenshot(chromium: str, page: Path, width: int, height: int, out: Path,
               timeout: float = 120.0) -> Path:
    """A PNG of the first `height` pixels of `page` at `width`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cmad-shot-") as tmp:
        args = [*_base_args(chromium, width, height), f"--user-data-dir={tmp}/profile",
                f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    return out


def check_report(report: Path, widths: tuple[int, ...] = WIDTHS, chromium: str | None = None,
                 screenshots: Path | None = None) -> list[PageCheck]:
    """Check every page of `report` at every width (and take screenshots when asked)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (install it: apt-get install -y chromium, "
                                "or set CMAD_CHROMIUM)")
    pages = [report / p for p in PAGES if (report / p).is_file()]
    if not pages:
        raise FileNotFoundError(f"{report}: no index.html")
    results = []
    for page in pages:
        for w in widths:
            results.append(check_page(chromium, page, w))
            if screenshots is not None:
                screenshot(chromium, page, w, HEIGHT,
                           screenshots / f"{page.stem}-{w}.png")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmad.report.check", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("report", type=Path, help="report folder (with index.html)")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                    help="comma-separated window widths in pixels (default: %(default)s)")
    ap.add_argument("--screenshots", type=Path, default=None,
                    help="also write PAGE-WIDTH.png screenshots into this folder")
    args = ap.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
        results = check_report(args.report, widths, screenshots=args.screenshots)
    except ValueError:
        print(f"error: --widths: {args.widths!r} is not a comma-separated list of integers",
              file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = 0
    for r in results:
        status = "ok" if r.ok else "OVERFLOW" if not r.error else "ERROR"
        print(f"{r.page} at {r.width} px: {status} (page {r.scroll_width} px wide, "
              f"{r.height} px tall with every section open, {r.loaded}/{r.images} images loaded)")
        if r.error:
            print(f"  {r.error}")
        for p in r.problems:
            print(f"  {p['what']}: {p['detail']}")
        bad += not r.ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
