"""`onnxzip inspect`: how the models' layers align and what can be shared, without merging."""

from __future__ import annotations

import shutil
import textwrap
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


def format_table(info: dict, width: Optional[int] = None) -> str:
    """The alignment for a person at a terminal: no line wider than `width` (the terminal's, 100 when
    output goes to a pipe). One row per layer position with a column per model when that fits; else
    the models' layers stacked in one column (identical layers once, as 'a, b, c: ...'), long cells
    wrapped. `inspect --json` is the machine interface; this text may change."""
    width = max(MIN_WIDTH, width or shutil.get_terminal_size(fallback=(100, 24)).columns)
    tasks = info["tasks"]
    lines = []
    for t in tasks:
        m = info["models"][t]
        lines += _wrap(f"model {t}: {m['source']} (opset {m['opset']}, IR {m['ir_version']}), "
                       f"inputs {', '.join(m['inputs'])}, outputs {', '.join(m['outputs'])}", width)
    wide = _wide_table(info)
    lines += wide if max(map(len, wide)) <= width else _stacked_table(info, width)
    lines += _wrap(f"{info['shareable_layers']} of {len(info['layers'])} layer positions can be shared", width)
    if info["stop_reason"]:
        lines += _wrap(f"alignment stops at {info['stop_reason']}", width)
    for t, unread in info.get("unread", {}).items():
        if unread:  # one node a line: a node's description is read whole, never split by the wrap
            lines += _wrap(f"model {t}: {len(unread)} node(s) with weights onnxzip does not merge (they stay per "
                           "task):", width)
            lines += [line for node in unread[:3] for line in _wrap(node, width, "    ", "      ")]
            lines += ["    ..."] if len(unread) > 3 else []
    lines += _wrap(summary_line(info["tensorrt"]), width)
    return "\n".join(lines)


MIN_WIDTH = 40  # below this no table reads well; lines may then be wider than the terminal
GAP = "  "


def _why(row: dict) -> str:
    return "yes" if row["shareable"] else f"no: {row['why_not']}"


def _widths(row: dict, tasks) -> str:
    return "/".join(str(row["widths"].get(t, "-")) for t in tasks)


def _wide_table(info: dict) -> list[str]:
    """One row per layer position, one column per model (the layout for two small models)."""
    tasks = info["tasks"]
    table = [["#"] + [f"layer {t}" for t in tasks] + ["widths", "shareable"]]
    for r in info["layers"]:
        ops = [f"{r['op'][t]} ({r['names'][t]})" if t in r["op"] else "-" for t in tasks]
        table.append([str(r["position"])] + ops + [_widths(r, tasks), _why(r)])
    return _grid([[[cell] for cell in row] for row in table], [max(len(row[i]) for row in table)
                                                                for i in range(len(table[0]))])


def _stacked_table(info: dict, width: int) -> list[str]:
    """One row per layer position with the models' layers stacked in one column: a line with the op per
    model (or per group of models with the same op and node name), the node name under it. The wide
    table grows by a column per model: three ResNets made it 215 characters wide."""
    tasks = info["tasks"]
    table = [[["#"], ["layer"], ["widths"], ["shareable"]]]
    for r in info["layers"]:
        groups: dict[tuple, list[str]] = {}
        for t in tasks:
            groups.setdefault((r["op"].get(t, "-"), r["names"].get(t)), []).append(t)
        cell = []
        for (op, name), members in groups.items():
            cell.append(f"{', '.join(members)}: {op}")
            if name is not None:
                cell.append(f"  ({name})")
        table.append([[str(r["position"])], cell, [_widths(r, tasks)], [_why(r)]])
    natural = [max(len(line) for row in table for line in row[i]) for i in range(4)]
    # what does not fit comes out of the reason column first (it wraps on words), then the layer column
    over = sum(natural) + len(GAP) * 3 - width
    sizes = list(natural)
    for i in (3, 1):
        cut = min(max(over, 0), max(sizes[i] - 16, 0))
        sizes[i] -= cut
        over -= cut
    wrapped = [[[piece for line in cell for piece in (_wrap(line, size) if len(line) > size else [line])]
                for cell, size in zip(row, sizes)] for row in table]
    return _grid(wrapped, sizes)


def _grid(rows: list[list[list[str]]], sizes: list[int]) -> list[str]:
    """Rows of multi-line cells, each column padded to its size."""
    out = []
    for row in rows:
        for k in range(max(len(cell) for cell in row)):
            out.append(GAP.join((cell[k] if k < len(cell) else "").ljust(size)
                                for cell, size in zip(row, sizes)).rstrip())
    return out


def _wrap(text: str, width: int, first: str = "", rest: str = "    ") -> list[str]:
    """`text` in lines of at most `width` (words kept whole where they fit; '->' never split)."""
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False) or [""]
