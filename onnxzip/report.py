"""report.json: per layer what was shared and what it cost, totals, and fidelity on held-out samples."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from . import __version__, checks
from .canonicalize import Layer
from .fidelity import measure
from .runtime import make_session
from .tensorrt import readiness


def layer_macs(layer: Layer, shapes) -> int:
    """Multiply-adds of one sample through the layer."""
    return int(np.prod(layer.weight.shape[1:])) * layer.width * positions(layer, shapes)


def positions(layer: Layer, shapes) -> int:
    """Where one sample's layer output is computed: a Conv's output positions, a linear layer's rows."""
    shape = shapes.get(layer.output) or ()
    spatial = shape[2:] if layer.kind == "conv" else shape[1:-1]
    return int(np.prod([d for d in spatial if d is not None], dtype=np.int64))


def layer_params(layer: Layer) -> int:
    return int(layer.weight.size + layer.bias.size)


def build(prepared, state, emitted, records, options, seconds: float, evaluation=None) -> dict:
    al = prepared.alignment
    inits = {t.name: int(np.prod(t.dims)) for t in emitted.model.graph.initializer}
    layers, all_after = [], set()
    totals = dict(params_before=0, params_after=0, macs_before=0, macs_after=0)
    for rec in records:
        row = _layer_row(rec, al, emitted, inits, all_after)
        layers.append(row)
        for key in totals:
            totals[key] += row[key]
    totals["params_after"] = sum(inits[n] for n in all_after)  # blocks shared across layers counted once
    model_params_before = sum(_params(m) for m in prepared.originals.values())
    model_params_after = _params(emitted.model)
    bytes_before = sum(m.ByteSize() for m in prepared.originals.values())
    bytes_after = emitted.model.ByteSize()
    totals.update(
        model_params_before=model_params_before, model_params_after=model_params_after,
        param_ratio=_ratio(model_params_before, model_params_after),
        macs_ratio=_ratio(totals["macs_before"], totals["macs_after"]),
        bytes_before=bytes_before, bytes_after=bytes_after, size_ratio=_ratio(bytes_before, bytes_after),
        shared_neurons=sum(r["shared"] for r in layers))
    totals["shared_macs_fraction"] = round(checks.shared_macs_fraction({"layers": layers, "totals": totals}), 4)
    report = {
        "onnxzip": __version__,
        "tasks": prepared.tasks,
        "models": {t: {"source": al.models[t].label, "opset": al.models[t].opset,
                       "ir_version": al.models[t].ir_version, "layers": len(al.models[t].layers),
                       "outputs": [f"{t}/{o}" for o in al.models[t].outputs]} for t in prepared.tasks},
        "options": options.model_dump(),
        "alignment": {"aligned_layers": len(al.joint), "stop_reason": al.stop_reason},
        "calibration": checks.calibration_summary(prepared, records),
        "layers": layers,
        "totals": totals,
        "fidelity": measure(prepared.originals, emitted.model, prepared.holdout, prepared.tasks, options.providers,
                            confidence=options.confidence, seed=options.seed),
        "evaluation": (measure(prepared.originals, emitted.model, evaluation[0], prepared.tasks, options.providers,
                               evaluation[1], options.confidence, options.seed) if evaluation else None),
        "tensorrt": readiness(emitted.model),
        "warnings": list(prepared.warnings),
        "seconds": round(seconds, 3),
    }
    report["warnings"] += _warnings(report, al, options)
    return report


def _warnings(report: dict, al, options) -> list[str]:
    """What the reader must not miss, one line each (checks.py)."""
    lines = checks.calibration_warnings(report["calibration"], options.calibrate)
    for t in al.tasks:
        unread = al.models[t].unread
        if unread:
            lines.append(f"model {t}: {len(unread)} node(s) with weights onnxzip does not merge stay per task "
                         f"(first: {unread[0]})")
    if options.max_drop is None and options.max_rel_err is None:
        line = checks.sharing_warning(report, al, checks.asked_neurons(al, options))
        if line:
            lines.append(line)
    lines += checks.storage_warnings(report)
    lines += checks.fidelity_warnings(report, options)
    return lines


def _layer_row(rec, al, emitted, inits, all_after) -> dict:
    tasks = list(rec.layers)
    any_layer = next(iter(rec.layers.values()))
    nodes, params = {}, set()
    for t, layer in rec.layers.items():
        nodes.setdefault(emitted.layer_nodes[(t, layer.index)], (t, layer))
        params |= emitted.layer_params[(t, layer.index)]
    all_after |= params
    res = rec.result
    costs = res.costs[[u for u, o in enumerate(res.view.owners) if len(o) > 1]] if res is not None else np.zeros(0)
    return {
        "position": rec.position,
        "names": {t: l.name for t, l in rec.layers.items()},
        "kind": any_layer.kind,
        "op": any_layer.describe(),
        "widths": {t: l.width for t, l in rec.layers.items()},
        "joint": rec.joint is not None,
        "shareable": bool(rec.joint and rec.joint.shareable),
        "not_shared_because": (rec.joint.reason if rec.joint and not rec.joint.shareable
                               else None if rec.joint else "beyond the aligned layers"),
        "planned": rec.planned,
        "shared": res.shared if res is not None else 0,
        "predicted_error": float(costs.sum()),
        "predicted_error_max": float(costs.max()) if costs.size else 0.0,
        "params_before": sum(layer_params(l) for l in rec.layers.values()),
        "params_after": sum(inits[n] for n in params),
        "macs_before": sum(layer_macs(l, al.models[t].shapes) for t, l in rec.layers.items()),
        "macs_after": sum(layer_macs(l, al.models[t].shapes) for t, l in nodes.values()),
        "computed_once": len(nodes) == 1 and len(tasks) > 1,
        "hessian_rows": rec.rows[0],  # calibration rows (samples x positions) its Hessians used
        "available_rows": rec.rows[1],
    }


def run_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = make_session(model, ["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _ratio(before: float, after: float) -> Optional[float]:
    return round(before / after, 4) if after else None

