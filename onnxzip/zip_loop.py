"""The zip loop: every layer position in order, captured, then paired and merged (shared) or refit
(the task's own); and what each layer is fit to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .align import Alignment, JointLayer
from .blas import small_work
from .canonicalize import CanonicalModel, Layer
from .capture import Frontier, SegmentCache, same_values, segment_nodes
from .devicegram import DeviceMoments
from .errors import CancelledError, InvalidOptionsError, NonFiniteError
from .hessian import (ChannelMoments, KroneckerMoments, Moments, RowMoments, layer_rows, output_rows,
                      position_sample, rows_per_sample)
from .layerzip import TaskSide, ZipResult, task_only, zip_layer
from .options import MergeOptions
from .overlap import overlapped
from .runtime import resolve_providers
from .state import ZipState
from .record import LayerRecord, OriginalRecord, activation_after, residual_sum
from .report import positions
from .tied import TiedStats, tied_writers
from .views import GroupView

Progress = Callable[[str, float, str], None]  # (stage, fraction of that stage, message)

# A layer with fewer calibration rows than this times its inputs keeps its rows instead of a Gram
# (low-rank Hessian, lowrank.py): cheaper in memory and in solves below 1, same math at any value.
ROWS_MODE_BELOW = 1.0
# A layer's capture makes the next batch's patches while the last one's moments accumulate, holding two
# batches of patches, unless one batch takes more than this (every row of a 224x224 stem: ~0.5 GB).
OVERLAP_BATCH_BYTES = 256 * 2**20
# The first task's patches at a layer are kept for the next task's identical inputs (a shared trunk)
# unless all of them together take more than this (or than --spill-mb); then the next task makes its own.
KEEP_PATCHES_BYTES = 256 * 2**20


@dataclass
class Prepared:
    """Everything known before any merging: canonical models, alignment, calibration split."""

    tasks: list[str]
    alignment: Alignment
    fit: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    originals: dict[str, onnx.ModelProto]
    warnings: list[str] = field(default_factory=list)


def check_cancel(cancel) -> None:
    if cancel():
        raise CancelledError("the merge was cancelled")


def plan_shares(al: Alignment, options: MergeOptions) -> dict[int, int]:
    """Neurons to share at each shareable joint layer position (1-based)."""
    first = al.tasks[0]
    valid = {str(j.position) for j in al.joint} | {j.layers[first].name for j in al.joint}
    unknown = [k for k in options.layer_share if k not in valid]
    if unknown:
        raise InvalidOptionsError(
            f"layer_share names layer(s) {unknown} that do not exist; use positions 1..{len(al.joint)} or "
            f"model {first}'s node names, as `onnxzip inspect` prints them")
    return {j.position: asked_share(options, j.position, j.layers) if j.shareable else 0 for j in al.joint}


def asked_share(options: MergeOptions, position: int, layers: dict[str, Layer]) -> int:
    """Neurons the options ask to share at this position, whether or not it can be shared."""
    width = min(l.width for l in layers.values())
    override = options.layer_share.get(str(position), options.layer_share.get(next(iter(layers.values())).name))
    if options.zipper is not None:
        return width if position <= options.zipper else 0
    if isinstance(override, int) and not isinstance(override, bool):
        return min(override, width)
    if override is not None:
        return int(round(float(override) * width))
    return int(round(options.share * width))


@dataclass
class StepRecord:
    position: int
    layers: dict[str, Layer]
    joint: Optional[JointLayer]
    result: Optional[ZipResult]
    planned: int
    rows: tuple[int, int] = (0, 0)  # calibration rows the Hessians used, of those available


def task_weights(tasks: list[str], options: MergeOptions) -> dict[str, float]:
    """Each task's share of the layer error: alpha / 1 - alpha for two tasks, equal for more."""
    if len(tasks) == 2:
        return {tasks[0]: options.alpha, tasks[1]: 1.0 - options.alpha}
    return {t: 1.0 / len(tasks) for t in tasks}


@dataclass
class Reuse:
    """What does not depend on the sharing plan, kept across the runs of a trade-off curve."""

    record: Optional[OriginalRecord] = None
    tied: Optional[TiedStats] = None
    spill_dir: Optional[str] = None  # where activations (and a big record) bigger than spill_bytes wait on disk
    spill_bytes: float = float("inf")


