"""Channel groups: which channel axes must be permuted (paired) together, derived from the graph.

Git Re-Basin writes a "permutation spec" by hand per architecture; here it is computed. Every Conv/
Gemm output starts a group; ops that carry channels through (activations, pooling, Pad, Resize,
Flatten, Transpose, Concat, Split) pass the layout on; ops that combine tensors elementwise
(residual Add, squeeze-excite Mul) tie groups with a union-find; a depthwise conv ties its input and
output channels. A node onnxzip does not understand "freezes" the groups it reads: they keep their
original order and are never shared, so the merged model stays correct (it just shares less), and
the report says which node did it.

Tensors computed from graph inputs alone (before any layer) are "input-derived": they are never
permuted, so any op may touch them; a layer reading one reads a fixed, shared input space.
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
    "ThresholdedRelu", "Shrink", "Swish", "Cast", "Dropout", "Identity", "Round", "Floor", "Ceil", "Sign",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
    "Softmax", "LogSoftmax",  # over channels: permutation-equivariant; over other axes: channel-wise
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow"}
# Ops whose output depends only on the shape of their input, never on channel order.
ORDER_FREE = {"Shape", "Size"}


@dataclass(frozen=True)
class Segment:
    """`size` channels of one group; each owns `inner` consecutive positions of the axis."""

    group: int
    size: int
    inner: int = 1


@dataclass(frozen=True)
class Layout:
    """How a tensor's channel axis is made of groups; the whole pattern repeats `outer` times
    (an NHWC tensor flattened to (N, H*W*C) has outer = H*W)."""

    axis: int
    segments: tuple[Segment, ...]
    outer: int = 1

    @property
    def length(self) -> int:
        return self.outer * sum(s.size * s.inner for s in self.segments)

    def structure(self) -> tuple:
        return (self.axis, self.outer, tuple((s.size, s.inner) for s in self.segments))


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
    input_derived: dict[str, frozenset] = field(default_factory=dict)  # tensor -> graph inputs it comes from
    input_group: dict[tuple, int] = field(default_factory=dict)  # (graph inputs, width) -> fixed group
    layer_out: dict[int, int] = field(default_factory=dict)  # layer index -> output group
    layer_in: dict[int, Optional[Layout]] = field(default_factory=dict)  # layer index -> input layout
    const_uses: list[ConstUse] = field(default_factory=list)
    statistics: set[str] = field(default_factory=set)  # tensors reduced over a channel axis (channel_ops.py)
    opaque: set[int] = field(default_factory=set)  # groups standing for inputs whose layout is not followed

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

    def is_input_group(self, group: int) -> bool:
        root = self.find(group)
        return any(self.find(g) == root for g in self.input_group.values())

    def writers(self, group: int) -> list[Layer]:
        root = self.find(group)
        return [l for l in self.model.layers if self.find(self.layer_out[l.index]) == root]


def analyze(model: CanonicalModel) -> ChannelGraph:
    """Derive channel groups for `model` (see module docstring)."""
    cg = ChannelGraph(model)
    layers = {id(l.node): l for l in model.layers}
    for spec in model.inputs:
        cg.input_derived[spec.name] = frozenset([spec.name])
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
    width_in = int(layer.weight.shape[1]) * layer.groups
    sources = cg.input_derived.get(layer.input)
    if sources is not None:
        key = (sources, width_in)
        if key not in cg.input_group:
            cg.input_group[key] = cg.new_group(width_in)
            cg.frozen[cg.input_group[key]] = "graph input"
        axis = 1 if layer.kind == "conv" else _rank(cg, layer.input) - 1
        layout = Layout(axis, (Segment(cg.input_group[key], width_in),))
    else:
        layout = cg.layouts.get(layer.input)
    in_axis = 1 if layer.kind == "conv" else _rank(cg, layer.input) - 1  # linear layers: channels last
    if layout is not None and (layout.axis != in_axis or (layout.outer != 1 and layer.kind == "conv")):
        cg.freeze(layout, f"{layer.node.op} '{layer.name}' reads channels laid out on axis {layout.axis}")
        layout = None
    if layout is None:
        # Channels onnxzip does not follow (an attention's heads, an unknown op): one opaque group the
        # layer reads as columns of its own in each task; its outputs can still be shared.
        opaque = cg.new_group(width_in)
        cg.frozen[opaque] = f"the input of {layer.node.op} '{layer.name}', which onnxzip does not follow"
        cg.opaque.add(opaque)
        layout = Layout(in_axis, (Segment(opaque, width_in),))
    cg.layer_in[layer.index] = layout
    if layer.depthwise and layout is not None and len(layout.segments) == 1 and layout.segments[0].inner == 1:
        out = layout.segments[0].group  # a depthwise conv keeps each channel: same group in and out
    else:
        out = cg.new_group(layer.width)
        if layer.groups > 1:  # grouped (not depthwise) convs mix channels within blocks: keep as is
            cg.freeze(layout, f"grouped Conv '{layer.name}'")
            cg.frozen[out] = f"grouped Conv '{layer.name}'"
    cg.layer_out[layer.index] = out
    out_axis = 1 if layer.kind == "conv" else _rank(cg, layer.output) - 1
    cg.layouts[layer.output] = Layout(out_axis, (Segment(out, layer.width),))


def _node(cg: ChannelGraph, node: gs.Node) -> None:
    ins = [(i, t, cg.layouts.get(t.name)) for i, t in enumerate(node.inputs) if t.name]
    carried = [(i, t, lay) for i, t, lay in ins if lay is not None]
    derived = [cg.input_derived[t.name] for _, t, _ in ins if t.name in cg.input_derived]
    if not carried:
        if any(t.name in cg.statistics for _, t, _ in ins):  # computed from statistics: one as well
            cg.statistics.update(out.name for out in node.outputs)
        elif derived and node.op not in ORDER_FREE:
            for out in node.outputs:
                cg.input_derived[out.name] = frozenset().union(*derived)
        return
    if node.op in ORDER_FREE:
        return
    why = f"{node.op} node '{node.name}'"
    handler = HANDLERS.get(node.op)
    if derived or handler is None or not handler(cg, node, carried, why):
        _freeze_all(cg, carried, why)


def _set(cg: ChannelGraph, node: gs.Node, layout: Layout, index: int = 0) -> bool:
    cg.layouts[node.outputs[index].name] = layout
    return True


def _shape(cg: ChannelGraph, name: str):
    return cg.model.shapes.get(name)


def _rank(cg: ChannelGraph, name: str) -> int:
    return len(_shape(cg, name) or ())


def _ints(node: gs.Node, attr: str, input_index: int):
    """An int-list argument given as attribute (older opsets) or constant input (newer)."""
    if attr in node.attrs:
        return [int(v) for v in np.ravel(node.attrs[attr])]
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        t = node.inputs[input_index]
        return [int(v) for v in np.ravel(t.values)] if isinstance(t, gs.Constant) else None
    return []


def _pass_through(cg, node, carried, why) -> bool:
    i, t, lay = carried[0]
    if i != 0 or len(carried) > 1:
        return False
    for t_extra in node.inputs[1:]:
        if not t_extra.name:
            continue
        if node.op == "PRelu":
            if not _const_use(cg, node, 1, lay, axis_from_end=True):
                return False
        elif not isinstance(t_extra, gs.Constant) or t_extra.values.size != 1:
            return False
    return _set(cg, node, lay)


def _elementwise(cg, node, carried, why, skip=()) -> bool:
    """Same-layout operands (their groups tied) and constants that broadcast over channels (or hold one
    value per channel, permuted); `skip`: other operands already known to be fine."""
    out_rank = _rank(cg, node.outputs[0].name)
    first = carried[0][2]
    for _, t, lay in carried:
        if _rank(cg, t.name) != out_rank or lay.structure() != first.structure():
            return False
    for _, _, lay in carried[1:]:
        for a, b in zip(lay.segments, first.segments):
            cg.union(a.group, b.group)
    carried_idx = {i for i, _, _ in carried}
    for i, t in enumerate(node.inputs):
        if i not in carried_idx and t.name and t.name not in skip and not _per_channel_const(cg, node, i, first):
            return False
    return _set(cg, node, first)


def _per_channel_const(cg: ChannelGraph, node: gs.Node, index: int, lay: Layout) -> bool:
    """A constant operand: fine if it broadcasts over channels, recorded if it holds one value per
    channel (each task's copy gets permuted)."""
    t = node.inputs[index]
    if not isinstance(t, gs.Constant):
        return False
    out_rank = _rank(cg, node.outputs[0].name)
    pad = out_rank - t.values.ndim
    shape = (1,) * pad + tuple(t.values.shape)
    if shape[lay.axis] == 1:
        return True
    if shape[lay.axis] != lay.length:
        return False
    cg.const_uses.append(ConstUse(node, index, lay.axis - pad, lay))
    return True


def _const_use(cg: ChannelGraph, node: gs.Node, index: int, lay: Layout, axis: Optional[int] = None,
               axis_from_end: bool = False) -> bool:
    t = node.inputs[index]
    if not isinstance(t, gs.Constant):
        return False
    if t.values.size == 1:
        return True
    if axis is None:
        axis = t.values.ndim - (_rank(cg, node.outputs[0].name) - lay.axis) if axis_from_end else 0
    if axis < 0 or axis >= t.values.ndim or t.values.shape[axis] != lay.length:
        return False
    cg.const_uses.append(ConstUse(node, index, axis, lay))
    return True


def _batchnorm(cg, node, carried, why) -> bool:
    (i, t, lay), = carried
    if i != 0 or lay.axis != 1 or node.attrs.get("training_mode", 0):
        return False
    return all(_const_use(cg, node, k, lay, axis=0) for k in range(1, 5)) and _set(cg, node, lay)


def _flatten(cg, node, carried, why) -> bool:
    (_, t, lay), = carried
    shape = _shape(cg, t.name)
    axis = int(node.attrs.get("axis", 1))
    if axis != 1 or not shape or None in shape[1:] or lay.outer != 1:
        return False
    before = int(np.prod(shape[1:lay.axis], dtype=np.int64))
    after = int(np.prod(shape[lay.axis + 1:], dtype=np.int64))
    segments = tuple(Segment(s.group, s.size, s.inner * after) for s in lay.segments)
    return _set(cg, node, Layout(1, segments, outer=before))


def _transpose(cg, node, carried, why) -> bool:
    (_, t, lay), = carried
    perm = node.attrs.get("perm") or list(reversed(range(_rank(cg, t.name))))
    if lay.outer != 1 or any(s.inner != 1 for s in lay.segments):
        return False
    return _set(cg, node, Layout(list(perm).index(lay.axis), lay.segments))


def _reduce(cg, node, carried, why) -> bool:
    """A reduction: over other axes the channels pass through; over the channel axis it is a statistic
    (channel_ops.py: a permutation of the channels leaves it unchanged)."""
    (i, t, lay), = carried
    rank = _rank(cg, t.name)
    axes = _ints(node, "axes", 1)
    if i != 0 or axes is None or lay.outer != 1:
        return False
    axes = [a % rank for a in axes] or list(range(rank))
    if lay.axis in axes:
        cg.statistics.add(node.outputs[0].name)
        return True
    keep = node.attrs.get("keepdims", 1)
    return _set(cg, node, lay if keep else Layout(lay.axis - sum(a < lay.axis for a in axes), lay.segments))


def _pad(cg, node, carried, why) -> bool:
    (i, t, lay), = carried
    pads = _ints(node, "pads", 1)
    rank = _rank(cg, t.name)
    if i != 0 or pads is None or (pads and (pads[lay.axis] or pads[lay.axis + rank])):
        return False
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return False
    return _set(cg, node, lay)


def _resize(cg, node, carried, why) -> bool:
    (i, t, lay), = carried
    if i != 0:
        return False
    src, dst = _shape(cg, t.name), _shape(cg, node.outputs[0].name)
    return bool(src and dst and src[lay.axis] == dst[lay.axis]) and _set(cg, node, lay)


def _concat(cg, node, carried, why) -> bool:
    rank = _rank(cg, node.outputs[0].name)
    axis = int(node.attrs.get("axis", 1)) % rank
    if len(carried) != len([t for t in node.inputs if t.name]):
        return False
    lays = [lay for _, _, lay in carried]
    if any(l.outer != 1 for l in lays):
        return False
    if all(l.axis == axis for l in lays):  # concatenated channels: offset ranges
        return _set(cg, node, Layout(axis, tuple(s for l in lays for s in l.segments)))
    return _elementwise(cg, node, carried, why)  # joined along another axis: channels must match


def _split(cg, node, carried, why) -> bool:
    (i, t, lay), = carried
    rank = _rank(cg, t.name)
    axis = int(node.attrs.get("axis", 0)) % rank
    if i != 0:
        return False
    if axis != lay.axis:
        for k in range(len(node.outputs)):
            _set(cg, node, lay, k)
        return True
    sizes = [(_shape(cg, o.name) or (None,) * rank)[axis] for o in node.outputs]
    segments, out = list(lay.segments), []
    if lay.outer != 1 or None in sizes:
        return False
    for size in sizes:  # each output must take whole segments
        taken, total = [], 0
        while segments and total < size:
            seg = segments.pop(0)
            taken.append(seg)
            total += seg.size * seg.inner
        if total != size:
            return False
        out.append(Layout(axis, tuple(taken)))
    for k, layout in enumerate(out):
        _set(cg, node, layout, k)
    return True


def _squeeze(cg, node, carried, why) -> bool:
    (i, t, lay), = carried
    rank = _rank(cg, t.name)
    axes = _ints(node, "axes", 1)
    if i != 0 or axes is None:
        return False
    if node.op == "Squeeze":
        axes = [a % rank for a in axes] if axes else [k for k, d in enumerate(_shape(cg, t.name)) if d == 1]
        if lay.axis in axes:
            return False
        return _set(cg, node, Layout(lay.axis - sum(a < lay.axis for a in axes), lay.segments, lay.outer))
    out_rank = rank + len(axes)
    axis = lay.axis
    for a in sorted(x % out_rank for x in axes):
        if a <= axis:
            axis += 1
    return _set(cg, node, Layout(axis, lay.segments, lay.outer))


def _freeze_all(cg: ChannelGraph, carried, why: str) -> None:
    for _, _, lay in carried:
        cg.freeze(lay, why)


HANDLERS = {op: _pass_through for op in PASS_THROUGH}
HANDLERS.update({op: _elementwise for op in ELEMENTWISE})
HANDLERS.update({
    "BatchNormalization": _batchnorm, "Flatten": _flatten, "Transpose": _transpose,
    **{op: _reduce for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceSumSquare")},
    "Pad": _pad, "Resize": _resize, "Upsample": _resize, "Concat": _concat, "Split": _split,
    "Squeeze": _squeeze, "Unsqueeze": _squeeze,
})


from . import channel_ops  # noqa: E402,F401  (registers the handlers of today's ops)
