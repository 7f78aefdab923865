"""Channel groups: which channel axes must be permuted (paired) together, derived from the graph.

Git Re-Basin writes a "permutation spec" by hand per architecture; here it is computed. Every Conv/
Gemm output starts a group; ops that carry channels through (activations, pooling, Flatten) pass the
layout on; ops that combine tensors (residual Add) tie groups with a union-find. A node onnxzip does
not understand "freezes" the groups it reads: they keep their original order and are never shared,
so the merged model stays correct (it just shares less), and the report says which node did it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .canonicalize import CanonicalModel, Layer

# Ops that map each channel to the same channel, whatever else they do (elementwise, pooling).
PASS_THROUGH = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Clip", "Neg", "Abs", "Erf", "Exp", "Log", "Sqrt", "Reciprocal",
    "ThresholdedRelu", "Shrink", "Swish", "Cast",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow"}
# Ops whose extra inputs/attributes never index channels (scalars, spatial sizes).
SCALAR_EXTRA_INPUTS = {"Clip", "Pow"}


@dataclass(frozen=True)
class Segment:
    """`size` channels of one group; each owns `inner` consecutive positions of the axis."""

    group: int
    size: int
    inner: int = 1


@dataclass(frozen=True)
class Layout:
    """How a tensor's channel axis is made of groups."""

    axis: int
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(s.size * s.inner for s in self.segments)


@dataclass
class ConstUse:
    """A constant input that indexes channels (per-channel scale, standalone BN parameter)."""

    node: gs.Node
    input_index: int
    axis: int  # axis of the constant that runs over the layout
    layout: Layout


