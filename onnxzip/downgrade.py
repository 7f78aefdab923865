"""Bring a model down to an older opset (e.g. 18-20 from PyTorch's dynamo exporter to 17 for TensorRT
8.5 and 8.6). onnx's version converter mistranslates some ops on the way down (ReduceMean 18 -> 17 keeps
its axes as an input, which opset 17 does not have), so the few ops whose inputs or attributes
changed between opsets 11 and 23 are rewritten here, newer ops that have an older equivalent (Gelu,
LayerNormalization) are decomposed, and every other op, whose later versions only added types, keeps
its node under the older opset. The caller checks the result in onnxruntime.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InvalidOptionsError

_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"}
_AXES_13 = {"ReduceSum", "Squeeze", "Unsqueeze"}
# Ops decomposed into older ones, and the opset their decomposition needs.
_DECOMPOSED = {"Gelu": 11, "LayerNormalization": 11}


def lowest_opset(model: onnx.ModelProto) -> int:
    """The oldest default-domain opset this module can bring the model to."""
    floor = 11
    for node in _nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        floor = max(floor, _DECOMPOSED.get(node.op_type) or _first_version(node.op_type))
    return floor


def downgrade(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of `model` in default-domain opset `target` (older than its own)."""
    lowest = lowest_opset(model)
    if target < lowest:
        raise InvalidOptionsError(f"target_opset {target}: the model uses ops that need opset {lowest} or newer; "
                                  f"the lowest opset it can be written in is {lowest}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(helper.get_attribute_value(n.attribute[0]))
                   for n in out.graph.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    nodes = []
    for node in out.graph.node:
        nodes += _rewrite(node, target, consts, out.graph)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = target
    return out


def _rewrite(node: onnx.NodeProto, target: int, consts: dict, graph) -> list[onnx.NodeProto]:
    if node.domain not in ("", "ai.onnx"):
        return [node]
    op = node.op_type
    if op in _REDUCE_18 and target < 18 or op in _AXES_13 and target < 13:
        return [_axes_to_attribute(node, consts)]
    if op == "Split":
        return [_split(node, target, consts, graph)]
    if op == "Pad" and target < 18 and len(node.input) > 3 and node.input[3]:
        raise InvalidOptionsError(f"target_opset {target}: Pad '{node.name}' pads only some axes, which needs opset 18")
    if op == "Resize" and target < 18:
        _drop_default_attributes(node, {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"})
        if len(node.input) > 4:
            raise InvalidOptionsError(f"target_opset {target}: Resize '{node.name}' resizes chosen axes (opset 18)")
    if op == "Cast" and target < 19:
        _drop_default_attributes(node, {"saturate": 1})
    if op == "AveragePool" and target < 19:
        _drop_default_attributes(node, {"dilations": [1] * _spatial_rank(node)})
    if op == "Reshape" and target < 14:
        _drop_default_attributes(node, {"allowzero": 0})
    if op == "Gelu" and target < 20:
        return _gelu(node)
    if op == "LayerNormalization" and target < 17:
        return _layer_norm(node, consts)
    return [node]


def _axes_to_attribute(node: onnx.NodeProto, consts: dict) -> onnx.NodeProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.pop("noop_with_empty_axes", 0):
        raise InvalidOptionsError(f"{node.op_type} '{node.name}' uses noop_with_empty_axes, which older opsets lack")
    inputs = list(node.input)
    if len(inputs) > 1 and inputs[1]:
        if inputs[1] not in consts:
            raise InvalidOptionsError(f"{node.op_type} '{node.name}' takes computed axes, which older opsets cannot")
        attrs["axes"] = [int(a) for a in np.ravel(consts[inputs[1]])]
    return helper.make_node(node.op_type, inputs[:1], list(node.output), name=node.name, **attrs)


def _split(node: onnx.NodeProto, target: int, consts: dict, graph) -> onnx.NodeProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input)
    parts = attrs.pop("num_outputs", None)
    sizes = [int(v) for v in np.ravel(consts[inputs[1]])] if len(inputs) > 1 and inputs[1] in consts else None
    if parts is not None and sizes is None:  # opset 18's equal parts: the outputs' shapes give the sizes
        sizes = _split_sizes(node, attrs.get("axis", 0), graph)
        if sizes is None and target >= 13:
            # older Split without sizes cuts equal parts too; opset 18 also allows a smaller last part,
            # which the caller's check in onnxruntime refuses
            return helper.make_node("Split", inputs[:1], list(node.output), name=node.name, **attrs)
    if target < 13:
        if sizes is None and parts is not None:
            raise InvalidOptionsError(f"target_opset: Split '{node.name}' into equal parts needs known output shapes")
        if sizes is not None:
            attrs["split"] = sizes
        return helper.make_node("Split", inputs[:1], list(node.output), name=node.name, **attrs)
    if sizes is not None and parts is not None:
        name = f"{node.name}/split_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), name))
        inputs = inputs[:1] + [name]
    return helper.make_node("Split", inputs, list(node.output), name=node.name, **attrs)


def _split_sizes(node, axis: int, graph) -> Optional[list[int]]:
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    sizes = []
    for out in node.output:
        dims = shapes.get(out)
        if not dims or not dims[axis]:
            return None
        sizes.append(dims[axis])
    return sizes


def _spatial_rank(node: onnx.NodeProto) -> int:
    return next((len(helper.get_attribute_value(a)) for a in node.attribute if a.name == "kernel_shape"), 2)


def _drop_default_attributes(node: onnx.NodeProto, defaults: dict) -> None:
    keep = []
    for attr in node.attribute:
        if attr.name in defaults:
            if helper.get_attribute_value(attr) != defaults[attr.name]:
                raise InvalidOptionsError(f"{node.op_type} '{node.name}': {attr.name} needs a newer opset")
            continue
        keep.append(attr)
    del node.attribute[:]
    node.attribute.extend(keep)


def _gelu(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Gelu (opset 20) as Erf (exact) or Tanh (approximate='tanh') arithmetic."""
    x, y, name = node.input[0], node.output[0], node.name
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    t = lambda s: f"{name}/{s}"  # noqa: E731

    def const(label, value):
        return helper.make_node("Constant", [], [t(label)], name=t(label),
                                value=numpy_helper.from_array(np.array(value, np.float32), t(label)))

    if attrs.get("approximate", b"none") in (b"tanh", "tanh"):
        return [const("c", 0.044715), const("k", math.sqrt(2 / math.pi)), const("half", 0.5), const("one", 1.0),
                helper.make_node("Mul", [x, x], [t("x2")], name=t("x2")),
                helper.make_node("Mul", [t("x2"), x], [t("x3")], name=t("x3")),
                helper.make_node("Mul", [t("x3"), t("c")], [t("cx3")], name=t("cx3")),
                helper.make_node("Add", [x, t("cx3")], [t("inner")], name=t("inner")),
                helper.make_node("Mul", [t("inner"), t("k")], [t("arg")], name=t("arg")),
                helper.make_node("Tanh", [t("arg")], [t("tanh")], name=t("tanh")),
                helper.make_node("Add", [t("tanh"), t("one")], [t("onep")], name=t("onep")),
                helper.make_node("Mul", [x, t("half")], [t("hx")], name=t("hx")),
                helper.make_node("Mul", [t("hx"), t("onep")], [y], name=name)]
    return [const("sqrt2", math.sqrt(2.0)), const("half", 0.5), const("one", 1.0),
            helper.make_node("Div", [x, t("sqrt2")], [t("scaled")], name=t("scaled")),
            helper.make_node("Erf", [t("scaled")], [t("erf")], name=t("erf")),
            helper.make_node("Add", [t("erf"), t("one")], [t("onep")], name=t("onep")),
            helper.make_node("Mul", [x, t("half")], [t("hx")], name=t("hx")),
            helper.make_node("Mul", [t("hx"), t("onep")], [y], name=name)]


def _layer_norm(node: onnx.NodeProto, consts: dict) -> list[onnx.NodeProto]:
    """LayerNormalization (opset 17) as ReduceMean arithmetic, over the axes from `axis` to the last."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.output) > 1 and any(node.output[1:]):
        raise InvalidOptionsError(f"LayerNormalization '{node.name}' outputs its statistics (opset 17 only)")
    axis, eps = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    scale = consts.get(node.input[1])
    if scale is None or axis != -1 and axis != -1 % (scale.ndim + 1):
        raise InvalidOptionsError(f"LayerNormalization '{node.name}' over several axes needs opset 17")
    x, y, name = node.input[0], node.output[0], node.name
    t = lambda s: f"{name}/{s}"  # noqa: E731
    out = [helper.make_node("ReduceMean", [x], [t("mean")], name=t("mean"), axes=[-1]),
           helper.make_node("Sub", [x, t("mean")], [t("centred")], name=t("centred")),
           helper.make_node("Mul", [t("centred"), t("centred")], [t("square")], name=t("square")),
           helper.make_node("ReduceMean", [t("square")], [t("var")], name=t("var"), axes=[-1]),
           helper.make_node("Constant", [], [t("eps")], name=t("eps"),
                            value=numpy_helper.from_array(np.array(eps, np.float32), t("eps"))),
           helper.make_node("Add", [t("var"), t("eps")], [t("vareps")], name=t("vareps")),
           helper.make_node("Sqrt", [t("vareps")], [t("std")], name=t("std")),
           helper.make_node("Div", [t("centred"), t("std")], [t("normed")], name=t("normed"))]
    has_bias = len(node.input) > 2 and node.input[2]
    out.append(helper.make_node("Mul", [t("normed"), node.input[1]], [t("scaled") if has_bias else y],
                                name=t("scale") if has_bias else name))
    if has_bias:
        out.append(helper.make_node("Add", [t("scaled"), node.input[2]], [y], name=name))
    return out


def _first_version(op: str) -> int:
    """The opset that introduced a default-domain op."""
    return _first_versions().get(op, 11)


@functools.lru_cache(maxsize=1)
def _first_versions() -> dict[str, int]:
    first: dict[str, int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            first[schema.name] = min(first.get(schema.name, schema.since_version), schema.since_version)
    return first


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
