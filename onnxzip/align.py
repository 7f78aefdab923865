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
from .channels import ChannelGraph
from .errors import AlignmentError


@dataclass
class JointLayer:
    """Layers at the same position in every model."""

    position: int  # 1-based, as `inspect` prints it
    layers: dict[str, Layer]
    shareable: bool
    reason: Optional[str] = None  # why it cannot be shared
    # Shared in the original channel order only (no pairing): its channels pass through an op onnxzip does
    # not permute through (an attention's reshape into heads). Says which.
    fixed_order: Optional[str] = None


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
            shared_inputs.setdefault(spec.name, []).append(t)
    everyone = {name for name, owners in shared_inputs.items() if len(owners) == len(tasks)}
    for t in tasks[1:]:  # layers reading the same shared graph inputs read one fixed joint space
        for key, g in channels[t].input_group.items():
            if key in channels[first].input_group and key[0] <= everyone:
                jf.union((first, channels[first].find(channels[first].input_group[key])),
                         (t, channels[t].find(g)))
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
            ga, gb = (tasks[0], channels[tasks[0]].find(a.group)), (t, channels[t].find(b.group))
            if a.group in channels[tasks[0]].opaque and b.group in channels[t].opaque:
                jf.union(ga, gb)  # inputs not followed: one joint group of per-task columns
            elif jf.find(ga) != jf.find(gb):
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
    """A joint group is shareable when every layer writing it, in every model, is an aligned layer
    whose channels are free (not frozen) or can be shared in their original order (`_order_shareable`);
    a joint layer shares exactly when its output group does.
    A writer may read channels that are not shared (per task: its shared neurons keep per-task weights
    for them, MTZ Sec. 3.2), but then it reads them per task and is not computed once."""
    tasks, n_joint = al.tasks, len(al.joint)
    writers: dict[int, list[tuple[str, Layer]]] = {}
    for t in tasks:
        for layer in al.models[t].layers:
            writers.setdefault(al.joint_group(t, al.channels[t].layer_out[layer.index]), []).append((t, layer))
    excluded: dict[int, str] = {}
    in_order: dict[int, str] = {}  # frozen groups shared with the identity pairing
    for g, ws in writers.items():
        for t, layer in ws:
            why = al.channels[t].frozen_reason(al.channels[t].layer_out[layer.index])
            if layer.index >= n_joint:
                excluded[g] = "beyond the aligned layers"
            elif why and why.startswith("graph output"):
                excluded[g] = f"its output reaches {why}"
            elif why:
                in_order[g] = f"its channels pass through {why}"
                if not _order_shareable(why, ws):
                    excluded[g] = in_order[g]
            if g in excluded:
                break
    for j in al.joint:
        t, layer = tasks[0], j.layers[tasks[0]]
        g = al.joint_group(t, al.channels[t].layer_out[layer.index])
        j.shareable, j.reason = g not in excluded, excluded.get(g)
        j.fixed_order = in_order.get(g) if j.shareable else None


def _order_shareable(why: str, writers: list[tuple[str, Layer]]) -> bool:
    """Channels onnxzip cannot permute through can still be shared in their original order (channel i
    of every task into one neuron, every task's later ops reading it where they always did), when
    every task has the same number of them. Not a grouped conv's (its input blocks would mix) nor a
    graph input's."""
    if why.startswith(("grouped Conv", "graph input")):
        return False
    return len({layer.width for _, layer in writers}) == 1 and len({t for t, _ in writers}) > 1
