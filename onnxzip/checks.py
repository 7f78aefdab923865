"""What a pipeline must know before it ships a merged model, each said in one line: enough calibration
data, a merge that shares much less than asked, graph parts onnxzip does not read, non-finite weights,
and the gates (require_agreement, require_rel_err, require_shared) that turn a miss into a failure.

A pipeline ships whatever succeeds, so none of these may stay silent: each line goes into the report's
`warnings` (and from there to the CLI and the REST job), and a failed gate stops the merge.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import NonFiniteError
from .fidelity import MIN_SAMPLES

# Below this many fit samples nothing onnxzip reports means much: refused (see zipper.split).
MIN_FIT_SAMPLES = 8
# Below this many fit samples the recovery loses measurably more (docs/calibration.md): a warning.
RECOMMENDED_FIT_SAMPLES = 128


def check_finite_weights(model: onnx.ModelProto) -> None:
    """Refuse to hand out a model with NaN or infinite constants."""
    bad, first = 0, None
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        count = int(np.count_nonzero(~np.isfinite(numpy_helper.to_array(tensor))))
        if count:
            bad += count
            first = first or tensor.name
    if bad:
        raise NonFiniteError(
            f"the merged model holds {bad} NaN or infinite weights (first in '{first}'); nothing was written. "
            "Check that the calibration data has the scale the models were trained on and that no option is "
            "extreme; if both are ordinary, this is a bug in onnxzip: please report it with the command")


def calibration_summary(prepared, records) -> dict:
    """How much calibration data the fit and the measurement had, against what the layers need."""
    fit, held = _n(prepared.fit), _n(prepared.holdout)
    widest, starved = None, []
    for rec in records:
        layer = next(iter(rec.layers.values()))
        unknowns = int(np.prod(layer.weight.shape[1:])) + 1
        rows = rec.rows[1]  # calibration rows the layer has (samples x positions)
        if widest is None or unknowns > widest["unknowns"]:
            widest = {"position": rec.position, "op": layer.describe(), "unknowns": unknowns, "rows": rows}
        if rows < unknowns:
            starved.append({"position": rec.position, "op": layer.describe(), "unknowns": unknowns, "rows": rows})
    return {"fit_samples": fit, "holdout_samples": held, "min_fit_samples": MIN_FIT_SAMPLES,
            "recommended_fit_samples": RECOMMENDED_FIT_SAMPLES, "min_holdout_samples": MIN_SAMPLES,
            "widest_layer": widest, "underdetermined_layers": starved}


def calibration_warnings(summary: dict, calibrate: bool) -> list[str]:
    warnings = []
    fit, held = summary["fit_samples"], summary["holdout_samples"]
    if fit < RECOMMENDED_FIT_SAMPLES:
        warnings.append(
            f"only {fit} calibration samples fit the merge (recommended: {RECOMMENDED_FIT_SAMPLES} or more): "
            "expect a larger accuracy loss than with a few hundred; give more unlabelled samples")
    if held < MIN_SAMPLES:
        warnings.append(
            f"fidelity not measured: only {held} held-out calibration samples (need {MIN_SAMPLES} or more); "
            "give more calibration samples or raise holdout")
    starved = summary["underdetermined_layers"]
    if starved and calibrate:
        first = starved[0]
        warnings.append(
            f"{len(starved)} layer(s) have fewer calibration rows than unknowns per neuron (first: layer "
            f"{first['position']}, {first['op']}: {first['rows']} rows, {first['unknowns']} unknowns): their "
            "recovery leans on MTZ's weights; more samples help there")
    return warnings


def asked_neurons(alignment, options) -> int:
    """Neurons the options ask to share at the hidden layers of the models' common depth (output
    layers are never shared), whether or not onnxzip could align and share them."""
    from .zip_loop import asked_share

    tasks = alignment.tasks
    asked = 0
    for pos in range(min(len(alignment.models[t].layers) for t in tasks)):
        layers = {t: alignment.models[t].layers[pos] for t in tasks}
        if any(_is_output_layer(alignment, t, layer) for t, layer in layers.items()):
            continue
        asked += asked_share(options, pos + 1, layers)
    return asked


def _is_output_layer(alignment, task: str, layer) -> bool:
    channels = alignment.channels[task]
    return (channels.frozen_reason(channels.layer_out[layer.index]) or "").startswith("graph output")


def sharing_warning(report: dict, alignment, asked: int) -> Optional[str]:
    """One line when the merge shares nothing or less than half of what was asked, naming why."""
    shared = report["totals"]["shared_neurons"]
    if asked == 0 or shared >= 0.5 * asked:
        return None
    why = first_blocker(report, alignment)
    head = "nothing was shared" if shared == 0 else f"only {shared} of the {asked} neurons asked for were shared"
    return f"{head}: {why}"


def first_blocker(report: dict, alignment) -> str:
    for row in report["layers"]:
        reason = row["not_shared_because"]
        if reason and not reason.startswith("its output reaches graph output") and reason != "beyond the aligned layers":
            return f"layer {row['position']} ({next(iter(row['names'].values()))}) cannot be shared: {reason}"
    if alignment.stop_reason:
        return f"the models' layers stop matching at {alignment.stop_reason}"
    return "no hidden layer of the models can be shared"


# Below this held-out top-1 agreement the report suggests what can recover it.
LOW_AGREEMENT = 0.98


def fidelity_warnings(report: dict, options) -> list[str]:
    """A task that keeps little agreement with its original: say so, and what can help."""
    low = [(t, f["top1_agreement"]) for t, f in (report.get("fidelity") or {}).items()
           if f.get("top1_agreement") is not None and f["top1_agreement"] < LOW_AGREEMENT]
    if not low:
        return []
    help_ = "share fewer layers (--zipper, --max-drop)" + ("" if options.distill else
                                                         ", or --distill to train the merged weights toward the originals")
    tasks = ", ".join(f"{t} {a:.1%}" for t, a in low)
    return [f"low held-out top-1 agreement with the original ({tasks}): the networks may lack the capacity for this "
            f"much sharing; {help_}"]


def storage_warnings(report: dict) -> list[str]:
    """Partial sharing stores shared blocks once but computes nothing once: say so where it happened."""
    lines = []
    partial = [r["position"] for r in report["layers"] if r["shared"] and not r["computed_once"]]
    if partial:
        lines.append(f"{len(partial)} shared layer(s) (first: layer {partial[0]}) read task-specific inputs or keep "
                     "neurons of their own: their shared weights are stored once, but they are computed per task "
                     "(no multiply-adds saved); only fully shared leading layers (zipper) are computed once")
    totals = report["totals"]
    if totals["bytes_after"] > totals["bytes_before"]:
        lines.append(f"the merged file ({totals['bytes_after']:,} bytes) is larger than the inputs together "
                     f"({totals['bytes_before']:,})")
    return lines


def shared_macs_fraction(report: dict) -> float:
    """The fraction of the original models' multiply-adds now computed once for several tasks."""
    total = report["totals"]["macs_before"]
    once = sum(row["macs_before"] for row in report["layers"] if row["computed_once"])
    return once / total if total else 0.0


