"""`onnxzip inspect`: how the models' layers align and what can be shared, without merging."""

from __future__ import annotations

from typing import Optional, Sequence

from .options import MergeOptions
from .tensorrt import readiness, summary_line
from .zipper import prepare


def inspect_models(models: Sequence[str], calibration: Optional[str] = None,
                   options: Optional[MergeOptions] = None) -> dict:
    prepared = prepare(models, calibration, options or MergeOptions())
    al = prepared.alignment
    tasks = prepared.tasks
    rows = []
    joint = {j.position: j for j in al.joint}
    depth = max(len(al.models[t].layers) for t in tasks)
    for pos in range(1, depth + 1):
        layers = {t: al.models[t].layers[pos - 1] for t in tasks if pos <= len(al.models[t].layers)}
        j = joint.get(pos)
        rows.append({
            "position": pos,
            "op": {t: l.describe() for t, l in layers.items()},
            "names": {t: l.name for t, l in layers.items()},
            "widths": {t: l.width for t, l in layers.items()},
            "shareable": bool(j and j.shareable),
            "why_not": (j.reason if j and not j.shareable else None if j else "beyond the aligned layers"),
        })
    return {
        "tasks": tasks,
        "models": {t: {"source": al.models[t].label, "opset": al.models[t].opset,
                       "ir_version": al.models[t].ir_version, "inputs": [i.name for i in al.models[t].inputs],
                       "outputs": al.models[t].outputs} for t in tasks},
        "layers": rows,
        "aligned_layers": len(al.joint),
        "shareable_layers": sum(1 for r in rows if r["shareable"]),
        "stop_reason": al.stop_reason,
        "unread": {t: al.models[t].unread for t in tasks},  # nodes with weights that stay per task
        # the merged model keeps the inputs' opset and ops (adding only Concat and Identity)
        "tensorrt": readiness(_as_merged(prepared)),
    }


def _as_merged(prepared):
    """A stand-in with the merged model's opset and ops, to judge TensorRT readiness early."""
    import onnx

    models = list(prepared.alignment.models.values())
    graph = onnx.helper.make_graph([onnx.helper.make_node(n.op, [], [], domain=getattr(n, "domain", "") or "")
                                    for m in models for n in m.graph.nodes], "stand-in", [], [])
    return onnx.helper.make_model(graph, opset_imports=[o for m in models[:1] for o in m.opset_imports])


def format_table(info: dict) -> str:
    tasks = info["tasks"]
    lines = []
    for t in tasks:
        m = info["models"][t]
        lines.append(f"model {t}: {m['source']} (opset {m['opset']}, IR {m['ir_version']}), "
                     f"inputs {', '.join(m['inputs'])}, outputs {', '.join(m['outputs'])}")
    header = ["#"] + [f"layer {t}" for t in tasks] + ["widths", "shareable"]
    table = [header]
    for r in info["layers"]:
        widths = "/".join(str(r["widths"].get(t, "-")) for t in tasks)
        ops = [f"{r['op'][t]} ({r['names'][t]})" if t in r["op"] else "-" for t in tasks]
        table.append([str(r["position"])] + ops + [widths, "yes" if r["shareable"] else f"no: {r['why_not']}"])
    sizes = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(size) for cell, size in zip(row, sizes)).rstrip())
    lines.append(f"{info['shareable_layers']} of {len(info['layers'])} layer positions can be shared")
    if info["stop_reason"]:
        lines.append(f"alignment stops at {info['stop_reason']}")
    for t, unread in info.get("unread", {}).items():
        if unread:
            lines.append(f"model {t}: {len(unread)} node(s) with weights onnxzip does not merge (they stay per task): "
                         + ", ".join(unread[:3]) + (", ..." if len(unread) > 3 else ""))
    lines.append(summary_line(info["tensorrt"]))
    return "\n".join(lines)
