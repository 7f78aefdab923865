"""Channel rules for the ops of today's networks beyond classic CNNs (registered into channels.HANDLERS):
LayerNormalization and the statistics of its decomposed form, reshapes that keep the channel axis whole,
and constants that reach the channel stream through Expand (a class token).

A *statistic* is a tensor reduced over the channel axis (a mean, a variance): permuting the channels
does not change it. It may scale or shift channels (x - mean(x), x / std(x)) like a constant that
broadcasts over them, so LayerNorm written out as ReduceMean/Sub/Pow/Sqrt/Div passes channels through
just as the LayerNormalization op does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .channels import HANDLERS, ChannelGraph, ConstUse, Layout, _elementwise, _ints, _rank, _set, _shape


def layer_norm(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    """LayerNormalization over axes [axis, rank): a permutation of the channel axis passes through (the
    statistics over it do not change); scale and bias are permuted with the channels when they span it."""
    (i, t, lay), = carried
    rank = _rank(cg, t.name)
    if i != 0 or lay.outer != 1 or any(s.inner != 1 for s in lay.segments):
        return False
    if any(o.outputs or o in cg.model.graph.outputs for o in node.outputs[1:]):
        return False  # the mean / inverse std outputs carry no channel layout
    start = int(node.attrs.get("axis", -1)) % rank
    for k in (1, 2):
        if len(node.inputs) <= k or not node.inputs[k].name:
            continue
        param = node.inputs[k]
        if not isinstance(param, gs.Constant):
            return False
        if lay.axis >= start and param.values.size > 1:  # spans the channel axis: permuted with it
            axis = param.values.ndim - (rank - lay.axis)
            if axis < 0 or param.values.shape[axis] != lay.length:
                return False
            cg.const_uses.append(ConstUse(node, k, axis, lay))
    return _set(cg, node, lay)


def elementwise_with_statistics(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    """Elementwise ops whose other operands are constants or statistics that broadcast over channels."""
    first = carried[0][2]
    out_shape = _shape(cg, node.outputs[0].name) or ()
    for index, tensor in enumerate(node.inputs):
        if tensor.name in cg.statistics:
            shape = _shape(cg, tensor.name) or ()
            pad = len(out_shape) - len(shape)
            if first.axis - pad >= 0 and shape[first.axis - pad] not in (1, None):
                return False  # a statistic per channel would have to be permuted: not one
    return _elementwise(cg, node, carried, why, skip=cg.statistics)


def reshape(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    """A Reshape that keeps the channel axis whole (merges or splits only other axes) moves it; one that
    splits or merges the channel axis itself is not followed here (Flatten to a classifier is)."""
    (i, t, lay), = carried
    src, dst = _shape(cg, t.name), _shape(cg, node.outputs[0].name)
    if i != 0 or not src or not dst or lay.outer != 1 or any(s.inner != 1 for s in lay.segments):
        return False
    before = _product(src[:lay.axis])
    for axis, size in enumerate(dst):
        if _product(dst[:axis]) == before and size == src[lay.axis] and _product(dst[axis + 1:]) == \
                _product(src[lay.axis + 1:]):
            return _set(cg, node, Layout(axis, lay.segments))
    return False


def concat_with_constants(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    """Concat along another axis than the channels' (a class token before the patch tokens): inputs that
    are constants, or constants expanded, are permuted with the stream."""
    rank = _rank(cg, node.outputs[0].name)
    axis = int(node.attrs.get("axis", 1)) % rank
    lay = carried[0][2]
    if axis == lay.axis or any(l.structure() != lay.structure() for _, _, l in carried):
        return False
    carried_idx = {i for i, _, _ in carried}
    uses = []
    for index, tensor in enumerate(node.inputs):
        if index in carried_idx or not tensor.name:
            continue
        found = constant_source(tensor, lay.axis, rank)
        if found is None:
            return False
        uses.append(found)
    for _, _, other in carried[1:]:
        for a, b in zip(other.segments, lay.segments):
            cg.union(a.group, b.group)
    for reader, index, const_axis in uses:
        if reader.inputs[index].values.shape[const_axis] != lay.length:
            return False
        cg.const_uses.append(ConstUse(reader, index, const_axis, lay))
    return _set(cg, node, lay)


def constant_source(tensor: gs.Tensor, axis: int, rank: int) -> Optional[tuple[gs.Node, int, int]]:
    """The constant a tensor is expanded from (through Expand, Tile, Cast, Identity), as (the node that
    reads it, the input index, the constant's axis matching `axis` of the tensor), or None."""
    while not isinstance(tensor, gs.Constant):
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.op not in ("Expand", "Tile", "Cast", "Identity"):
            return None
        source = producer.inputs[0]
        if isinstance(source, gs.Constant):
            const_axis = axis - (rank - source.values.ndim)
            return (producer, 0, const_axis) if const_axis >= 0 else None
        tensor = source
    return None


def gather(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    """Gather along another axis than the channels' (the class token x[:, 0]): channels pass through."""
    (i, t, lay), = carried
    rank = _rank(cg, t.name)
    axis = int(node.attrs.get("axis", 0)) % rank
    indices = node.inputs[1]
    if i != 0 or axis == lay.axis or lay.outer != 1 or not isinstance(indices, gs.Constant):
        return False
    shift = indices.values.ndim - 1 if lay.axis > axis else 0
    return _set(cg, node, Layout(lay.axis + shift, lay.segments))


def slice_(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    """Slice of other axes than the channels' (tokens, positions): channels pass through."""
    (i, t, lay), = carried
    rank = _rank(cg, t.name)
    starts = _ints(node, "starts", 1)
    axes = _ints(node, "axes", 3)
    if i != 0 or starts is None or axes is None or lay.outer != 1:
        return False
    axes = [a % rank for a in axes] or list(range(len(starts)))
    return lay.axis not in axes and _set(cg, node, lay)


def _product(dims) -> int:
    """Product of dims, a symbolic (batch) dim counted as a large prime so products match only with it."""
    return int(np.prod([d if d is not None else 1_000_003 for d in dims], dtype=object))


HANDLERS.update({
    "LayerNormalization": layer_norm, "Reshape": reshape, "Gather": gather, "Slice": slice_,
})
for _op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"):
    HANDLERS[_op] = elementwise_with_statistics
_CONCAT = HANDLERS["Concat"]


def concat(cg: ChannelGraph, node: gs.Node, carried, why) -> bool:
    return _CONCAT(cg, node, carried, why) or concat_with_constants(cg, node, carried, why)


HANDLERS["Concat"] = concat
