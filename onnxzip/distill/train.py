"""The distillation loop. Student: the merged model as emitted, run by PyTorch (torchgraph.py) with the
layers' weights and biases trainable, stored as the merged model stores them (a block shared by
several tasks is one Parameter, trained by all of them). Teachers: each task's original (canonical)
model, frozen. Loss per task: the outputs (class scores: KL divergence at a temperature; other
outputs: relative squared error) plus each layer's output against the original layer's (relative
squared error, mean over layers). The held-out calibration samples never train: they pick the best
weights and decide whether the result is kept at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..emit import emit
from ..errors import CancelledError, UnsupportedGraphError
from ..fidelity import measure
from ..runtime import resolve_providers
from ..zip_loop import task_weights
from .torchgraph import TorchGraph

TEMPERATURE = 2.0  # softened class scores carry the teacher's ranking of all classes (Hinton et al. 2015)
LAYER_WEIGHT = 1.0  # the per-layer loss beside the outputs' (the zippering paper sums the two)
LEARNING_RATE = 1e-3  # Adam; halved whenever the held-out loss stalls for PATIENCE // 2 checks
EVAL_EVERY = 20  # training steps between held-out checks
PATIENCE = 8  # held-out checks without improvement before stopping early
NOISE = 0.05  # Gaussian input noise, in units of each float input feature's spread
MIXUP = 0.4  # Beta(MIXUP, MIXUP) mixing of two calibration samples, on half of each batch
CANCEL_EVERY_S = 1.0  # how often the cancel callback is polled (it may ask a job store)


@dataclass
class _Task:
    """What one task trains on: (student name, teacher name, kind) per output, (student name, teacher
    name, channel index) per layer."""

    name: str
    weight: float
    teacher: TorchGraph
    outputs: list = field(default_factory=list)
    layers: list = field(default_factory=list)


def distill(prepared, state, emitted, options, progress, cancel):
    """Train, write the best weights back into `state`, re-emit; keep the result only if it is not worse
    than the closed-form merge on the held-out samples. Returns (state to emit, report section)."""
    started = time.perf_counter()
    providers = resolve_providers(options.providers)
    device = torch.device("cuda" if "CUDAExecutionProvider" in providers and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # the Hessians are computed without TF32; so is this
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(options.seed)
    student, tasks = _build(prepared, state, emitted, options)
    mismatch = _mismatch(student, emitted.model, prepared.holdout or prepared.fit, device)
    if mismatch:
        return state, {"kept": "closed-form", "steps": 0, "seconds": 0.0, "warning": (
            f"distillation skipped: PyTorch and onnxruntime disagree on the merged model ({mismatch}); "
            "the closed-form merge is kept")}
    student.to(device)
    for task in tasks:
        task.teacher.to(device)
    fit = {k: torch.from_numpy(v) for k, v in prepared.fit.items()}
    held = {k: torch.from_numpy(v).to(device) for k, v in prepared.holdout.items()}
    held_targets = _teach(tasks, held)
    params = list(student.params.values())
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    rng = np.random.default_rng(options.seed)
    spread = {k: v.float().std(dim=0, keepdim=True) for k, v in fit.items() if v.is_floating_point()}
    first_losses = _held_out_losses(student, tasks, held, held_targets)
    best_loss = first_loss = _total(tasks, first_losses)
    best_losses = first_losses
    best = [p.detach().clone() for p in params]
    stale, steps, stopped, polled = 0, 0, "steps", time.monotonic()
    while steps < options.distill_steps:
        elapsed = time.perf_counter() - started
        if elapsed > options.distill_seconds:
            stopped = "time"
            break
        if time.monotonic() - polled > CANCEL_EVERY_S:
            polled = time.monotonic()
            if cancel():
                raise CancelledError("the merge was cancelled during distillation")
        batch = _augment(_batch(fit, options.batch_size, rng), spread, rng, device)
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(student, tasks, batch, _teach(tasks, batch), layers=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % EVAL_EVERY == 0:
            losses = _held_out_losses(student, tasks, held, held_targets)
            held_loss = _total(tasks, losses)
            progress("distill", max(steps / options.distill_steps, elapsed / options.distill_seconds),
                     f"step {steps}: held-out loss {held_loss:.4g} (started at {first_loss:.4g})")
            # the best weights so far that leave no task worse than the closed form on the held-out samples
            admissible = all(losses[t] <= first_losses[t] for t in losses)
            if held_loss < best_loss * (1 - 1e-4) and admissible:
                best_loss, best_losses, stale = held_loss, losses, 0
                best = [p.detach().clone() for p in params]
            elif held_loss < best_loss * (1 - 1e-4):
                stale = 0  # still improving overall: keep training
            else:
                stale += 1
                if stale % (PATIENCE // 2) == 0:
                    for group in optimizer.param_groups:
                        group["lr"] /= 2
                if stale >= PATIENCE:
                    stopped = "early"
                    break
    with torch.no_grad():
        for p, value in zip(params, best):
            p.copy_(value)
    trained = _write_back(student, state, emitted, prepared.alignment)
    return _keep_or_not(prepared, state, trained, emitted, options, dict(
        steps=steps, seconds=round(time.perf_counter() - started, 3), stopped=stopped, device=str(device),
        held_out_loss={t.name: {"closed_form": round(first_losses[t.name], 6), "distilled": round(best_losses[t.name], 6)}
                       for t in tasks}))


def _build(prepared, state, emitted, options):
    """The student (merged model) and one teacher per task, with their matching tensors."""
    al = prepared.alignment
    graph = emitted.model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    trainable, student_names = set(), []
    weights = task_weights(al.tasks, options)
    tasks = []
    for t in al.tasks:
        model = al.models[t]
        proto = model.to_onnx()
        kinds = _output_kinds(proto, model)
        task = _Task(t, weights[t], None)
        for out, kind in kinds.items():
            task.outputs.append((f"{t}/{out}", out, kind))
        for layer in model.layers:
            weight, bias, output = emitted.layer_tensors[(t, layer.index)]
            inverse = np.argsort(state.out_order(t, layer))  # original channel c sits at inverse[c]
            task.layers.append((output, layer.output, torch.from_numpy(inverse), layer.channel_axis))
            for name in (weight, bias):
                trainable |= _initializers_of(name, producer, inits)
        task.teacher = TorchGraph(proto, [o for _, o, _ in task.outputs] + [l.output for l in model.layers])
        student_names += [s for s, _, _ in task.outputs] + [layer[0] for layer in task.layers]
        tasks.append(task)
    if not any(task.outputs for task in tasks):
        raise UnsupportedGraphError("distillation found no float output to train on")
    return TorchGraph(emitted.model, list(dict.fromkeys(student_names)), trainable), tasks


def _output_kinds(proto, model) -> dict[str, str]:
    """Float outputs and how to compare them: 'probs' (a Softmax output), 'logits' (other class scores,
    2-D with several columns) or 'values'. Integer outputs (labels) cannot be trained on."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    kinds = {}
    for value in proto.graph.output:
        if value.type.tensor_type.elem_type not in (1, 10, 11):  # float, float16, double
            continue
        node = producer.get(value.name)
        shape = model.shapes.get(value.name) or ()
        if node is not None and node.op_type == "Softmax":
            kinds[value.name] = "probs"
        elif len(shape) == 2 and (shape[1] or 0) > 1:
            kinds[value.name] = "logits"
        else:
            kinds[value.name] = "values"
    # an output that needs ops PyTorch cannot run here (ai.onnx.ml ops after the scores) is left out
    return {o: k for o, k in kinds.items() if _runs(proto, o)}