@dataclass
class ChannelGraph:
    """The channel groups of one canonical model."""

    model: CanonicalModel
    layouts: dict[str, Layout] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)  # group -> why it is never shared
    input_group: dict[str, int] = field(default_factory=dict)  # graph input -> group
    layer_out: dict[int, int] = field(default_factory=dict)  # layer index -> output group
    layer_in: dict[int, Optional[Layout]] = field(default_factory=dict)  # layer index -> input layout
    const_uses: list[ConstUse] = field(default_factory=list)

    def new_group(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def freeze(self, layout: Optional[Layout], reason: str) -> None:
        for seg in layout.segments if layout else ():
            self.frozen.setdefault(seg.group, reason)

    def frozen_reason(self, group: int) -> Optional[str]:
        root = self.find(group)
        for g, reason in self.frozen.items():
            if self.find(g) == root:
                return reason
        return None

    def root_layout(self, layout: Layout) -> Layout:
        return Layout(layout.axis, tuple(Segment(self.find(s.group), s.size, s.inner) for s in layout.segments))

    def writers(self, group: int) -> list[Layer]:
        root = self.find(group)
        return [l for l in self.model.layers if self.find(self.layer_out[l.index]) == root]


def analyze(model: CanonicalModel) -> ChannelGraph:
    """Derive channel groups for `model` (see module docstring)."""
    cg = ChannelGraph(model)
    layers = {id(l.node): l for l in model.layers}
    for spec in model.inputs:
        if len(spec.shape) >= 2 and spec.shape[1] is not None:
            g = cg.new_group(spec.shape[1])
            cg.input_group[spec.name] = g
            cg.layouts[spec.name] = Layout(1, (Segment(g, spec.shape[1]),))
            cg.frozen[g] = "graph input"
    for node in model.graph.nodes:
        layer = layers.get(id(node))
        if layer is not None:
            _layer(cg, layer)
        else:
            _node(cg, node)
    for out in model.graph.outputs:
        cg.freeze(cg.layouts.get(out.name), f"graph output '{out.name}'")
    return cg


def _layer(cg: ChannelGraph, layer: Layer) -> None:
    layout = cg.layouts.get(layer.input)
    if layout is not None and layout.axis != 1:
        cg.freeze(layout, f"{layer.node.op} '{layer.name}' reads channels on axis {layout.axis}")
        layout = None
    cg.layer_in[layer.index] = layout
    if layer.groups > 1:
        # Grouped/depthwise convolutions tie input and output channels; handled as a later extension.
        cg.freeze(layout, f"grouped Conv '{layer.name}'")
        out = cg.new_group(layer.width)
        cg.frozen[out] = f"grouped Conv '{layer.name}'"
    else:
        out = cg.new_group(layer.width)
    cg.layer_out[layer.index] = out
    cg.layouts[layer.output] = Layout(1, (Segment(out, layer.width),))


def _node(cg: ChannelGraph, node: gs.Node) -> None:
    shapes = cg.model.shapes
    ins = [(i, t, cg.layouts.get(t.name)) for i, t in enumerate(node.inputs) if t.name]
    carried = [(i, t, lay) for i, t, lay in ins if lay is not None]
    if not carried:
        return
    out = node.outputs[0] if node.outputs else None
    why = f"{node.op} node '{node.name}'"

    if node.op in PASS_THROUGH or (node.op == "Dropout"):
        i, t, lay = carried[0]
        extra = [c for c in carried[1:]]
        if i != 0 or extra or not _scalar_extras(node):
            _freeze_all(cg, carried, why)
            return
        cg.layouts[out.name] = lay
        if node.op == "PRelu":
            _const_use(cg, node, 1, lay, why)
        return

    if node.op == "Flatten":
        i, t, lay = carried[0]
        shape = shapes.get(t.name)
        axis = int(node.attrs.get("axis", 1))
        if lay.axis == 1 and axis == 1 and shape and None not in shape[1:]:
            inner = int(np.prod(shape[2:], dtype=np.int64))
            cg.layouts[out.name] = Layout(1, tuple(Segment(s.group, s.size, s.inner * inner)
                                                   for s in lay.segments))
        else:
            cg.freeze(lay, why)
        return

    if node.op in ELEMENTWISE:
        out_shape = shapes.get(out.name)
        first = carried[0][2]
        for _, t, lay in carried[1:]:
            if not _same_structure(lay, first) or _rank(shapes, t.name) != len(out_shape or ()):
                _freeze_all(cg, carried, why)
                return
            for a, b in zip(lay.segments, first.segments):
                cg.union(a.group, b.group)
        if _rank(shapes, carried[0][1].name) != len(out_shape or ()):
            _freeze_all(cg, carried, why)
            return
        for i, t, lay in ins:
            if lay is None and not _per_channel_const(cg, node, i, first, why):
                _freeze_all(cg, carried, why)
                return
        cg.layouts[out.name] = first
        return

    if node.op == "BatchNormalization" and carried[0][0] == 0 and len(carried) == 1:
        lay = carried[0][2]
        if lay.axis == 1 and all(s.inner == 1 for s in lay.segments):
            for i in range(1, 5):
                _const_use(cg, node, i, lay, why, const_axis=0)
            cg.layouts[out.name] = lay
            return

    if node.op in ("Softmax", "LogSoftmax") and len(carried) == 1:
        # Softmax over channels is permutation-equivariant; any other axis leaves channels alone.
        cg.layouts[out.name] = carried[0][2]
        return

    _freeze_all(cg, carried, why)


def _scalar_extras(node: gs.Node) -> bool:
    """Extra inputs (Clip's min/max...) must be scalars, or per-channel constants for PRelu."""
    for t in node.inputs[1:]:
        if not t.name:
            continue
        if node.op == "PRelu":
            continue
        if not isinstance(t, gs.Constant) or t.values.size != 1:
            return False
    return True


def _same_structure(a: Layout, b: Layout) -> bool:
    return a.axis == b.axis and [(s.size, s.inner) for s in a.segments] == [(s.size, s.inner) for s in b.segments]


def _rank(shapes, name: str) -> int:
    return len(shapes.get(name) or ())


def _per_channel_const(cg: ChannelGraph, node: gs.Node, index: int, lay: Layout, why: str) -> bool:
    """A constant operand of an elementwise op: fine if it broadcasts over channels, recorded if it
    holds one value per channel (so each task's copy can be permuted)."""
    t = node.inputs[index]
    if not isinstance(t, gs.Constant):
        return False
    out_rank = _rank(cg.model.shapes, node.outputs[0].name)
    shape = (1,) * (out_rank - t.values.ndim) + tuple(t.values.shape)
    if shape[lay.axis] == 1:
        return True
    if shape[lay.axis] != lay.length:
        return False
    cg.const_uses.append(ConstUse(node, index, lay.axis - (out_rank - t.values.ndim), lay))
    return True


def _const_use(cg: ChannelGraph, node: gs.Node, index: int, lay: Layout, why: str,
               const_axis: Optional[int] = None) -> None:
    t = node.inputs[index]
    if not isinstance(t, gs.Constant):
        cg.freeze(lay, why)
        return
    if t.values.size == 1:
        return
    axis = const_axis if const_axis is not None else t.values.ndim - (
        _rank(cg.model.shapes, node.outputs[0].name) - lay.axis)
    if axis < 0 or t.values.shape[axis] != lay.length:
        cg.freeze(lay, why)
        return
    cg.const_uses.append(ConstUse(node, index, axis, lay))


def _freeze_all(cg: ChannelGraph, carried, why: str) -> None:
    for _, _, lay in carried:
        cg.freeze(lay, why)
