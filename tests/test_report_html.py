"""report.html as a person sees it (issue 15): a real merge's report rendered by headless Chromium in a
1280 px window. The page must not scroll sideways (the plot was 1320 px wide and cut off), every section
must be there, numbers must be rounded and the curve's legend must tell its line styles apart.

Chromium is a Debian package (`chromium-headless-shell`); `.ci/run` installs it. Without it this test
fails rather than skips: a skipped layout check is one nobody runs.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
from conftest import case, run_cli

from onnxzip.html_report import FAMILIES, SECTIONS

WINDOW = 1280
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Appended to a copy of the page (the report itself has no scripts): once everything, the embedded plot
# included, is laid out, write what the page measures into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", function () {
  var root = document.documentElement, out = document.createElement("pre");
  out.id = "layout-probe";
  out.textContent = JSON.stringify({
    scrollWidth: root.scrollWidth, innerWidth: window.innerWidth,
    sections: Array.prototype.map.call(document.querySelectorAll("h2[id]"), function (h) { return h.id; }),
    text: document.body.innerText
  });
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"no headless Chromium ({', '.join(BROWSERS)}) on PATH: `.ci/run` installs it "
                "(apt-get install chromium-headless-shell)")


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    """One real merge with every optional section: a budget (plan search), the trade-off curve, evaluation
    labels and distillation (a few steps: its section is what is checked, not its gain)."""
    out = tmp_path_factory.mktemp("report")
    d = case("mlp_legacy")
    result = run_cli("merge", d / "a.onnx", d / "b.onnx", "--calibration", d / "calib.npz", "--out", out / "m.onnx",
                     "--report", out / "report.json", "--html", out / "report.html", "--eval", d / "test.npz",
                     "--max-rel-err", "0.1", "--curve", "--distill", "--distill-steps", "20", "--quiet")
    assert result.returncode == 0, result.stderr
    return {"report": json.loads((out / "report.json").read_text()), "html": out / "report.html"}


def measure(page) -> dict:
    """Load `page` in a WINDOW px wide headless Chromium; what the probe measured."""
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    result = subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                             f"--window-size={WINDOW},900", "--virtual-time-budget=10000", "--dump-dom",
                             probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="layout-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"chromium printed no measurement (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_fits_1280_px_with_every_section_rounded_numbers_and_a_legend(merged):
    report, page = merged["report"], merged["html"]
    assert report["plan"]["tried"] and report["curve"] and report["evaluation"] and report["distill"]
    seen = measure(page)
    assert seen["innerWidth"] == WINDOW
    # no sideways scrolling: the widest thing on the page (the plot, the widest table) fits the window
    assert seen["scrollWidth"] <= WINDOW, seen["scrollWidth"]
    assert seen["sections"] == [sid for sid, _ in SECTIONS]
    text = seen["text"]
    # rounded: no figure with six or more decimals (report.json has e.g. 0.9741604564109676)
    long_floats = re.findall(r"\d\.\d{6,}", text)
    assert not long_floats, long_floats[:5]
    assert re.search(r"0\.974\b", text) and "0.97416" not in text
    # the curve's legend names both line styles and every task's colour
    for _, _, _, label in FAMILIES:
        assert label in text, label
    for task in report["tasks"]:
        assert f"task {task}" in text
    # the curve table carries the plotted quantities: params ratio (x) and relative error per task (y)
    for header in ("params ratio", "task a: rel. error", "task b: rel. error", "task a: top-1 agreement"):
        assert header in text, header
    assert f"×{report['curve'][1]['param_ratio']:.2f}" in text
    # the plan chosen by the budget, and the sections that had content are not "none"
    assert f"{report['plan']['chosen']} (chosen)" in text
    assert "none: not run" not in text and "none: not computed" not in text


def test_page_is_self_contained(merged):
    page = merged["html"].read_text()
    body = page.split("<body>", 1)[1]
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert "http:" not in body and "https:" not in body and 'src="data:image/png;base64,' in body


def test_a_page_wider_than_the_window_is_measured_as_such(merged, tmp_path):
    """The measurement can fail: a page with a 1320 px plot (the old report) measures wider than 1280."""
    page = tmp_path / "wide.html"
    page.write_text('<!doctype html><html><body><div style="width:1320px;height:10px"></div></body></html>')
    assert measure(page)["scrollWidth"] > WINDOW


def test_one_helper_rounds_every_kind_of_figure():
    from onnxzip.html_report import fmt

    assert fmt(0.9966499162479062, "prob") == "0.997"
    assert fmt(1.9723, "ratio") == "&times;1.97"
    assert fmt(0.3848, "pct") == "38.5%"
    assert fmt(0.04498563323521389) == "0.045"
    assert fmt(1234567.891) == "1,234,568" and fmt(39000) == "39,000"
    assert fmt(1.2345e-7) == "1.23e-07" and fmt(0.0) == "0"
    assert fmt(None) == "&ndash;" and fmt(True) == "yes"
    assert fmt("<b>") == "&lt;b&gt;"  # text is escaped
