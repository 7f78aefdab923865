"""The pipeline, in order: load -> canonicalize -> channel groups + alignment -> capture + Hessians ->
pair + merge -> emit -> report. `merge()` is the Python API; the CLI and the service call it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs

from . import report as reporting
from .align import Alignment, JointLayer, align
from .canonicalize import CanonicalModel, Layer, canonicalize
from .capture import Frontier, segment_nodes
from .channels import analyze
from .emit import emit
from .errors import (AlignmentError, CancelledError, InvalidCalibrationError, InvalidModelError, InvalidOptionsError,
                     UnsupportedGraphError)
from .devicegram import DeviceMoments
from .hessian import ChannelMoments, Moments, layer_rows, output_rows
from .layerzip import TaskSide, ZipResult, task_only, zip_layer
from .tied import TiedStats
from .load import (InputSpec, check_model, default_opset, input_specs, load_calibration, load_labels,
                   load_model)
from .options import MergeOptions, parse_options
from .runtime import default_providers
from .state import ZipState

ModelSource = Union[str, onnx.ModelProto]
Progress = Callable[[str, float, str], None]  # (stage, fraction of that stage, message)


@dataclass
class Prepared:
    """Everything known before any merging: canonical models, alignment, calibration split."""

    tasks: list[str]
    alignment: Alignment
    fit: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    originals: dict[str, onnx.ModelProto]
    warnings: list[str] = field(default_factory=list)


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
    """
    options = options if isinstance(options, MergeOptions) else parse_options(options)
    progress = progress or (lambda stage, fraction, message: None)
    cancel = should_cancel or (lambda: False)
    started = time.perf_counter()
    prepared = prepare(models, calibration, options, progress)
    eval_data = _evaluation(evaluation, prepared) if evaluation is not None else None
    _check(cancel)
    reuse = Reuse(targets={} if options.curve and _targets_fit(prepared) else None)
    state, rows = zip_layers(prepared, options, progress, cancel, reuse=reuse)
    progress("emit", 0.0, "writing the merged model")
    emitted = emit(state)
    if options.target_opset and options.target_opset != default_opset(emitted.model):
        emitted.model = _to_opset(emitted.model, options.target_opset, prepared)
    _validate(emitted.model)
    progress("emit", 1.0, "merged model written")
    _check(cancel)
    progress("report", 0.0, "measuring fidelity on held-out samples")
    report = reporting.build(prepared, state, emitted, rows, options,
                             seconds=time.perf_counter() - started, evaluation=eval_data)
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


def _to_opset(model: onnx.ModelProto, target: int, prepared: Prepared) -> onnx.ModelProto:
    probe = {k: v[:8] for k, v in prepared.fit.items()}
    converted, why = _convert(model, target, probe)
    if why:
        raise InvalidOptionsError(f"target_opset {target}: the merged model cannot be converted ({why}); "
                                  "keep the inputs' opset or re-export the inputs with the opset you need")
    prepared.warnings.append(f"the merged model was converted from opset {default_opset(model)} to {target}")
    return converted


def _convert(model: onnx.ModelProto, target: int, probe: dict[str, np.ndarray]):
    """(converted model, None) or (None, why not)."""
    try:
        converted = onnx.version_converter.convert_version(model, target)
        converted.ir_version = max(model.ir_version, converted.ir_version if target > default_opset(model) else 0)
        before = reporting.run_outputs(model, probe)
        after = reporting.run_outputs(converted, probe)
    except Exception as err:  # the converter lacks adapters for some ops
        return None, " ".join(str(err).split())[:160]
    worst = max((float(np.max(np.abs(a - b))) for a, b in zip(before, after) if a.dtype.kind == "f"), default=0.0)
    if worst > 1e-4:
        return None, f"its outputs change by {worst:.2g} after conversion"
    return converted, None


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
    return inputs, load_labels(str(path), prepared.tasks, len(next(iter(inputs.values()))))


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
        import io
        buffer = io.BytesIO()
        np.savez(buffer, **calibration)
        import tempfile, os
        with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
            f.write(buffer.getvalue())
        try:
            return load_calibration(f.name, specs)
        finally:
            os.unlink(f.name)
    return load_calibration(str(calibration), specs)