def _runs(proto, output: str) -> bool:
    try:
        TorchGraph(proto, [output])
    except UnsupportedGraphError:
        return False
    return True


def _initializers_of(name: str, producer: dict, inits: set[str]) -> set[str]:
    """The initializers a layer weight is made of (itself, or the blocks a Concat tree joins)."""
    if name in inits:
        return {name}
    node = producer.get(name)
    if node is None or node.op_type != "Concat":
        return set()
    return set().union(*(_initializers_of(i, producer, inits) for i in node.input))


def _mismatch(student: TorchGraph, model, data: dict, device) -> Optional[str]:
    """Does PyTorch compute what onnxruntime computes for the merged model (a few samples)?"""
    from ..runtime import make_session

    sample = {k: v[:8] for k, v in data.items()}
    session = make_session(model, ["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    names = [n for n in student.outputs if n in {o.name for o in session.get_outputs()}]
    reference = dict(zip(names, session.run(names, {k: v for k, v in sample.items() if k in inputs})))
    with torch.no_grad():
        got = student({k: torch.from_numpy(v) for k, v in sample.items()})
    for name, ref in reference.items():
        value = got[name].float().numpy()
        error = np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-12)
        if not np.isfinite(error) or error > 1e-3:
            return f"output '{name}' differs by {error:.2g}"
    return None


def _batch(fit: dict, size: int, rng) -> dict:
    n = len(next(iter(fit.values())))
    pick = torch.from_numpy(rng.choice(n, size=min(size, n), replace=False))
    return {k: v[pick] for k, v in fit.items()}


def _augment(batch: dict, spread: dict, rng, device) -> dict:
    """Label-free augmentation of float inputs: the teachers label whatever the student sees. Mixup of
    two samples on half the batch, then Gaussian noise; integer inputs (token ids) stay as they are."""
    out = {}
    n = len(next(iter(batch.values())))
    half = n // 2
    lam = torch.from_numpy(rng.beta(MIXUP, MIXUP, size=half).astype(np.float32))
    partner = torch.from_numpy(rng.permutation(n)[:half])
    for name, x in batch.items():
        if not x.is_floating_point():
            out[name] = x.to(device)
            continue
        x = x.clone()
        shape = (half,) + (1,) * (x.dim() - 1)
        x[:half] = lam.reshape(shape) * x[:half] + (1 - lam.reshape(shape)) * x[partner]
        x = x + NOISE * spread[name] * torch.randn(x.shape, generator=None)
        out[name] = x.to(device)
    return out


def _teach(tasks: list[_Task], feeds: dict) -> dict:
    with torch.no_grad():
        return {task.name: task.teacher({k: v for k, v in feeds.items() if k in _inputs(task)}) for task in tasks}


def _inputs(task: _Task) -> set[str]:
    return set(task.teacher.inputs)


def _loss(student: TorchGraph, tasks: list[_Task], feeds: dict, targets: dict, layers: bool) -> torch.Tensor:
    return _total(tasks, _task_losses(student, tasks, feeds, targets, layers))


def _task_losses(student: TorchGraph, tasks: list[_Task], feeds: dict, targets: dict, layers: bool) -> dict:
    got = student(feeds)
    out = {}
    for task in tasks:
        want = targets[task.name]
        loss = sum(_output_loss(got[s], want[t], kind) for s, t, kind in task.outputs)
        if layers and task.layers:
            layer_loss = sum(_relative(got[s].index_select(axis % got[s].dim(), index.to(got[s].device)), want[t])
                             for s, t, index, axis in task.layers)
            loss = loss + LAYER_WEIGHT * layer_loss / len(task.layers)
        out[task.name] = loss
    return out


def _total(tasks: list[_Task], losses: dict):
    return sum(task.weight * losses[task.name] for task in tasks)


def _held_out_losses(student, tasks, held, targets) -> dict[str, float]:
    """Each task's output loss on the held-out samples (no augmentation, no per-layer terms)."""
    with torch.no_grad():
        return {t: float(v) for t, v in _task_losses(student, tasks, held, targets, layers=False).items()}


def _output_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "values":
        return _relative(student, teacher)
    if kind == "probs":  # log-probabilities are logits up to a constant per sample
        student, teacher = torch.log(student.clamp_min(1e-12)), torch.log(teacher.clamp_min(1e-12))
    t = TEMPERATURE
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean") * t * t


def _relative(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return torch.mean((student - teacher) ** 2) / (torch.mean(teacher ** 2) + 1e-12)


def _write_back(student: TorchGraph, state, emitted, al):
    """The trained weights of every layer, as state.weights (view order), in a copy of `state`."""
    import copy

    wanted = {key: names[:2] for key, names in emitted.layer_tensors.items()}
    names = sorted({n for pair in wanted.values() for n in pair})
    with torch.no_grad():
        values = {k: v.detach().cpu().numpy() for k, v in student.evaluate(names).items()}
    trained = copy.copy(state)
    trained.weights = dict(state.weights)
    for (t, index), (w, b) in wanted.items():
        layer = al.models[t].layers[index]
        trained.weights[(t, index)] = (values[w].astype(layer.weight.dtype),
                                       values[b].reshape(-1).astype(layer.bias.dtype))
    return trained


def _keep_or_not(prepared, state, trained, emitted, options, section: dict):
    """Keep the distilled weights only if the held-out fidelity is not worse: no task's held-out loss
    (what distillation minimizes) went up, and neither did the mean top-1 disagreement over the tasks
    with class scores (or the mean relative error over the others). One task may then lose a held-out
    sample or two of agreement while its loss and the mean improve; the report shows each task."""
    after = emit(trained)
    before_fid = measure(prepared.originals, emitted.model, prepared.holdout, prepared.tasks, options.providers)
    after_fid = measure(prepared.originals, after.model, prepared.holdout, prepared.tasks, options.providers)
    keys = ("top1_agreement", "rel_err")
    section["fidelity"] = {t: {"closed_form": {k: before_fid[t].get(k) for k in keys},
                               "distilled": {k: after_fid[t].get(k) for k in keys}} for t in prepared.tasks}
    losses = section["held_out_loss"]
    worse_loss = [t for t, v in losses.items() if v["distilled"] > v["closed_form"]]
    worse_mean = _mean_figure(after_fid) < _mean_figure(before_fid)
    keep = not worse_loss and not worse_mean
    section["kept"] = "distilled" if keep else "closed-form"
    if not keep:
        section["why"] = (f"the held-out loss of task {', '.join(worse_loss)} went up" if worse_loss
                          else "the mean held-out fidelity went down")
    return (trained if keep else state), section


def _mean_figure(fidelity: dict) -> float:
    """Higher is better: mean top-1 agreement of the class-score tasks, less the mean relative error of
    the others."""
    agree = [f["top1_agreement"] for f in fidelity.values() if f.get("top1_agreement") is not None]
    other = [f["rel_err"] for f in fidelity.values() if f.get("top1_agreement") is None and f.get("rel_err") is not None]
    return (float(np.mean(agree)) if agree else 0.0) - (float(np.mean(other)) if other else 0.0)
