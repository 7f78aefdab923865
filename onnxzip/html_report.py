"""The human report: one self-contained HTML file (tables + plots as embedded PNGs) from report.json."""

from __future__ import annotations

import base64
import html
import io
from typing import Optional


def plot_png(report: dict) -> Optional[bytes]:
    """Per-layer sharing (and, when the report has one, the trade-off curve) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.get("layers") or []
    curve = report.get("curve") or []
    if not layers:
        return None
    panels = 2 if curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    positions = [r["position"] for r in layers]
    widths = [min(r["widths"].values()) for r in layers]
    ax.bar(positions, widths, color="#d9d9d9", label="narrowest width")
    ax.bar(positions, [r["shared"] for r in layers], color="#2b8cbe", label="shared neurons")
    ax.set_xlabel("layer position")
    ax.set_ylabel("neurons")
    ax.set_title("What is shared")
    ax.legend(fontsize=8)
    if curve:
        ax = axes[0][1]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, task in enumerate(report["tasks"]):
            for family, style in (("k=", "-"), ("share=", "--")):
                pts = sorted((p for p in curve if p["label"].startswith(family)
                              and (p["fidelity"].get(task) or {}).get("rel_err") is not None),
                             key=lambda p: p["param_ratio"])
                xs = [p["param_ratio"] for p in pts]
                ys = [p["fidelity"][task]["rel_err"] for p in pts]
                name = "first k layers" if family == "k=" else "share fraction"
                ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)], label=f"task {task}, {name}")
                if family == "k=" and i == 0:
                    for p, x, y in zip(pts, xs, ys):
                        ax.annotate(p["label"], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("parameters: originals / merged")
        ax.set_ylabel("relative output error (held-out)")
        ax.set_title("Trade-off: pick a point")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def render(report: dict, png: Optional[bytes] = None) -> str:
    """Self-contained HTML (no external files or scripts)."""
    png = png if png is not None else plot_png(report)
    esc = html.escape
    tasks = report.get("tasks", [])
    t = report.get("totals", {})
    rows = []
    for r in report.get("layers", []):
        names = "<br>".join(f"{esc(k)}: {esc(v)}" for k, v in r["names"].items())
        widths = " / ".join(str(r["widths"].get(k, "-")) for k in tasks)
        why = esc(r.get("not_shared_because") or "")
        rows.append(f"<tr><td>{r['position']}</td><td>{names}</td><td>{esc(r['op'])}</td><td>{widths}</td>"
                    f"<td>{r['shared']}</td><td>{r['predicted_error']:.4g}</td>"
                    f"<td>{r['params_before']:,} &rarr; {r['params_after']:,}</td>"
                    f"<td>{r['macs_before']:,} &rarr; {r['macs_after']:,}</td><td>{why}</td></tr>")
    fid = []
    for name, section in (("held-out calibration samples", report.get("fidelity")),
                          ("evaluation samples", report.get("evaluation"))):
        for task, f in (section or {}).items():
            acc = (f"{f['accuracy_original']:.4f} &rarr; {_bounded(f, 'accuracy_merged', '&ge;')}"
                   if f.get("accuracy_merged") is not None else "")
            fid.append(f"<tr><td>{esc(task)}</td><td>{name} ({f.get('samples', '')})</td>"
                       f"<td>{_bounded(f, 'rel_err', '&le;')}</td><td>{_bounded(f, 'top1_agreement', '&ge;')}</td>"
                       f"<td>{acc}</td></tr>")
    curve_rows = [f"<tr><td>{esc(p['label'])}</td><td>{p['param_ratio']}</td><td>{p['macs_ratio']}</td>"
                  + "".join(f"<td>{_bounded(p['fidelity'].get(k) or {}, 'top1_agreement', '&ge;')}</td>" for k in tasks)
                  + "</tr>" for p in report.get("curve") or []]
    plan = report.get("plan")
    plan_rows = [f"<tr><td>{esc(p['label'])}{' (chosen)' if p['label'] == plan['chosen'] else ''}</td>"
                 f"<td>{p['macs_ratio']}</td><td>{p['param_ratio']}</td><td>{'yes' if p['meets'] else esc(p['miss'])}</td>"
                 "</tr>" for p in (plan or {}).get("tried", [])]
    image = (f'<img alt="sharing per layer and trade-off" src="data:image/png;base64,'
             f'{base64.b64encode(png).decode()}">' if png else "")
    warnings = "".join(f"<li>{esc(w)}</li>" for w in report.get("warnings") or [])
    plan_table = ("<h2>Budget: plans tried</h2><table><tr><th>plan</th><th>MACs ratio</th><th>params ratio</th>"
                  "<th>meets the budget</th></tr>" + "".join(plan_rows) + "</table>") if plan_rows else ""
    curve = ("<h2>Trade-off curve</h2><table><tr><th>setting</th><th>params ratio</th><th>MACs ratio</th>"
             + "".join(f"<th>top-1 agreement {esc(k)}</th>" for k in tasks) + "</tr>" + "".join(curve_rows)
             + "</table>") if curve_rows else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>onnxzip report</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}th{{background:#f3f3f3}}</style>
</head><body>
<h1>onnxzip merge report</h1>
<p>Tasks: {esc(', '.join(tasks))}. Parameters x{t.get('param_ratio')} smaller, multiply-adds x{t.get('macs_ratio')}
fewer, file x{t.get('size_ratio')} smaller than the inputs together; {t.get('shared_neurons', 0)} neurons shared.</p>
{('<ul>' + warnings + '</ul>') if warnings else ''}
{image}
<h2>Fidelity</h2>
<table><tr><th>task</th><th>measured on</th><th>relative output error</th><th>top-1 agreement</th><th>accuracy</th></tr>
{''.join(fid)}</table>
<p>Bounds are one-sided at the report's confidence; "not measured" below the minimum sample count.</p>
{plan_table}
{curve}
<h2>Layers</h2>
<table><tr><th>#</th><th>nodes</th><th>op</th><th>widths</th><th>shared</th><th>predicted error</th>
<th>parameters</th><th>multiply-adds</th><th>not shared because</th></tr>
{''.join(rows)}</table>
</body></html>
"""


def _bounded(entry: dict, key: str, sign: str) -> str:
    """'0.9912 (&ge; 0.9743)': a figure with its bound, or 'not measured'."""
    value = entry.get(key)
    if value is None:
        return "not measured" if key in entry else ""
    bound = entry.get(f"{key}_lower", entry.get(f"{key}_upper"))
    return f"{value:.4f}" + (f" ({sign} {bound:.4f})" if bound is not None else "")