def split(data: dict[str, np.ndarray], holdout: float, seed: int):
    """Random held-out part of the calibration samples, used only for the report's fidelity."""
    n = len(next(iter(data.values())))
    n_hold = int(round(n * holdout))
    if n - n_hold < 2:
        raise InvalidCalibrationError(f"only {n} calibration samples: give at least a few hundred")
    order = np.random.default_rng(seed).permutation(n)
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    return {k: v[fit] for k, v in data.items()}, {k: v[hold] for k, v in data.items()}


def _check(cancel) -> None:
    if cancel():
        raise CancelledError("the merge was cancelled")


def _validate(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # a bug in onnxzip, never the user's fault: say so plainly
        raise RuntimeError(f"onnxzip wrote a model that fails onnx.checker: {err}") from err


# --- the trade-off curve -------------------------------------------------------------------------

CURVE_SHARES = (0.25, 0.5, 0.75, 1.0)
_TARGET_CACHE_BYTES = 2 << 30


def _targets_fit(prepared: Prepared) -> bool:
    """Can every layer's original pre-activations stay in memory across the curve's runs?"""
    n = len(next(iter(prepared.fit.values())))
    total = sum(4 * n * int(np.prod([d for d in m.shapes.get(l.output, ())[1:] if d], dtype=np.int64))
                for m in prepared.alignment.models.values() for l in m.layers)
    return total <= _TARGET_CACHE_BYTES


def trade_off_curve(prepared: Prepared, options: MergeOptions, progress: Progress, cancel,
                    reuse: Optional["Reuse"] = None) -> list[dict]:
    """Fidelity, parameters and multiply-adds for zippering k = 0..L (the first k shareable layers
    fully shared, the MobileNet paper's Table 1) and for uniform share fractions, in one run: the
    canonical models, alignment, tied-group statistics and original activations are reused."""
    al = prepared.alignment
    reuse = reuse or Reuse(targets={} if _targets_fit(prepared) else None)
    positions = [j.position for j in al.shareable_layers()]
    settings = [(f"k={k}", {"zipper": positions[k - 1] if k else 0}) for k in range(len(positions) + 1)]
    settings += [(f"share={s:g}", {"share": s, "zipper": None}) for s in CURVE_SHARES]
    points = []
    for i, (label, change) in enumerate(settings):
        _check(cancel)
        progress("curve", i / len(settings), f"trade-off point {label}")
        point_options = options.model_copy(update={**change, "layer_share": {}, "epsilon": None, "curve": False})
        state, records = zip_layers(prepared, point_options, lambda *a: None, cancel,
                                    plan_shares(al, point_options), reuse)
        emitted = emit(state)
        summary = reporting.build(prepared, state, emitted, records, point_options, seconds=0.0)
        points.append({"label": label, "setting": change,
                       "shared": [r["shared"] for r in summary["layers"]],
                       **{k: summary["totals"][k] for k in ("param_ratio", "macs_ratio", "size_ratio")},
                       "fidelity": {t: {k: v for k, v in f.items() if k in ("rel_err", "top1_agreement")}
                                    for t, f in summary["fidelity"].items()}})
    progress("curve", 1.0, "trade-off curve done")
    return points


# --- the zip loop ---------------------------------------------------------------------------------

def plan_shares(al: Alignment, options: MergeOptions) -> dict[int, int]:
    """Neurons to share at each shareable joint layer position (1-based)."""
    first = al.tasks[0]
    valid = {str(j.position) for j in al.joint} | {j.layers[first].name for j in al.joint}
    unknown = [k for k in options.layer_share if k not in valid]
    if unknown:
        raise InvalidOptionsError(
            f"layer_share names layer(s) {unknown} that do not exist; use positions 1..{len(al.joint)} or "
            f"model {first}'s node names, as `onnxzip inspect` prints them")
    plan = {}
    for j in al.joint:
        width = min(l.width for l in j.layers.values())
        if not j.shareable:
            plan[j.position] = 0
            continue
        override = options.layer_share.get(str(j.position), options.layer_share.get(j.layers[first].name))
        if options.zipper is not None:
            k = width if j.position <= options.zipper else 0
        elif isinstance(override, int) and not isinstance(override, bool):
            k = min(override, width)
        elif override is not None:
            k = int(round(float(override) * width))
        else:
            k = int(round(options.share * width))
        plan[j.position] = k
    return plan


@dataclass
class StepRecord:
    position: int
    layers: dict[str, Layer]
    joint: Optional[JointLayer]
    result: Optional[ZipResult]
    planned: int


def task_weights(tasks: list[str], options: MergeOptions) -> dict[str, float]:
    """Each task's share of the layer error: alpha / 1 - alpha for two tasks, equal for more."""
    if len(tasks) == 2:
        return {tasks[0]: options.alpha, tasks[1]: 1.0 - options.alpha}
    return {t: 1.0 / len(tasks) for t in tasks}


@dataclass
class Reuse:
    """What does not depend on the sharing plan, kept across the runs of a trade-off curve."""

    tied: Optional[TiedStats] = None
    targets: Optional[dict] = None  # (task, tensor) -> original pre-activations, when they fit in memory


def zip_layers(prepared: Prepared, options: MergeOptions, progress: Progress, cancel,
               plan: Optional[dict[int, int]] = None, reuse: Optional[Reuse] = None):
    """Process every layer position in order: capture, then pair + merge (shared) or refit (own)."""
    reuse = reuse or Reuse()
    al = prepared.alignment
    tasks = prepared.tasks
    providers = options.providers or default_providers()
    plan = plan if plan is not None else plan_shares(al, options)
    shareable = len(al.shareable_layers())
    if options.zipper is not None and options.zipper > shareable:
        prepared.warnings.append(f"zipper={options.zipper} asked for more layers than the {shareable} that can "
                                 "be shared; all of them were shared")
    rng = np.random.default_rng(options.seed)
    state = ZipState(al)
    progress("merge", 0.0, "pairing channels tied across layers (residuals)")
    if reuse.tied is None:
        reuse.tied = TiedStats(al, prepared.fit, options, providers)
    fixed_views = reuse.tied.views(plan, options, rng)
    original = {t: Frontier(al.models[t], prepared.fit, providers, options.batch_size) for t in tasks}
    merged = {t: Frontier(al.models[t], prepared.fit, providers, options.batch_size) for t in tasks}
    weights = task_weights(tasks, options)
    depth = max(len(al.models[t].layers) for t in tasks)
    joint_at = {j.position - 1: j for j in al.joint}
    records = []
    for pos in range(depth):
        _check(cancel)
        layers = {t: al.models[t].layers[pos] for t in tasks if pos < len(al.models[t].layers)}
        joint = joint_at.get(pos)
        k = plan.get(pos + 1, 0)
        progress("merge", pos / depth, f"layer {pos + 1}/{depth}: capturing activations")
        sides: list[TaskSide] = []
        for t, layer in layers.items():
            sides.append(_capture(state, original[t], merged[t], t, layer, options, weights[t], sides,
                                  reuse.targets))
        result = None
        group = al.joint_group(tasks[0], al.channels[tasks[0]].layer_out[layers[tasks[0]].index]) if joint else None
        if joint is not None and joint.shareable and (k > 0 or group in fixed_views):
            progress("merge", (pos + 0.5) / depth, f"layer {pos + 1}/{depth}: pairing and merging")
            result = zip_layer(sides, k, options, tasks, rng, view=fixed_views.get(group))
            state.views[group] = result.view
            for side in sides:
                state.weights[(side.task, side.layer.index)] = result.weights[side.task]
                if _changed(result.view, side, options):
                    state.modified[side.task].add(side.layer.index)
        else:
            for side in sides:
                order = state.out_order(side.task, side.layer)
                state.weights[(side.task, side.layer.index)] = task_only(side, order, options)
                if options.calibrate and not side.exact:
                    state.modified[side.task].add(side.layer.index)
        for t, layer in layers.items():
            merged[t].compute([layer.output], lambda nodes, t=t: state.substitutions(t, nodes))
            _share_identical(merged, layers, t, layer.output)
            remaining = al.models[t].layers[pos + 1:]
            merged[t].retain([l.input for l in remaining])
            original[t].retain([l.output for l in remaining] if options.calibrate else [])
        records.append(StepRecord(pos + 1, layers, joint, result, k))
        progress("merge", (pos + 1) / depth, f"layer {pos + 1}/{depth} done")
    return state, records


def _share_identical(merged: dict[str, Frontier], layers: dict[str, Layer], task: str, name: str) -> None:
    """In a shared trunk every task computes the very same tensor: keep one copy in memory."""
    mine = merged[task].store[name]
    for other, layer in layers.items():
        if other == task:
            break
        theirs = merged[other].store.get(layer.output)
        if theirs is not None and theirs.shape == mine.shape and np.array_equal(theirs, mine):
            merged[task].store[name] = theirs
            return


def _changed(view, side: TaskSide, options: MergeOptions) -> bool:
    """Did this task's layer change function (not just channel order)?"""
    to_union = view.to_union[side.task]
    return any(len(view.owners[u]) > 1 for u in to_union) or (options.calibrate and not side.exact)


@dataclass
class FlatRange:
    """The flat parts of the activation after a layer: below `lo` (ReLU, Clip) and above `hi` (Clip)."""

    lo: np.ndarray  # per channel, already moved `margin` spreads past the activation's edge
    hi: np.ndarray

    def targets(self, y: np.ndarray, response: np.ndarray) -> np.ndarray:
        """Where the original pre-activation lies deep in a flat range, ask only that the fit lands
        there too: the original neuron's own response to the merged inputs if it already does, else
        the range's edge. Nothing changes where the inputs are exact (the response equals y)."""
        y = np.where(y < self.lo, np.minimum(response, self.lo), y)
        return np.where(y > self.hi, np.maximum(response, self.hi), y)


def flat_range(model: CanonicalModel, layer: Layer, y: np.ndarray, margin: float) -> Optional[FlatRange]:
    """The ReLU/Clip (ReLU6) right after `layer`, if any, with per-channel margins."""
    tensor = model.graph.tensors()[layer.output]
    if len(tensor.outputs) != 1 or tensor.outputs[0].op not in ("Relu", "Clip"):
        return None
    act = tensor.outputs[0]
    lo, hi = 0.0, np.inf
    if act.op == "Clip":
        bounds = [t.values if isinstance(t, gs.Constant) and t.name else None for t in act.inputs[1:3]]
        bounds += [None] * (2 - len(bounds))
        lo = float(bounds[0]) if bounds[0] is not None else float(act.attrs.get("min", -np.inf))
        hi = float(bounds[1]) if bounds[1] is not None else float(act.attrs.get("max", np.inf))
    spread = _channel_std(y)
    return FlatRange(lo - margin * spread, hi + margin * spread)


def _channel_std(y: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Per-channel standard deviation over samples and positions, a few samples at a time (no
    full-size temporaries for big activations)."""
    total = np.zeros(y.shape[1])
    squares = np.zeros(y.shape[1])
    axes = tuple(i for i in range(y.ndim) if i != 1)
    for start in range(0, len(y), chunk):
        part = y[start:start + chunk].astype(np.float64)
        total += part.sum(axis=axes)
        squares += np.square(part).sum(axis=axes)
    count = y.size / y.shape[1]
    return np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0.0))


def _residual_target(state: ZipState, original: Frontier, merged: Frontier, task: str, layer: Layer,
                     y: np.ndarray) -> np.ndarray:
    """A layer that feeds a residual Add is fit to the ORIGINAL sum minus what the merged model
    already adds there, so it also corrects the error arriving through the shortcut. Applies when
    the other addends are already known in the merged model (no unprocessed layer on their path)."""
    model = state.al.models[task]
    tensor = model.graph.tensors()[layer.output]
    if len(tensor.outputs) != 1 or tensor.outputs[0].op not in ("Add", "Sum"):
        return y
    add = tensor.outputs[0]
    others = [t.name for t in add.inputs if t.name != layer.output]
    if not others or any(model.shapes.get(o) != model.shapes.get(layer.output) for o in others):
        return y
    layer_nodes = {id(l.node) for l in model.layers}
    if any(id(n) in layer_nodes for n in segment_nodes(model.graph, set(merged.store), others)):
        return y
    (total,) = original.compute([add.outputs[0].name], lambda nodes: {})
    added = merged.compute(others, lambda nodes: state.substitutions(task, nodes))
    order = state.out_order(task, layer)  # view position -> original channel
    target = total.astype(y.dtype, copy=True)
    for part in added:
        target[:, order] -= part  # merged tensors are in view order
    return target


def _capture(state: ZipState, original: Frontier, merged: Frontier, task: str, layer: Layer,
             options: MergeOptions, weight: float, others, targets: Optional[dict] = None) -> TaskSide:
    """Moments of the layer's inputs in the merged model (and cross moments with its original
    pre-activations), streamed batch by batch."""
    # The original pre-activations are only needed as targets when calibrating.
    y = None
    if options.calibrate:
        key = (task, layer.output)
        if targets is not None and key in targets:
            y = targets[key]
        else:
            (y,) = original.compute([layer.output], lambda nodes: {})
            if targets is not None:
                targets[key] = y
    (x,) = merged.compute([layer.input], lambda nodes: state.substitutions(task, nodes))
    if y is not None and options.calibrate:
        y = _residual_target(state, original, merged, task, layer, y)
    flat = (flat_range(state.al.models[task], layer, y, options.activation_margin)
            if y is not None and options.activation_margin is not None else None)
    imap = state.in_map(task, layer)
    if layer.depthwise:
        # output channel c reads input channel c: both in view order, targets too
        order = state.out_order(task, layer)
        moments = ChannelMoments(layer.width, int(np.prod(layer.kernel)), options.calibrate)
        w, b = layer.weight[order], layer.bias[order]
        y = y[:, order] if y is not None else None
    else:
        dim = int(np.prod(layer.weight.shape[1:]))
        # In a shared trunk every task's layer sees the very same inputs: accumulate their Gram once.
        twin = next((o for o in others if not o.layer.depthwise
                     and o.layer.weight.shape[1:] == layer.weight.shape[1:]
                     and o.layer.node.attrs == layer.node.attrs and o.inputs is not None
                     and o.inputs.shape == x.shape and np.array_equal(o.inputs, x)), None)
        w, b = layer.weight, layer.bias
        if imap is not None:
            w = w[:, imap.perm]
        shared_gram = twin.moments.gram if twin is not None else None
        if twin is not None:  # one copy of the trunk's tensor in memory, not one per task
            merged.store[layer.input] = x = twin.inputs
        if _device_hessians(options, merged.providers):
            moments = DeviceMoments(layer, options.calibrate, merged.providers, shared_gram,
                                    (w, b, flat.lo, flat.hi) if flat is not None else None)
            for start in range(0, len(x), options.batch_size):
                part = slice(start, start + options.batch_size)
                moments.update_batch(x[part], y[part] if options.calibrate else None)
            return TaskSide(task, layer, moments, weight, imap, w, b, state.input_exact(task, layer), x)
        moments = Moments(dim, layer.width if options.calibrate else None, gram=shared_gram)
    for start in range(0, len(x), options.batch_size):
        part = slice(start, start + options.batch_size)
        rows = layer_rows(layer, x[part])
        y_rows = output_rows(layer, y[part]) if options.calibrate else None
        if flat is not None:
            lo_hi = (flat.lo[order], flat.hi[order]) if layer.depthwise else (flat.lo, flat.hi)
            y_rows = FlatRange(*lo_hi).targets(y_rows, _response(layer, rows, w, b))
        moments.update(rows, y_rows)
    return TaskSide(task, layer, moments, weight, imap, w, b, state.input_exact(task, layer), x)


def _device_hessians(options: MergeOptions, providers) -> bool:
    if options.device_hessians is not None:
        return options.device_hessians
    return "CUDAExecutionProvider" in providers


def _response(layer: Layer, rows: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The original neurons (weights `w` with input columns in view order) on these input rows."""
    if layer.depthwise:
        per_channel = rows.reshape(len(rows), len(w), -1)
        return np.einsum("rck,ck->rc", per_channel, w.reshape(len(w), -1)) + b
    return rows @ w.reshape(len(w), -1).T + b