def gate_failure(report: dict, options) -> Optional[str]:
    """The first requirement the merged model misses, as one line; None when it meets them all."""
    for task, fid in (report.get("fidelity") or {}).items():
        where = f"on {fid['samples']} held-out samples"
        if options.require_agreement is not None:
            lower = fid.get("top1_agreement_lower")
            if "top1_agreement" not in fid:
                return (f"task {task}: has no class-score output, so top-1 agreement cannot be required; "
                        "use require_rel_err")
            if lower is None:
                return f"task {task}: top-1 agreement not measured {where} (need {MIN_SAMPLES}); cannot pass the gate"
            if lower < options.require_agreement:
                return (f"task {task}: top-1 agreement {fid['top1_agreement']:.4f} {where}, lower bound "
                        f"{lower:.4f} at {fid['confidence']:.0%} confidence, is below the required "
                        f"{options.require_agreement}")
        if options.require_rel_err is not None:
            upper = fid.get("rel_err_upper")
            if upper is None:
                return f"task {task}: relative error not measured {where} (need {MIN_SAMPLES}); cannot pass the gate"
            if upper > options.require_rel_err:
                return (f"task {task}: relative error {fid['rel_err']:.4f} {where}, upper bound {upper:.4f} at "
                        f"{fid['confidence']:.0%} confidence, is above the allowed {options.require_rel_err}")
    if (options.require_agreement is not None or options.require_rel_err is not None) and not report.get("fidelity"):
        return "no held-out samples to measure fidelity on (holdout is 0): the gate cannot pass"
    if options.require_shared is not None:
        fraction = report["totals"]["shared_macs_fraction"]
        if fraction < options.require_shared:
            return (f"{fraction:.1%} of the multiply-adds are computed once for several tasks, below the required "
                    f"{options.require_shared:.1%}")
    return None


def _n(data: dict) -> int:
    return len(next(iter(data.values()))) if data else 0