def zip_layers(prepared: Prepared, options: MergeOptions, progress: Progress, cancel,
               plan: Optional[dict[int, int]] = None, reuse: Optional[Reuse] = None):
    """Process every layer position in order: capture, then pair + merge (shared) or refit (own)."""
    reuse = reuse or Reuse()
    al = prepared.alignment
    tasks = prepared.tasks
    providers = resolve_providers(options.providers)
    plan = plan if plan is not None else plan_shares(al, options)
    shareable = len(al.shareable_layers())
    if options.zipper is not None and options.zipper > shareable:
        prepared.warnings.append(f"zipper={options.zipper} asked for more layers than the {shareable} that can "
                                 "be shared; all of them were shared")
    rng = np.random.default_rng(options.seed)
    state = ZipState(al)
    if reuse.record is None:
        progress("merge", 0.0, "running the original models once (targets and tied-channel statistics)")
        wanted = tied_writers(al)
        if options.calibrate:
            wanted = {t: set(range(len(al.models[t].layers))) for t in tasks}
        reuse.record = OriginalRecord(al, prepared.fit, options, providers, wanted, reuse.spill_dir,
                                      reuse.spill_bytes)
    progress("merge", 0.0, "pairing channels tied across layers (residuals)")
    if reuse.tied is None:
        reuse.tied = TiedStats(al, reuse.record)
    fixed_views = reuse.tied.views(plan, options, rng)
    fixed_views.update(_in_order_views(al, plan))
    trunk = SegmentCache(size=2 * len(tasks))  # a trunk shared by every task: computed once, not per task
    merged = {t: Frontier(al.models[t], prepared.fit, providers, options.batch_size, reuse.spill_dir,
                          reuse.spill_bytes, trunk) for t in tasks}
    weights = task_weights(tasks, options)
    depth = max(len(al.models[t].layers) for t in tasks)
    joint_at = {j.position - 1: j for j in al.joint}
    records = []
    for pos in range(depth):
        check_cancel(cancel)
        layers = {t: al.models[t].layers[pos] for t in tasks if pos < len(al.models[t].layers)}
        joint = joint_at.get(pos)
        k = plan.get(pos + 1, 0)
        group = al.joint_group(tasks[0], al.channels[tasks[0]].layer_out[layers[tasks[0]].index]) if joint else None
        view = fixed_views.get(group)
        shares = joint is not None and joint.shareable and (k > 0 or (view is not None and view.shared > 0))
        if not shares and all(state.input_exact(t, layer) for t, layer in layers.items()):
            # nothing changes here (no sharing so far, none at this layer): its own weights, nothing to capture
            t, layer = next(iter(layers.items()))
            rows = len(next(iter(prepared.fit.values()))) * positions(layer, al.models[t].shapes)
            records.append(StepRecord(pos + 1, layers, joint, None, k, (0, rows)))
            continue
        progress("merge", pos / depth, f"layer {pos + 1}/{depth}: capturing activations")
        _share_same_inputs(state, merged, layers)
        sides: list[TaskSide] = []
        result = None
        # BLAS threads for this layer's Grams and solves: see blas.py
        with small_work(max(int(np.prod(layer.weight.shape[1:])) + 1 for layer in layers.values())):
            for t, layer in layers.items():
                record = reuse.record.get(t, layer) if options.calibrate else None
                sides.append(_capture(state, merged[t], t, layer, options, weights[t], sides, record,
                                      keep_patches=len(sides) + 1 < len(layers)))
                _check_finite(sides[-1], pos + 1)
            for side in sides:
                side.patches = None  # used by the other tasks' captures only
            if joint is not None and joint.shareable and (k > 0 or view is not None):
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
        for t in layers:  # the next capture runs this layer, now merged, on its way to the next input
            merged[t].retain([l.input for l in al.models[t].layers[pos + 1:]])
        records.append(StepRecord(pos + 1, layers, joint, result, k, (sides[0].moments.rows, sides[0].available_rows)))
        progress("merge", (pos + 1) / depth, f"layer {pos + 1}/{depth} done")
    return state, records


def _in_order_views(al: Alignment, plan: dict[int, int]) -> dict[int, GroupView]:
    """Groups shared in their original order (JointLayer.fixed_order): channel i of every task paired,
    the first k of them shared."""
    tasks, views = al.tasks, {}
    for j in al.joint:
        if j.fixed_order:
            layer = j.layers[tasks[0]]
            k = min(plan.get(j.position, 0), layer.width)
            views[al.joint_group(tasks[0], al.channels[tasks[0]].layer_out[layer.index])] = GroupView.build(
                [(frozenset(tasks), {t: i for t in tasks}) for i in range(k)]
                + [(frozenset([t]), {t: i}) for i in range(k, layer.width) for t in tasks], tasks)
    return views


