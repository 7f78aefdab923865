"""The pipeline, in order: load -> canonicalize -> channel groups + alignment -> capture + Hessians ->
pair + merge -> emit -> report. `merge()` is the Python API; the CLI and the service call it."""

from __future__ import annotations

import tempfile
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import onnx

from . import checks, planner
from . import report as reporting
from .align import align
from .canonicalize import CanonicalModel, canonicalize
from .channels import analyze
from .curve import trade_off_curve
from .distill import distill, require_torch
from .emit import emit
from .fidelity import measure
from .errors import AlignmentError, FidelityNotMetError, InvalidCalibrationError, InvalidOptionsError
from .load import (InputSpec, check_calibration_arrays, check_model, default_opset, input_specs, load_calibration, load_labels,
                   load_model)
from .options import MergeOptions, parse_options
from .opsets import check_target, harmonize_opsets, to_opset
from .zip_loop import Prepared, Progress, Reuse, check_cancel, zip_layers

ModelSource = Union[str, onnx.ModelProto]


def merge(models: Sequence[ModelSource], calibration: Union[str, dict], options=None, *,
          evaluation: Optional[str] = None,
          progress: Optional[Progress] = None,
          should_cancel: Optional[Callable[[], bool]] = None) -> tuple[onnx.ModelProto, dict]:
    """Merge `models` (paths or ModelProtos, in task order) into one multi-output ONNX model.

    Args:
        calibration: an .npz path or a dict of arrays, one per graph input (samples on axis 0).
        options: MergeOptions or a dict of its fields (see `onnxzip merge --help`).
        evaluation: optional .npz with the same inputs plus labels 'y<task>'; the report then also
            measures fidelity and accuracy on it.
        progress: called as progress(stage, fraction, message) as work advances.
        should_cancel: polled between stages; returning True stops with CancelledError.
    Returns:
        (merged ModelProto, report dict).
    Raises:
        FidelityNotMetError: a gate (require_agreement, require_rel_err, require_shared) failed; its
            `report` says by how much.
    """
    options = options if isinstance(options, MergeOptions) else parse_options(options)
    if options.distill:
        require_torch()
    progress = progress or (lambda stage, fraction, message: None)
    cancel = should_cancel or (lambda: False)
    started = time.perf_counter()
    prepared = prepare(models, calibration, options, progress)
    eval_data = _evaluation(evaluation, prepared) if evaluation is not None else None
    check_cancel(cancel)
    with tempfile.TemporaryDirectory(prefix="onnxzip-") as spill_dir:
        model, report = _merge_prepared(prepared, options, progress, cancel, started, eval_data, spill_dir)
    failure = checks.gate_failure(report, options)
    if failure:
        raise FidelityNotMetError(failure, report)
    return model, report


def _merge_prepared(prepared: Prepared, options: MergeOptions, progress: Progress, cancel, started: float,
                    eval_data, spill_dir: str) -> tuple[onnx.ModelProto, dict]:
    reuse = Reuse(spill_dir=spill_dir, spill_bytes=options.spill_mb * 2**20)
    plan = None
    if planner.has_budget(options):
        state, rows, emitted, plan = planner.plan_within_budget(prepared, options, progress, cancel, reuse)
    else:
        state, rows = zip_layers(prepared, options, progress, cancel, reuse=reuse)
        progress("emit", 0.0, "writing the merged model")
        emitted = emit(state)
    distilled = None
    if options.distill:
        progress("distill", 0.0, "training the merged weights toward the originals")
        state, distilled = distill(prepared, state, emitted, options, progress, cancel)
        if distilled["kept"] == "distilled":
            emitted = emit(state)
        progress("distill", 1.0, f"distillation: kept the {distilled['kept']} weights")
    if options.target_opset and options.target_opset != default_opset(emitted.model):
        emitted.model = to_opset(emitted.model, options.target_opset, {k: v[:8] for k, v in prepared.fit.items()},
                                 prepared.warnings)
    _validate(emitted.model)
    if not prepared.holdout:  # nothing measures the outputs below: check on a few fit samples that they are finite
        measure(prepared.originals, emitted.model, {k: v[:64] for k, v in prepared.fit.items()}, prepared.tasks,
                options.providers)
    progress("emit", 1.0, "merged model written")
    check_cancel(cancel)
    progress("report", 0.0, "measuring fidelity on held-out samples")
    report = reporting.build(prepared, state, emitted, rows, options,
                             seconds=time.perf_counter() - started, evaluation=eval_data)
    if plan is not None:
        report["plan"] = plan
        report["warnings"] += plan.get("warnings", [])
    if distilled is not None:
        report["distill"] = distilled
        if "warning" in distilled:
            report["warnings"].append(distilled["warning"])
    if options.curve:
        report["curve"] = trade_off_curve(prepared, options, progress, cancel, reuse)
        report["seconds"] = round(time.perf_counter() - started, 3)
    progress("report", 1.0, "done")
    return emitted.model, report


