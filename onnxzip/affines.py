"""Per-channel affines that are not layers, moved into layers (exactly), so a merged trunk can run once.

A constant that scales or shifts channels outside a layer (LayerNorm's scale and bias, ConvNeXt's
layer-scale Mul) differs between two trained models. Left in place it would be written once per task,
and every shared layer after it would read a different input per task: nothing computed once. So,
on the canonical graph (layers in the forms of canonicalize.py):

- `fold_layer_scales`: Mul(layer output, per-channel constant) -> the layer's rows scaled.
- `fold_norm_affines`: LayerNormalization over the channel (last) axis whose output only feeds linear
  layers -> scale and bias folded into those layers' input columns and biases (pre-norm transformers,
  ConvNeXt blocks, heads); whose output is moved channels-first by a Transpose (ConvNeXt's
  LayerNorm2d) -> a depthwise 1x1 convolution after the Transpose, a layer merged like any other.
  Either way the LayerNorm itself is left with scale 1 and bias 0, the same in every model.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs


def fold_layer_scales(graph: gs.Graph, is_layer, const) -> None:
    """Mul(layer output, c) with c one value per output channel: c folded into the layer's rows."""
    for node in list(graph.nodes):
        if not is_layer(node):
            continue
        out = _output(node)
        if len(out.outputs) != 1 or out in graph.outputs or out.outputs[0].op != "Mul":
            continue
        mul = out.outputs[0]
        other = mul.inputs[1] if mul.inputs[0] is out else mul.inputs[0]
        scale = _per_channel(other, node, _weight(node).shape[0])
        if scale is None:
            continue
        w, b = _weight(node), _bias(node)
        shape = (-1,) + (1,) * (w.ndim - 1)
        _set_params(node, const, (w * scale.reshape(shape)).astype(w.dtype), (b * scale).astype(b.dtype))
        y = mul.outputs[0]
        mul.outputs.clear()
        _rewire(node, out, y)
    graph.cleanup().toposort()


def fold_norm_affines(graph: gs.Graph, shapes: dict, is_layer, const) -> None:
    for norm in [n for n in graph.nodes if n.op == "LayerNormalization"]:
        y = norm.outputs[0]
        shape = shapes.get(norm.inputs[0].name)
        if not shape or len(norm.inputs) < 2 or y in graph.outputs or not y.outputs:
            continue
        rank = len(shape)
        axis = int(norm.attrs.get("axis", -1))
        scale = norm.inputs[1].values if isinstance(norm.inputs[1], gs.Constant) else None
        bias_t = norm.inputs[2] if len(norm.inputs) > 2 and norm.inputs[2].name else None
        if axis % rank != rank - 1 or scale is None or (bias_t is not None and not isinstance(bias_t, gs.Constant)):
            continue  # normalizes more than the channel axis, or a computed affine
        channels = int(shape[-1])
        scale = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64)
        bias = (np.broadcast_to(bias_t.values.reshape(-1), (channels,)) if bias_t is not None
                else np.zeros(channels)).astype(np.float64)
        if np.all(scale == 1) and np.all(bias == 0):
            continue
        consumers = list(y.outputs)
        if all(is_layer(c) and c.inputs[0] is y and c.op != "Conv" for c in consumers):
            for layer in consumers:
                w, b = _weight(layer), _bias(layer)  # linear: w is (out, in), in = the normalized channels
                _set_params(layer, const, (w * scale[None, :]).astype(w.dtype), (b + w @ bias).astype(b.dtype))
        elif (len(consumers) == 1 and consumers[0].op == "Transpose" and 3 <= rank <= 5
              and list(consumers[0].attrs.get("perm", []))[1:2] == [rank - 1]):
            transpose = consumers[0]
            moved = transpose.outputs[0]
            dtype = norm.inputs[1].values.dtype
            staged = gs.Variable(f"{moved.name}.affine_in", dtype=moved.dtype)
            transpose.outputs[0] = staged
            name = f"{norm.name}/affine"
            graph.nodes.append(gs.Node(
                "Conv", name=name,
                attrs={"kernel_shape": [1] * (rank - 2), "strides": [1] * (rank - 2),
                       "dilations": [1] * (rank - 2), "group": channels, "pads": [0] * 2 * (rank - 2)},
                inputs=[staged, const(name, "W", scale.reshape((channels, 1) + (1,) * (rank - 2)).astype(dtype)),
                        const(name, "B", bias.astype(dtype))],
                outputs=[moved]))
            shapes[staged.name] = shapes.get(moved.name)
        else:
            continue
        dtype = norm.inputs[1].values.dtype
        inputs = [norm.inputs[0], const(norm.name, "ones", np.ones(norm.inputs[1].values.shape, dtype))]
        if bias_t is not None:
            inputs.append(const(norm.name, "zeros", np.zeros(bias_t.values.shape, bias_t.values.dtype)))
        norm.inputs.clear()
        norm.inputs.extend(inputs)
    graph.cleanup().toposort()


# --- canonical layers (canonicalize.py): Conv / Gemm(transB=1) with constant W, B; or the channels-last
# linear Transpose(W) -> MatMul -> Add(B)
def _weight_holder(node: gs.Node) -> tuple[gs.Node, int]:
    return (node.inputs[1].inputs[0], 0) if node.op == "MatMul" else (node, 1)


def _bias_holder(node: gs.Node) -> tuple[gs.Node, int]:
    if node.op == "MatMul":
        add = node.outputs[0].outputs[0]
        return add, next(i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant))
    return node, 2


def _weight(node: gs.Node) -> np.ndarray:
    holder, i = _weight_holder(node)
    return holder.inputs[i].values


def _bias(node: gs.Node) -> np.ndarray:
    holder, i = _bias_holder(node)
    return holder.inputs[i].values.reshape(-1)


def _set_params(node: gs.Node, const, w: np.ndarray, b: np.ndarray) -> None:
    holder, i = _weight_holder(node)
    holder.inputs[i] = const(node.name, "W", w)
    holder, i = _bias_holder(node)
    holder.inputs[i] = const(node.name, "B", b.reshape(holder.inputs[i].values.shape))


def _output(node: gs.Node) -> gs.Tensor:
    return node.outputs[0].outputs[0].outputs[0] if node.op == "MatMul" else node.outputs[0]


def _rewire(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    producer = node.outputs[0].outputs[0] if node.op == "MatMul" else node
    producer.outputs[producer.outputs.index(old)] = new


def _per_channel(t: gs.Tensor, layer: gs.Node, channels: int) -> Optional[np.ndarray]:
    """The constant's values when it holds one value per output channel of `layer` on its channel axis."""
    if not isinstance(t, gs.Constant):
        return None
    v = t.values
    if v.size != channels or channels == 1:
        return None
    dims = [d for d in v.shape if d != 1]
    if dims != [channels]:
        return None
    if layer.op == "Conv":  # channel axis 1 of (N, C, ...): v must be (C, 1, ...) or (1, C, 1, ...)
        rank = layer.inputs[1].values.ndim
        if v.ndim < rank - 1 or v.shape[v.ndim - (rank - 1)] != channels:
            return None
    elif v.shape[-1] != channels:  # linear: the last axis
        return None
    return v.reshape(-1).astype(np.float64)