def _share_same_inputs(state: ZipState, merged: dict[str, Frontier], layers: dict[str, Layer]) -> None:
    """A layer input onnxzip does not follow channel by channel (an attention's output) is one shared
    space when every task's merged model computes the very same tensor there (everything before it is
    shared): its columns are then shared and the layer can run once. Otherwise each task keeps its own."""
    tasks = list(layers)
    t0 = tasks[0]
    cg = state.al.channels[t0]
    layout = cg.layer_in.get(layers[t0].index)
    if len(tasks) < 2 or layout is None or len(layout.segments) != 1 or layout.segments[0].group not in cg.opaque:
        return
    joint = state.al.joint_group(t0, layout.segments[0].group)
    if state.views[joint].shared:
        return
    inputs = [merged[t].compute([layer.input], lambda nodes, t=t: state.substitutions(t, nodes))[0]
              for t, layer in layers.items()]
    if all(x.shape == inputs[0].shape and same_values(inputs[0], x) for x in inputs[1:]):
        state.views[joint] = GroupView.identical(layout.segments[0].size, tasks, state.tasks)


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


def flat_range(model: CanonicalModel, layer: Layer, spread: np.ndarray, margin: float) -> Optional[FlatRange]:
    """The ReLU/Clip (ReLU6) right after `layer`, if any, with margins of `margin` times each
    channel's spread (standard deviation of its pre-activations)."""
    act = activation_after(model, layer)
    if act is None:
        return None
    lo, hi = 0.0, np.inf
    if act.op == "Clip":
        bounds = [t.values if isinstance(t, gs.Constant) and t.name else None for t in act.inputs[1:3]]
        bounds += [None] * (2 - len(bounds))
        lo = float(bounds[0]) if bounds[0] is not None else float(act.attrs.get("min", -np.inf))
        hi = float(bounds[1]) if bounds[1] is not None else float(act.attrs.get("max", np.inf))
    return FlatRange(lo - margin * spread, hi + margin * spread)


def _targets(state: ZipState, merged: Frontier, task: str, layer: Layer, record: LayerRecord):
    """The layer's targets, batch by batch: part -> rows (original channel order).

    A layer that feeds a residual Add is fit to the ORIGINAL sum minus what the merged model
    already adds there, so it also corrects the error arriving through the shortcut. Applies when
    the other addends are already known in the merged model (no unprocessed layer on their path)."""
    plain = lambda part: record.rows[record.sample.span(part)]  # noqa: E731
    model = state.al.models[task]
    residual = residual_sum(model, layer)
    if residual is None or record.sum_rows is None:
        return plain
    layer_nodes = {id(l.node) for l in model.layers}
    if any(id(n) in layer_nodes for n in segment_nodes(model.graph, set(merged.store), residual[1])):
        return plain
    added = merged.compute(residual[1], lambda nodes: state.substitutions(task, nodes))
    # merged tensors are in view order; take(.., to_view) puts them back in the original channel order
    to_view = np.argsort(state.out_order(task, layer))

    def residual_rows(part: slice) -> np.ndarray:
        index = record.sample.batch(part)
        target = np.array(record.sum_rows[record.sample.span(part)], copy=True)
        for tensor in added:
            target -= np.take(output_rows(layer, tensor[part], index), to_view, axis=1)
        return target
    return residual_rows


