"""Align the models' layers and channel groups.

Layers are matched in topological order (kind, kernel, stride, padding, dilation and groups must
agree; widths may differ). Matching stops at the first layer that differs: the prefix before it is
merged and the rest stays per task (different depths). Matched layers' output groups become one
joint group; a joint group may hold at most one group per task, which is how differing residual
wiring is caught. A matched layer is *shareable* when its output group is not frozen in any model
and every group it reads is shareable or a shared graph input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .canonicalize import CanonicalModel, Layer
from .channels import ChannelGraph, Layout
from .errors import AlignmentError


@dataclass
class JointLayer:
    """Layers at the same position in every model."""

    position: int  # 1-based, as `inspect` prints it
    layers: dict[str, Layer]
    shareable: bool
    reason: Optional[str] = None  # why it cannot be shared


@dataclass
class Alignment:
    tasks: list[str]
    models: dict[str, CanonicalModel]
    channels: dict[str, ChannelGraph]
    joint: list[JointLayer]
    stop_reason: Optional[str]
    joint_of: dict[tuple[str, int], int] = field(default_factory=dict)  # (task, local root) -> joint id
    shared_inputs: dict[str, list[str]] = field(default_factory=dict)  # input name -> tasks reading it

    def joint_group(self, task: str, group: int) -> int:
        return self.joint_of[(task, self.channels[task].find(group))]

    def shareable_layers(self) -> list[JointLayer]:
        return [j for j in self.joint if j.shareable]


class _JointFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _mismatch(a: Layer, b: Layer) -> Optional[str]:
    if a.kind != b.kind:
        return f"{a.describe()} in one model, {b.describe()} in the other"
    if a.kind == "conv":
        for attr in ("kernel_shape", "strides", "pads", "dilations"):
            if list(a.node.attrs[attr]) != list(b.node.attrs[attr]):
                return f"Conv {attr} differ: {a.node.attrs[attr]} vs {b.node.attrs[attr]}"
        if (a.groups > 1 or b.groups > 1) and a.groups != b.groups:
            return f"Conv groups differ: {a.groups} vs {b.groups}"
    if a.weight.shape[1:] != b.weight.shape[1:] and a.kind == "linear":
        pass  # input widths may differ when the previous layer's widths do
    return None


def align(tasks: list[str], models: dict[str, CanonicalModel],
          channels: dict[str, ChannelGraph]) -> Alignment:
    """Match every model's layers to the first model's (see module docstring)."""
    first = tasks[0]
    jf = _JointFind()
    for t in tasks:
        cg = channels[t]
        for g in range(len(cg.parent)):
            jf.find((t, cg.find(g)))
    shared_inputs: dict[str, list[str]] = {}
    for t in tasks:
        for spec in models[t].inputs:
            owner = next((o for o in shared_inputs.get(spec.name, [])), None)
            if owner is not None:
                other = next(s for s in models[owner].inputs if s.name == spec.name)
                if (other.shape[1:], other.dtype) != (spec.shape[1:], spec.dtype):
                    raise AlignmentError(
                        f"input '{spec.name}' has shape {spec.shape} in model {t} but {other.shape} in model "
                        f"{owner}: models must read the same input to be merged")
                if spec.name in channels[t].input_group:
                    jf.union((owner, channels[owner].find(channels[owner].input_group[spec.name])),
                             (t, channels[t].find(channels[t].input_group[spec.name])))
            shared_inputs.setdefault(spec.name, []).append(t)

    if not any(len(owners) == len(tasks) for owners in shared_inputs.values()):
        names = "; ".join(f"model {t} reads {', '.join(repr(i.name) for i in models[t].inputs)}" for t in tasks)
        raise AlignmentError(
            f"the models share no input ({names}): onnxzip shares layers only between models that read "
            "the same input (same name and shape); rename one model's input")
    joint: list[JointLayer] = []
    stop: Optional[str] = None
    depth = min(len(models[t].layers) for t in tasks)
    for pos in range(depth):
        layers = {t: models[t].layers[pos] for t in tasks}
        problem = next((m for t in tasks[1:] if (m := _mismatch(layers[first], layers[t]))), None)
        if problem is None:
            problem = _input_mismatch(tasks, layers, channels, jf)
        if problem is not None:
            stop = f"layer {pos + 1} ({layers[first].name}): {problem}"
            break
        for t in tasks[1:]:
            jf.union((first, channels[first].find(channels[first].layer_out[pos])),
                     (t, channels[t].find(channels[t].layer_out[pos])))
        clash = _one_group_per_task(tasks, channels, jf)
        if clash:
            stop = f"layer {pos + 1} ({layers[first].name}): {clash}"
            break
        joint.append(JointLayer(pos + 1, layers, True))
    if not joint:
        names = " and ".join(f"'{models[t].label}'" for t in tasks)
        raise AlignmentError(f"{names} cannot be aligned: {stop or 'no Conv/Gemm layers with constant weights'}")

    alignment = Alignment(tasks, models, channels, joint, stop)
    roots = {}
    for key in list(jf.parent):
        roots.setdefault(jf.find(key), len(roots))
    alignment.joint_of = {key: roots[jf.find(key)] for key in jf.parent}
    alignment.shared_inputs = shared_inputs
    _mark_shareable(alignment)
    return alignment


def _input_mismatch(tasks, layers, channels, jf) -> Optional[str]:
    """Matched layers must read the same joint groups, with the same structure."""
    layouts = {t: channels[t].layer_in.get(layers[t].index) for t in tasks}
    ref = layouts[tasks[0]]
    for t in tasks[1:]:
        lay = layouts[t]
        if (ref is None) != (lay is None):
            return "one model's layer reads channels onnxzip cannot follow, the other's does"
        if ref is None:
            continue
        if [s.inner for s in ref.segments] != [s.inner for s in lay.segments]:
            return "the layers read differently shaped inputs (flattened blocks differ)"
        for a, b in zip(ref.segments, lay.segments):
            if jf.find((tasks[0], channels[tasks[0]].find(a.group))) != jf.find((t, channels[t].find(b.group))):
                return "the layers read different channels (the graphs are wired differently)"
    return None


def _one_group_per_task(tasks, channels, jf) -> Optional[str]:
    seen: dict = {}
    for t in tasks:
        cg = channels[t]
        for g in range(len(cg.parent)):
            key = (jf.find((t, cg.find(g))), t)
            if seen.setdefault(key, cg.find(g)) != cg.find(g):
                return "channels tied together in one model (a residual Add) are separate in the other"
    return None


def _mark_shareable(al: Alignment) -> None:
    """A joint layer shares only if its output group is free in every model and its inputs are shared."""
    shareable_groups: set[int] = set()
    for inp, owners in al.shared_inputs.items():
        if len(owners) == len(al.tasks) and inp in al.channels[owners[0]].input_group:
            shareable_groups.add(al.joint_group(owners[0], al.channels[owners[0]].input_group[inp]))
    for j in al.joint:
        reasons = []
        for t, layer in j.layers.items():
            cg = al.channels[t]
            why = cg.frozen_reason(cg.layer_out[layer.index])
            if why:
                reasons.append(f"its output reaches {why}" if why.startswith("graph output")
                               else f"its channels pass through {why}")
                break
        lay: Optional[Layout] = al.channels[al.tasks[0]].layer_in.get(j.layers[al.tasks[0]].index)
        if lay is None:
            reasons.append("its input is not a channel layout onnxzip can follow")
        else:
            for seg in lay.segments:
                if al.joint_group(al.tasks[0], seg.group) not in shareable_groups:
                    reasons.append("it reads channels that are not shared")
                    break
        if reasons:
            j.shareable, j.reason = False, reasons[0]
        else:
            shareable_groups.add(al.joint_group(al.tasks[0], al.channels[al.tasks[0]].layer_out[j.layers[al.tasks[0]].index]))
