"""``thawed report`` pages opened in headless Chromium (Playwright): a screenshot, every chart drawn
with the marks it declares, no console error, no request leaving the file.

Needs Playwright (``pip install playwright``) and a Chromium: the system's (``apt-get install
chromium``; found on PATH or given by ``THAWED_CHROMIUM=/path/to/chrome``) or Playwright's own
(``playwright install chromium``). Without them the tests skip, saying which is missing.

The real-model test reports the SmolLM2 nwc 4.25 and cvxq 3.25 checkpoints against the dense
source. Compressing those takes many minutes, so it uses existing ones: ``THAWED_REPORT_CKPTS=
nwc=DIR,cvxq=DIR`` or ``out/nwc425`` and ``out/cvxq325`` (made by the commands in the skip
message). ``THAWED_REPORT_SCREENSHOTS=DIR`` keeps the screenshots there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from models_fixtures import real_model_dir, tiny_llama_dir  # noqa: F401

from thawed.runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
_SYSTEM_CHROMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# what the page must look like once rendered, read in the browser
_PROBE = """() => Array.from(document.querySelectorAll('svg.chart')).map(svg => {
  const box = svg.getBoundingClientRect();
  const marks = Array.from(svg.querySelectorAll('rect.cell, rect.bar'));
  const drawn = marks.filter(r => { const b = r.getBoundingClientRect(); return b.width > 0 && b.height > 0
      && getComputedStyle(r).fill !== 'none'; });
  return {name: svg.dataset.chart, declared: Number(svg.dataset.marks), drawn: drawn.length,
          width: box.width, height: box.height};
})"""


def _chromium_path() -> str | None:
    given = os.environ.get("THAWED_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, _SYSTEM_CHROMES) if p), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")
    with sync_api.sync_playwright() as pw:
        exe = _chromium_path()
        try:
            b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except sync_api.Error as exc:
            if exe is None and "Executable doesn't exist" in str(exc):
                pytest.skip("no Chromium: `apt-get install chromium`, or `playwright install chromium`, or set "
                            "THAWED_CHROMIUM=/path/to/chrome")
            raise
        yield b
        b.close()


def render(browser, html: Path, png: Path) -> tuple[list[dict], list[str]]:
    """Open ``html`` from disk, screenshot the whole page into ``png``; the charts as drawn and
    every console error, page error or request that tried to leave the file."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request {r.url}") if not r.url.startswith("file:") else None)
    page.goto(html.resolve().as_uri(), wait_until="load")
    charts = page.evaluate(_PROBE)
    page.screenshot(path=str(png), full_page=True)
    page.close()
    return charts, problems


def _shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("THAWED_REPORT_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_page(browser, html: Path, png: Path, want: set[str]) -> list[dict]:
    charts, problems = render(browser, html, png)
    assert not problems, problems
    assert {c["name"] for c in charts} == want, charts
    for c in charts:
        assert c["declared"] > 0 and c["drawn"] == c["declared"], c
        assert c["width"] > 100 and c["height"] > 50, c
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    return charts


def test_tiny_report_renders_in_chromium(browser, tiny_llama_dir, tmp_path):
    ckpt, html = tmp_path / "ckpt", tmp_path / "report.html"
    assert main(["compress", str(tiny_llama_dir), str(ckpt), "--codec", "rtn:bits=4,group_size=32", "--no-progress"]) == 0
    assert main(["report", str(ckpt), "--against", str(tiny_llama_dir), "--out", str(html)]) == 0
    charts = check_page(browser, html, _shots(tmp_path) / "tiny.png", {"bpw-heatmap", "bytes-by-codec", "sqnr-heatmap"})
    assert next(c for c in charts if c["name"] == "bpw-heatmap")["drawn"] == 2 * 7


def test_a_broken_page_is_caught(browser, tmp_path):
    """The check can fail: a script error and a chart with a missing mark are both reported."""
    html = tmp_path / "bad.html"
    html.write_text('<!DOCTYPE html><html><body><svg class="chart" data-chart="x" data-marks="2" width="300" '
                    'height="100"><rect class="cell" width="10" height="10"/></svg>'
                    '<script>undefinedFunction()</script></body></html>')
    charts, problems = render(browser, html, tmp_path / "bad.png")
    assert any("undefinedFunction" in p for p in problems), problems
    assert charts == [{"name": "x", "declared": 2, "drawn": 1, "width": 300, "height": 100}]


def _real_ckpts() -> dict[str, Path]:
    given = os.environ.get("THAWED_REPORT_CKPTS")
    if given:
        pairs = [item.split("=", 1) for item in given.split(",")]
        return {k: Path(v) for k, v in pairs}
    return {"nwc": ROOT / "out" / "nwc425", "cvxq": ROOT / "out" / "cvxq325"}


@pytest.mark.real
@pytest.mark.parametrize("codec", ["nwc", "cvxq"])
def test_real_reports_render_in_chromium(browser, codec, real_model_dir, tmp_path):  # noqa: F811
    ckpt = _real_ckpts().get(codec)
    if ckpt is None or not ckpt.is_dir():
        pytest.skip(f"no SmolLM2 {codec} checkpoint at {ckpt}: `thawed compress $(thawed demo-model) out/nwc425 "
                    "--codec nwc --target-bpw 4.25` / `... out/cvxq325 --codec cvxq --target-bpw 3.25` "
                    "(or THAWED_REPORT_CKPTS=nwc=DIR,cvxq=DIR)")
    shots = _shots(tmp_path)
    html = shots / f"report-{codec}.html"
    assert main(["report", str(ckpt), "--against", str(real_model_dir), "--out", str(html)]) == 0
    charts = check_page(browser, html, shots / f"report-{codec}.png",
                        {"bpw-heatmap", "bytes-by-codec", "sqnr-heatmap"})
    heat = {c["name"]: c for c in charts}
    assert heat["bpw-heatmap"]["drawn"] == heat["sqnr-heatmap"]["drawn"] == 30 * 7  # 30 blocks x 7 linears
    text = html.read_text()
    assert f">{codec}<" in text and str(real_model_dir) in text