def _capture(state: ZipState, merged: Frontier, task: str, layer: Layer, options: MergeOptions, weight: float,
             others, record: Optional[LayerRecord], keep_patches: bool = False) -> TaskSide:
    """Moments of the layer's inputs in the merged model (and cross moments with its original
    pre-activations, from the record, when calibrating), streamed batch by batch. `keep_patches`: keep
    the input rows on the side (TaskSide.patches) for a later task whose inputs may be identical."""
    twin = None
    before = others[-1] if others else None
    like = {layer.input: before.inputs} if before is not None and before.inputs is not None else None
    (x,) = merged.compute([layer.input], lambda nodes: state.substitutions(task, nodes), like=like)
    targets = _targets(state, merged, task, layer, record) if record is not None else None
    flat = (flat_range(state.al.models[task], layer, record.spread, options.activation_margin)
            if record is not None and record.spread is not None and options.activation_margin is not None else None)
    imap = state.in_map(task, layer)
    dim = int(np.prod(layer.weight.shape[1:]))
    if record is not None:
        sample = record.sample
    else:
        sample = position_sample(state.al.models.values(), layer, len(x), rows_per_sample(layer, x),
                                 options.hessian_rows, options.seed)
    if layer.depthwise:
        # output channel c reads input channel c: both in view order, targets too
        order = state.out_order(task, layer)
        moments = ChannelMoments(layer.width, int(np.prod(layer.kernel)), options.calibrate)
        w, b = layer.weight[order], layer.bias[order]
    else:
        # In a shared trunk every task's layer sees the very same inputs: accumulate their Gram once.
        twin = next((o for o in others if not o.layer.depthwise
                     and o.layer.weight.shape[1:] == layer.weight.shape[1:]
                     and o.layer.node.attrs == layer.node.attrs and o.inputs is not None
                     and same_values(o.inputs, x)), None)  # `x is o.inputs` when compute found them equal
        w, b = layer.weight, layer.bias
        if imap is not None:
            w = w[:, imap.perm]
        shared_gram = twin.moments.gram if twin is not None else None
        if twin is not None and twin.inputs is not x:  # one copy of the trunk's tensor in memory, not one per task
            merged.store[layer.input] = x = twin.inputs
        if sample.kept < ROWS_MODE_BELOW * (dim + 1) and options.damping > 0 and options.hessian == "full":
            # fewer calibration rows than inputs (VGG's 25,088-wide fc1): keep the rows, not a d x d Gram
            moments = RowMoments(dim, sample.kept, layer.width if options.calibrate else None, gram=shared_gram)
        elif _device_hessians(options, merged.providers) and options.hessian == "full":
            moments = DeviceMoments(layer, options.calibrate, merged.providers, shared_gram,
                                    (w, b, flat.lo, flat.hi) if flat is not None else None,
                                    sampled=sample.index is not None)
            for start in range(0, len(x), options.batch_size):
                part = slice(start, min(len(x), start + options.batch_size))
                moments.update_batch(x[part], targets(part) if targets is not None else None, sample.batch(part))
            return TaskSide(task, layer, moments, weight, imap, w, b, state.input_exact(task, layer), x,
                            sample.total)
        elif options.hessian == "channel" and layer.kind == "conv" and int(np.prod(layer.kernel)) > 1:
            moments = KroneckerMoments(int(layer.weight.shape[1]), int(np.prod(layer.kernel)),
                                       layer.width if options.calibrate else None, gram=shared_gram)
        else:
            moments = Moments(dim, layer.width if options.calibrate else None, gram=shared_gram)
    # The twin's patches (identical inputs, same rows) are this layer's too: made once, not once per task.
    reused = (iter(twin.patches[1]) if twin is not None and twin.patches is not None  # no twin if depthwise
              and _same_rows(twin.patches[0], sample.index) else None)
    kept = ([] if keep_patches and reused is None and not layer.depthwise
            and 4 * (dim + 1) * sample.kept <= min(KEEP_PATCHES_BYTES, merged.spill_bytes) else None)

    def batches():
        for start in range(0, len(x), options.batch_size):
            part = slice(start, min(len(x), start + options.batch_size))
            index = sample.batch(part)
            if index is not None and len(index) == 0:
                continue
            rows = next(reused) if reused is not None else layer_rows(layer, x[part], index)
            if kept is not None:
                kept.append(rows)
            y_rows = targets(part) if targets is not None else None
            if y_rows is not None and layer.depthwise:
                y_rows = y_rows[:, order]  # targets in view order, like the filters and inputs
            if flat is not None:
                lo_hi = (flat.lo[order], flat.hi[order]) if layer.depthwise else (flat.lo, flat.hi)
                y_rows = FlatRange(*lo_hi).targets(y_rows, _response(layer, rows, w, b))
            yield rows, y_rows

    # patches and targets of the next batch are made while this one's moments accumulate (overlap.py),
    # unless two batches of patches at once would take too much memory
    batch_bytes = 4 * (dim + 1) * sample.kept * min(options.batch_size, len(x)) / max(len(x), 1)
    overlapped(batches(), lambda batch: moments.update(*batch), enabled=batch_bytes <= OVERLAP_BATCH_BYTES)
    return TaskSide(task, layer, moments, weight, imap, w, b, state.input_exact(task, layer), x, sample.total,
                    patches=(sample.index, kept) if kept is not None else None)


def _same_rows(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    """Do two RowSample indices pick the same rows (None: every row)?"""
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _check_finite(side: TaskSide, position: int) -> None:
    """Overflowing activations would turn every solve downstream into NaN: stop here, naming the layer."""
    m = side.moments
    if np.isfinite(m.gram).all() and (m.cross is None or np.isfinite(m.cross).all()):
        return
    raise NonFiniteError(
        f"layer {position} ({side.layer.name}) of model {side.task}: its activations on the calibration data "
        "overflow to infinity or NaN; nothing was written. Give calibration data with the scale the models were "
        "trained on (normalized as in training)")


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
