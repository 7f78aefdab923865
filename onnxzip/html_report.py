"""The human report: one self-contained HTML file (tables + plots as embedded PNGs) from report.json.

Made for a person in a 1280 px browser window: the page never scrolls sideways (the plot scales to
the column, a table wider than the column scrolls inside its own box), every figure is rounded by one
helper (`fmt`), and each part of report.json has its own section, an <h2> with a stable id (SECTIONS)
that tests and links can find. No scripts, styles or fonts from elsewhere: it is opened from disk,
from a CI artifact or from the service, offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
import struct
from typing import Any, Optional

# (id, heading) of every section, in page order; each is always present (saying "none" when empty)
SECTIONS = (
    ("summary", "Summary"),
    ("warnings", "Warnings"),
    ("fidelity", "Fidelity"),
    ("plots", "Plots"),
    ("plan", "Budget: plans searched"),
    ("curve", "Trade-off curve"),
    ("distillation", "Distillation"),
    ("tensorrt", "TensorRT readiness"),
    ("options", "Options used"),
    ("layers", "Layers"),
)

# matplotlib's default colour cycle (tab10): the plot and the HTML legend name the same colour per task
TASK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
# the curve's two families: how the plot draws them and what the legend says
FAMILIES = (("k=", "-", "solid", "solid line: first k layers shared (zipper depth k)"),
            ("share=", "--", "dashed", "dashed line: share fraction of every hidden layer"))

esc = html.escape


def fmt(value: Any, kind: str = "num") -> str:
    """Every figure on the page, rounded for a reader. kind: 'num' (3 significant digits, thousands
    separated, no exponent between 0.001 and 10^15), 'prob' (agreement, accuracy: 3 decimals),
    'ratio' (x1.97), 'pct' (a fraction as 12.3%), 'points' (1 decimal), 's' (seconds, 1 decimal)."""
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float):
        return esc(str(value))
    if not math.isfinite(value):
        return esc(str(value))
    if kind == "prob":
        return f"{value:.3f}"
    if kind == "ratio":
        return f"&times;{value:.2f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "points":
        return f"{value:.1f}"
    if kind == "s":
        return f"{value:.1f} s"
    magnitude = abs(value)
    if value == 0 or magnitude >= 1e15:
        return f"{value:.3g}"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 0.001:
        return f"{value:.3g}"
    return f"{value:.2e}"


def plot_png(report: dict) -> Optional[bytes]:
    """Per-layer sharing (and, when the report has one, the trade-off curve) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    layers = report.get("layers") or []
    curve = report.get("curve") or []
    if not layers:
        return None
    panels = 2 if curve else 1
    # 5.5 in a panel at 110 dpi: about 1210 px for two; the page scales it down to its column anyway
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    positions = [r["position"] for r in layers]
    widths = [min(r["widths"].values()) for r in layers]
    ax.bar(positions, widths, color="#d9d9d9", label="narrowest width")
    ax.bar(positions, [r["shared"] for r in layers], color="#2b8cbe", label="shared neurons")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # positions are whole numbers
    ax.set_xlabel("layer position")
    ax.set_ylabel("neurons")
    ax.set_title("What is shared")
    ax.legend(fontsize=8)
    if curve:
        ax = axes[0][1]
        tasks = report["tasks"]
        for i, task in enumerate(tasks):
            for family, style, _, _ in FAMILIES:
                pts = _family_points(curve, family, task)
                xs = [p["param_ratio"] for p in pts]
                ys = [p["fidelity"][task]["rel_err"] for p in pts]
                ax.plot(xs, ys, style, marker="o", markersize=4, color=_task_color(i))
                if family == "k=" and i == 0:
                    for p, x, y in zip(pts, xs, ys):
                        ax.annotate(p["label"], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        # proxy entries: one per line style (what the family is) and one per task (its colour), so every
        # line is told apart without a legend row per line
        handles = [Line2D([], [], color="#444", linestyle=style, marker="o", markersize=4, label=label)
                   for _, style, _, label in FAMILIES]
        handles += [Line2D([], [], color=_task_color(i), linewidth=3, label=f"task {t}") for i, t in enumerate(tasks)]
        ax.set_xlabel("parameters: originals / merged")
        ax.set_ylabel("relative output error (held-out)")
        ax.set_title("Trade-off: pick a point")
        # below the axes, not over the lines (with three tasks any corner hid one)
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2,
                  frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _task_color(i: int) -> str:
    return TASK_COLORS[i % len(TASK_COLORS)]


def _family_points(curve: list, family: str, task: str) -> list:
    return sorted((p for p in curve if p["label"].startswith(family)
                   and (p["fidelity"].get(task) or {}).get("rel_err") is not None), key=lambda p: p["param_ratio"])


def render(report: dict, png: Optional[bytes] = None) -> str:
    """Self-contained HTML (no external files or scripts)."""
    png = png if png is not None else plot_png(report)
    bodies = {
        "summary": _summary(report), "warnings": _warnings(report), "fidelity": _fidelity(report),
        "plots": _plots(report, png), "plan": _plan(report), "curve": _curve(report),
        "distillation": _distillation(report), "tensorrt": _tensorrt(report), "options": _options(report),
        "layers": _layers(report),
    }
    nav = " ".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    sections = "\n".join(f'<section><h2 id="{sid}">{esc(title)}</h2>\n{bodies[sid]}\n</section>'
                         for sid, title in SECTIONS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>onnxzip report: {esc(', '.join(report.get('tasks', [])))}</title>
<style>{STYLE}</style>
</head><body>
<h1>onnxzip merge report</h1>
<nav>{nav}</nav>
{sections}
</body></html>
"""


STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;line-height:1.4;
max-width:1200px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:1.5em;margin:.4em 0}
h2{font-size:1.2em;margin:1.4em 0 .4em;padding-top:.3em;border-top:1px solid #ddd}
nav{font-size:13px}nav a{margin-right:.9em;white-space:nowrap}
img{display:block;max-width:100%;height:auto}
.box{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3;font-weight:600}
.nw{white-space:nowrap}
td.p{min-width:12em}
td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.muted{color:#666}
ul.warn li{color:#8a4b00}
ul.legend{list-style:none;padding:0;margin:.3em 0;font-size:13px}
ul.legend li{display:inline-block;margin-right:1.4em}
.swatch{display:inline-block;width:28px;height:0;vertical-align:middle;margin-right:.4em}
.chip{display:inline-block;width:14px;height:14px;vertical-align:middle;margin-right:.4em}
""".strip()


# --- sections -----------------------------------------------------------------------------------------------

def _table(header: Optional[list[str]], rows: list[list[str]], numeric: frozenset = frozenset(),
           prose: frozenset = frozenset()) -> str:
    """A table in its own scrolling box: a wide one scrolls there, never the page. Cells are HTML
    already (escaped by the caller); `numeric` columns are right-aligned, `prose` columns (a sentence
    per cell) keep a readable width when many figure columns compete for the page."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    klass = {**{i: ' class="n"' for i in numeric}, **{i: ' class="p"' for i in prose}}
    body = "".join("<tr>" + "".join(f"<td{klass.get(i, '')}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<div class="box"><table>{head}{body}</table></div>'


def _none(text: str = "none") -> str:
    return f'<p class="muted">{esc(text)}</p>'


def _bounded(entry: dict, key: str, sign: str, kind: str = "num") -> str:
    """'0.991 (&ge; 0.974)': a figure with its one-sided bound, or 'not measured'."""
    value = entry.get(key)
    if value is None:
        return "not measured" if key in entry else "&ndash;"
    bound = entry.get(f"{key}_lower", entry.get(f"{key}_upper"))
    # a narrow cell may put the bound under its figure, never split a bound from its sign
    return f'<span class="nw">{fmt(value, kind)}</span>' + (
        f' <span class="nw">({sign} {fmt(bound, kind)})</span>' if bound is not None else "")


def _summary(report: dict) -> str:
    t = report.get("totals") or {}
    tasks = report.get("tasks", [])
    layers = report.get("layers") or []
    rows = [["tasks", esc(", ".join(tasks))]]
    for task, m in (report.get("models") or {}).items():
        rows.append([f"model {esc(task)}", f"{esc(str(m.get('source')))} (opset {fmt(m.get('opset'))}, IR "
                     f"{fmt(m.get('ir_version'))}, {fmt(m.get('layers'))} layers); outputs "
                     f"{esc(', '.join(m.get('outputs', [])))}"])
    rows += [
        ["shared", f"{fmt(t.get('shared_neurons', 0))} neurons in {sum(1 for r in layers if r['shared'])} of "
                   f"{len(layers)} layers"],
        ["parameters", f"{fmt(t.get('model_params_before'))} &rarr; {fmt(t.get('model_params_after'))} "
                       f"({fmt(t.get('param_ratio'), 'ratio')} smaller)"],
        ["multiply-adds", f"{fmt(t.get('macs_before'))} &rarr; {fmt(t.get('macs_after'))} "
                          f"({fmt(t.get('macs_ratio'), 'ratio')} fewer; {fmt(t.get('shared_macs_fraction'), 'pct')} "
                          "computed once for all tasks)"],
        ["file size", f"{fmt(t.get('bytes_before'))} &rarr; {fmt(t.get('bytes_after'))} bytes "
                      f"({fmt(t.get('size_ratio'), 'ratio')} smaller)"],
    ]
    cal = report.get("calibration")
    if cal:
        widest = cal.get("widest_layer")
        rows.append(["calibration", f"{fmt(cal['fit_samples'])} samples fit the merge, {fmt(cal['holdout_samples'])} "
                     f"held out to measure it (recommended: {fmt(cal['recommended_fit_samples'])}+ and "
                     f"{fmt(cal['min_holdout_samples'])}+)"
                     + (f"; widest layer {widest['position']} ({esc(widest['op'])}): {fmt(widest['rows'])} rows for "
                        f"{fmt(widest['unknowns'])} unknowns per neuron" if widest else "")])
    align = report.get("alignment") or {}
    if align.get("stop_reason"):
        rows.append(["alignment", f"{fmt(align.get('aligned_layers'))} layers aligned; stops at "
                     f"{esc(str(align['stop_reason']))}"])
    rows.append(["run", f"onnxzip {esc(str(report.get('onnxzip', '')))}, {fmt(report.get('seconds'), 's')}"])
    return _table(None, rows)


def _warnings(report: dict) -> str:
    lines = report.get("warnings") or []
    if not lines:
        return _none("none: nothing the reader must not miss")
    return '<ul class="warn">' + "".join(f"<li>{esc(w)}</li>" for w in lines) + "</ul>"


def _fidelity(report: dict) -> str:
    rows = []
    for name, section in (("held-out calibration samples", report.get("fidelity")),
                          ("evaluation samples", report.get("evaluation"))):
        for task, f in (section or {}).items():
            acc = (f"{fmt(f['accuracy_original'], 'prob')} &rarr; {_bounded(f, 'accuracy_merged', '&ge;', 'prob')}"
                   if f.get("accuracy_merged") is not None else "&ndash;")
            rows.append([esc(task), f"{name} ({fmt(f.get('samples'))})", _bounded(f, "rel_err", "&le;"),
                         _bounded(f, "top1_agreement", "&ge;", "prob"), acc])
    if not rows:
        return _none("none: no held-out samples (holdout 0) and no evaluation data")
    confidence = next((f.get("confidence") for s in (report.get("fidelity"), report.get("evaluation")) if s
                       for f in s.values() if f.get("confidence") is not None), None)
    return (_table(["task", "measured on", "relative output error", "top-1 agreement with the original",
                    "accuracy: original &rarr; merged"], rows)
            + f'<p class="muted">Bounds are one-sided at {fmt(confidence, "pct")} confidence; "not measured" below '
              "the minimum sample count.</p>")


def _plots(report: dict, png: Optional[bytes]) -> str:
    if not png:
        return _none("none: the report has no layers to plot")
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR: its size keeps the aspect when scaled
    image = (f'<img alt="sharing per layer and trade-off" width="{width}" height="{height}" '
             f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    return image + (_legend(report) if report.get("curve") else "")


def _legend(report: dict) -> str:
    """The curve's legend in words, the same entries as in the plot: line style = family, colour = task."""
    items = [f'<li><span class="swatch" style="border-top:2px {css} #444"></span>{esc(label)}</li>'
             for _, _, css, label in FAMILIES]
    items += [f'<li><span class="chip" style="background:{_task_color(i)}"></span>task {esc(t)}</li>'
              for i, t in enumerate(report.get("tasks", []))]
    return f'<ul class="legend">{"".join(items)}</ul>'


def _per_task_header(tasks: list[str], with_accuracy: bool) -> list[str]:
    header = []
    for t in tasks:
        header += [f"task {esc(t)}: rel. error", f"task {esc(t)}: top-1 agreement"]
        header += [f"task {esc(t)}: accuracy"] if with_accuracy else []
    return header


def _per_task_cells(fidelity: dict, tasks: list[str], with_accuracy: bool) -> list[str]:
    cells = []
    for t in tasks:
        f = fidelity.get(t) or {}
        cells += [_bounded(f, "rel_err", "&le;"), _bounded(f, "top1_agreement", "&ge;", "prob")]
        cells += [_bounded(f, "accuracy_merged", "&ge;", "prob")] if with_accuracy else []
    return cells


def _plan(report: dict) -> str:
    plan = report.get("plan")
    if not plan:
        return _none("none: no budget (--max-drop / --max-rel-err) was given; the options set the sharing")
    budget = plan.get("budget") or {}
    limits = ([f"top-1 disagreement within {fmt(budget['max_drop'], 'points')} points"]
              if budget.get("max_drop") is not None else [])
    limits += ([f"relative output error within {fmt(budget['max_rel_err'])}"]
               if budget.get("max_rel_err") is not None else [])
    tasks = report.get("tasks", [])
    rows = []
    for p in plan.get("tried", []):
        chosen = p["label"] == plan.get("chosen")
        label = f"<b>{esc(p['label'])} (chosen)</b>" if chosen else esc(p["label"])
        meets = "yes" if p["meets"] else f"no: {esc(str(p.get('miss')))}"
        rows.append([label, meets, fmt(p.get("macs_ratio"), "ratio"), fmt(p.get("param_ratio"), "ratio"),
                     fmt(p.get("shared_macs_fraction"), "pct")]
                    + _per_task_cells(p.get("fidelity") or {}, tasks, False))
    head = (f"<p>Budget: {esc(' and '.join(limits) or 'none')} for every task, by the bound at "
            f"{fmt(budget.get('confidence'), 'pct')} confidence; saving {esc(str(budget.get('objective')))}. "
            f"Chose <b>{esc(str(plan.get('chosen')))}</b> after {len(rows)} plans in "
            f"{fmt(plan.get('seconds'), 's')}.</p>")
    return head + _table(["plan", "meets the budget", "MACs ratio", "params ratio", "MACs computed once"]
                         + _per_task_header(tasks, False), rows, frozenset({2, 3, 4}), frozenset({1}))


def _curve(report: dict) -> str:
    curve = report.get("curve") or []
    if not curve:
        return _none("none: not computed (--curve adds it)")
    tasks = report.get("tasks", [])
    with_accuracy = any((p.get("fidelity") or {}).get(t, {}).get("accuracy_merged") is not None
                        for p in curve for t in tasks)
    rows = []
    for p in curve:
        family = next((css for prefix, _, css, _ in FAMILIES if p["label"].startswith(prefix)), "")
        what = {"solid": "zipper k (solid)", "dashed": "fraction (dashed)"}.get(family, "")
        rows.append([esc(p["label"]), f'<span class="nw">{what}</span>', fmt(p.get("param_ratio"), "ratio"),
                     fmt(p.get("macs_ratio"), "ratio")]
                    + _per_task_cells(p.get("fidelity") or {}, tasks, with_accuracy))
    return (_table(["setting", "family (line)", "params ratio", "MACs ratio"] + _per_task_header(tasks, with_accuracy),
                   rows, frozenset({2, 3}))
            + '<p class="muted">Measured on the held-out calibration samples, as in the plot: params ratio is its x '
              "axis, relative output error its y axis.</p>")


def _distillation(report: dict) -> str:
    d = report.get("distill")
    if not d:
        return _none("none: not run (--distill)")
    if not d.get("steps"):
        why = f"<p>{esc(d['warning'])}</p>" if d.get("warning") else ""
        return "<p>Skipped: the closed-form merge is kept.</p>" + why
    text = (f"<p>{fmt(d.get('steps'))} steps in {fmt(d.get('seconds'), 's')} on {esc(str(d.get('device', '')))} "
            f"(stopped: {esc(str(d.get('stopped')))}); kept the <b>{esc(str(d.get('kept')))}</b> weights"
            + (f" ({esc(d['why'])})" if d.get("why") else "") + ".</p>")
    rows = []
    losses = d.get("held_out_loss") or {}
    for t, f in (d.get("fidelity") or {}).items():
        before, after = f.get("closed_form") or {}, f.get("distilled") or {}
        loss = losses.get(t) or {}
        rows.append([esc(t), f"{fmt(loss.get('closed_form'))} &rarr; {fmt(loss.get('distilled'))}",
                     f"{fmt(before.get('rel_err'))} &rarr; {fmt(after.get('rel_err'))}",
                     f"{fmt(before.get('top1_agreement'), 'prob')} &rarr; {fmt(after.get('top1_agreement'), 'prob')}"])
    return text + _table(["task", "held-out loss: closed form &rarr; distilled", "relative output error",
                          "top-1 agreement"], rows)


def _tensorrt(report: dict) -> str:
    trt = report.get("tensorrt")
    if not trt:
        return _none("none: not checked")
    rows = [[esc(name), "yes" if v["readable"] else "no", esc("; ".join(v["blockers"])) or "&ndash;"]
            for name, v in trt.get("versions", {}).items()]
    outside = trt.get("ops_outside_tensorrt") or []
    return (f"<p>Merged model: opset {fmt(trt.get('opset'))}; operators no TensorRT version parses: "
            f"{esc(', '.join(outside)) or 'none'}. Checked against the parsers' opset and operator lists, "
            "without TensorRT.</p>" + _table(["TensorRT", "can read it", "what stops it"], rows))


def _options(report: dict) -> str:
    options = report.get("options")
    if not options:
        return _none("none recorded")
    pairs = [(esc(k), _option_value(v)) for k, v in options.items()]
    half = (len(pairs) + 1) // 2  # two key/value column pairs: about 30 options in 15 rows
    rows = [[*pairs[i], *(pairs[i + half] if i + half < len(pairs) else ("", ""))] for i in range(half)]
    return _table(["option", "value", "option", "value"], rows)


def _option_value(value: Any) -> str:
    if isinstance(value, dict):
        return esc(", ".join(f"{k}={v}" for k, v in value.items())) or "&ndash;"
    if isinstance(value, (list, tuple)):
        return esc(", ".join(map(str, value))) or "&ndash;"
    return fmt(value)


def _layers(report: dict) -> str:
    tasks = report.get("tasks", [])
    rows = []
    for r in report.get("layers") or []:
        # node names, ops ('Gemm 300->100') and widths read whole: a browser would break them at '-' and '/'
        names = "<br>".join(f'<span class="nw">{esc(k)}: {esc(v)}</span>' for k, v in r["names"].items())
        widths = "/".join(str(r["widths"].get(k, "-")) for k in tasks)
        rows.append([str(r["position"]), names, f'<span class="nw">{esc(r["op"])}</span>', widths,
                     fmt(r["shared"]), fmt(r["predicted_error"]),
                     f"{fmt(r['params_before'])} &rarr; {fmt(r['params_after'])}",
                     f"{fmt(r['macs_before'])} &rarr; {fmt(r['macs_after'])}",
                     fmt(r.get("computed_once")), esc(r.get("not_shared_because") or "")])
    if not rows:
        return _none()
    return _table(["#", "nodes", "op", "widths", "shared", "predicted error", "parameters", "multiply-adds",
                   "computed once", "not shared because"], rows, frozenset({3, 4, 5, 6, 7}))
