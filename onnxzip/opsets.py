"""One merged graph has one opset: bring the models' opsets together, or the merged model to a target
opset, with onnx's version converter, checking that every converted model computes the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter

from .downgrade import downgrade, lowest_opset
from .errors import InvalidModelError, InvalidOptionsError
from .load import default_opset
from .report import run_outputs


def harmonize_opsets(originals: dict[str, onnx.ModelProto], probe: dict[str, np.ndarray],
                     warnings: list[str]) -> dict[str, onnx.ModelProto]:
    """One merged graph has one opset. Convert newer models down to the oldest opset (TensorRT reads
    older ones); where onnx's converter cannot, convert the older models up instead. Every converted
    model is checked to compute the same outputs."""
    opsets = {t: default_opset(m) for t, m in originals.items()}
    if len(set(opsets.values())) == 1:
        return dict(originals)
    failures = []
    for target in (min(opsets.values()), max(opsets.values())):
        converted, problems = {}, []
        for t, model in originals.items():
            if opsets[t] == target:
                converted[t] = model
                continue
            result, why = _convert(model, target, probe)
            if why:
                problems.append(f"model {t} to opset {target}: {why}")
            converted[t] = result
        if not problems:
            for t in originals:
                if opsets[t] != target:
                    warnings.append(f"model {t} was converted from opset {opsets[t]} to opset {target} "
                                    "to match the others")
            return converted
        failures += problems
    raise InvalidModelError(
        f"the models use different opsets ({', '.join(f'{k}: {v}' for k, v in opsets.items())}) and "
        f"onnx's converter cannot bring them together ({'; '.join(failures)}); export both with the same opset")


def to_opset(model: onnx.ModelProto, target: int, probe: dict[str, np.ndarray],
             warnings: list[str]) -> onnx.ModelProto:
    """The merged model in opset `target`, or InvalidOptionsError saying why it cannot be."""
    converted, why = _convert(model, target, probe)
    if why:
        raise InvalidOptionsError(f"target_opset {target}: the merged model cannot be converted ({why}); "
                                  "keep the inputs' opset or re-export the inputs with the opset you need")
    warnings.append(f"the merged model was converted from opset {default_opset(model)} to {target}")
    return converted


def _convert(model: onnx.ModelProto, target: int, probe: dict[str, np.ndarray]):
    """(converted model, None) or (None, why not). Down: onnxzip's own rewrite (downgrade.py), then onnx's
    version converter if that fails; up: onnx's converter. Either way checked in onnxruntime."""
    attempts = [_ours, _onnx_converter] if target < default_opset(model) else [_onnx_converter]
    reasons = []
    for attempt in attempts:
        try:
            converted = attempt(model, target)
            before = run_outputs(model, probe)
            after = run_outputs(converted, probe)
        except Exception as err:  # an op neither path can convert, or a graph onnxruntime refuses
            reasons.append(" ".join(str(err).split())[:160])
            continue
        worst = max((_rel_err(a, b) for a, b in zip(before, after) if a.dtype.kind == "f"), default=0.0)
        if worst <= 1e-5:
            return converted, None
        reasons.append(f"its outputs change by {worst:.2g} (relative) after conversion")
    return None, "; ".join(reasons)


def _ours(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    return downgrade(model, target)


def _onnx_converter(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    converted = onnx.version_converter.convert_version(model, target)
    converted.ir_version = max(model.ir_version, converted.ir_version if target > default_opset(model) else 0)
    return converted


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(a.astype(np.float64)), 1e-12))


def check_target(models: dict[str, onnx.ModelProto], target: int) -> None:
    """Refuse, before merging, a target opset no model can be written in (naming the lowest one)."""
    for t, model in models.items():
        if target < default_opset(model):
            lowest = lowest_opset(model)
            if target < lowest:
                raise InvalidOptionsError(
                    f"target_opset {target}: model {t} uses ops that need opset {lowest} or newer; the lowest "
                    f"opset the merged model can be written in is {lowest}")