def prepare(models: Sequence[ModelSource], calibration, options: MergeOptions,
            progress: Progress = lambda *a: None) -> Prepared:
    """Load, validate, canonicalize and align; no merging yet (what `inspect` shows)."""
    if len(models) < 2:
        raise InvalidOptionsError(f"give at least two models to merge, got {len(models)}")
    tasks = options.task_names(len(models))
    progress("load", 0.0, "reading models")
    originals = {t: _load(m) for t, m in zip(tasks, models)}
    if options.target_opset:
        check_target(originals, options.target_opset)
    specs = input_specs_of(originals)
    warnings: list[str] = []
    if calibration is not None:
        progress("load", 0.5, "reading calibration data")
        fit, holdout = split(_calibration(calibration, specs), options.holdout, options.seed)
        probe = {k: v[:2] for k, v in fit.items()}
    else:  # inspect without data: random samples of the declared shapes are enough to read shapes
        fit, holdout, probe = {}, {}, _synthetic_probe(specs)
    models_to_merge = harmonize_opsets(originals, probe, warnings)
    canon: dict[str, CanonicalModel] = {}
    for i, t in enumerate(tasks):
        progress("canonicalize", i / len(tasks), f"canonicalizing model {t}")
        canon[t] = canonicalize(models_to_merge[t], _label(models[i], t), probe)
    channels = {t: analyze(canon[t]) for t in tasks}
    alignment = align(tasks, canon, channels)
    progress("canonicalize", 1.0, "models aligned")
    return Prepared(tasks, alignment, fit, holdout, originals, warnings)




def _synthetic_probe(specs: list[InputSpec]) -> dict[str, np.ndarray]:
    probe = {}
    for spec in specs:
        if None in spec.shape[1:]:
            raise InvalidCalibrationError(
                f"input '{spec.name}' has dynamic dimensions {spec.shape}: pass --calibration so onnxzip "
                "can see real shapes")
        shape = (2,) + tuple(spec.shape[1:])
        probe[spec.name] = (np.random.default_rng(0).random(shape) if spec.dtype.kind == "f"
                            else np.zeros(shape)).astype(spec.dtype)
    return probe


def _evaluation(path: str, prepared: Prepared):
    inputs = load_calibration(str(path), input_specs_of(prepared.originals), kind="evaluation")
    labels, warnings = load_labels(str(path), prepared.tasks, len(next(iter(inputs.values()))), list(inputs))
    prepared.warnings.extend(warnings)
    return inputs, labels


def _label(source: ModelSource, task: str) -> str:
    return source if isinstance(source, str) else f"model {task}"


def _load(source: ModelSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        check_model(source, source.graph.name or "model")
        return source
    return load_model(str(source))


def input_specs_of(originals: dict[str, onnx.ModelProto]) -> list[InputSpec]:
    """The graph inputs of all models; an input name shared by models must mean the same input."""
    specs: dict[str, tuple[str, InputSpec]] = {}
    for task, model in originals.items():
        for spec in input_specs(model):
            if spec.name not in specs:
                specs[spec.name] = (task, spec)
                continue
            first, other = specs[spec.name]
            if len(other.shape) != len(spec.shape) or other.dtype != spec.dtype or any(
                    a is not None and b is not None and a != b for a, b in zip(other.shape[1:], spec.shape[1:])):
                raise AlignmentError(
                    f"the models cannot be aligned: input '{spec.name}' is {_shape(other)} {other.dtype} in model "
                    f"{first} but {_shape(spec)} {spec.dtype} in model {task}; onnxzip merges models that read "
                    "the same kind of input")
    return [spec for _, spec in specs.values()]


def _shape(spec: InputSpec) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in spec.shape) + ")"


def _calibration(calibration, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if isinstance(calibration, dict):
        return check_calibration_arrays(calibration, specs)
    return load_calibration(str(calibration), specs)


def split(data: dict[str, np.ndarray], holdout: float, seed: int):
    """Random held-out part of the calibration samples, used only for the report's fidelity."""
    n = len(next(iter(data.values())))
    n_hold = int(round(n * holdout))
    if n - n_hold < checks.MIN_FIT_SAMPLES:
        raise InvalidCalibrationError(
            f"only {n} calibration samples, {n - n_hold} of them to fit the merge (holdout {holdout:g}): onnxzip needs "
            f"at least {checks.MIN_FIT_SAMPLES} to fit; give a few hundred unlabelled samples "
            f"({checks.RECOMMENDED_FIT_SAMPLES} or more to fit, and {checks.MIN_SAMPLES} held out to measure)")
    order = np.random.default_rng(seed).permutation(n)
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    return {k: v[fit] for k, v in data.items()}, {k: v[hold] for k, v in data.items()}




def _validate(model: onnx.ModelProto) -> None:
    checks.check_finite_weights(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # a bug in onnxzip, never the user's fault: say so plainly
        raise RuntimeError(f"onnxzip wrote a model that fails onnx.checker: {err}") from err

