"""Canonicalize a graph from any exporter into one form the rest of onnxzip reads.

After this pass: constant subgraphs are folded, Identity/Dropout are gone, BatchNormalization after a
Conv/Gemm is folded into it, MatMul(+Add) with a constant 2-D weight is a Gemm, every Gemm is
`Gemm(x, W[out, in], b[out], transB=1)` and every Conv has explicit pads and a bias. Each of those
Conv/Gemm nodes is a `Layer`: the unit that onnxzip pairs and merges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UnsupportedGraphError
from .load import InputSpec, input_specs
from .affines import fold_layer_scales, fold_norm_affines
from .rewrites import identity_gathers
from .runtime import make_session, _ort

Shape = tuple[Optional[int], ...]  # None marks the batch dimension


@dataclass
class Layer:
    """A layer with constant weights, in canonical form: Conv (any spatial rank, channels on axis 1),
    Gemm (rank-2 input), or a channels-last linear layer on a rank >= 3 input, written
    Transpose(W) -> MatMul -> Add(b) (ConvNeXt's and transformers' Linear). Weights are always
    `weight` (out, in, ...) and `bias` (out,)."""

    node: gs.Node  # the Conv, Gemm or MatMul
    kind: str  # "conv" or "linear"
    index: int  # position among the model's layers, in topological order

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def matmul(self) -> bool:
        return self.node.op == "MatMul"

    @property
    def weight_const(self) -> gs.Constant:
        return self.node.inputs[1].inputs[0].inputs[0] if self.matmul else self.node.inputs[1]

    @property
    def bias_const(self) -> gs.Constant:
        if self.matmul:
            add = self.node.outputs[0].outputs[0]
            return next(t for t in add.inputs if isinstance(t, gs.Constant))
        return self.node.inputs[2]

    @property
    def weight(self) -> np.ndarray:
        return self.weight_const.values

    @property
    def bias(self) -> np.ndarray:
        return self.bias_const.values.reshape(-1)

    @property
    def input(self) -> str:
        return self.node.inputs[0].name

    @property
    def output(self) -> str:
        """The pre-activation: the Conv/Gemm output, or the bias Add's after a MatMul."""
        return (self.node.outputs[0].outputs[0] if self.matmul else self.node).outputs[0].name

    @property
    def channel_axis(self) -> int:
        """Axis of the input and output channels: 1 for Conv, the last one for linear layers."""
        return 1 if self.kind == "conv" else -1

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.kind == "conv" else 1

    @property
    def depthwise(self) -> bool:
        """One filter per input channel (MobileNet's 3x3): output channel c reads input channel c only."""
        return self.groups > 1 and self.weight.shape[1] == 1 and self.width == self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:]) if self.kind == "conv" else ()

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.node.attrs.get("strides", [1] * len(self.kernel))) if self.kind == "conv" else ()

    def describe(self) -> str:
        if self.kind == "linear":
            op = "MatMul" if self.matmul else "Gemm"
            return f"{op} {self.weight.shape[1]}->{self.width}"
        k = "x".join(map(str, self.kernel))
        s = "x".join(map(str, self.strides))
        g = f" group={self.groups}" if self.groups > 1 else ""
        return f"Conv {k}/{s} {self.weight.shape[1] * self.groups}->{self.width}{g}"


@dataclass
class CanonicalModel:
    """One input model after canonicalization, with every tensor's shape (batch as None)."""

    label: str
    graph: gs.Graph
    shapes: dict[str, Shape]
    layers: list[Layer]
    opset_imports: list[onnx.OperatorSetIdProto]
    ir_version: int
    inputs: list[InputSpec]
    outputs: list[str]
    fixed_batch: Optional[int] = None  # a graph exported for one batch size only
    unread: list[str] = field(default_factory=list)  # weighted nodes that are not layers (stay per task)

    @property
    def opset(self) -> int:
        return next(o.version for o in self.opset_imports if o.domain in ("", "ai.onnx"))

    def to_onnx(self) -> onnx.ModelProto:
        return export(self.graph, self.opset_imports, self.ir_version)


def export(graph: gs.Graph, opset_imports, ir_version: int) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(opset_imports)
    model.ir_version = ir_version
    return model


def canonicalize(model: onnx.ModelProto, label: str,
                 probe: dict[str, np.ndarray]) -> CanonicalModel:
    """Bring `model` into canonical form; `probe` holds a few real input samples (axis 0)."""
    _ort()  # quiets onnxruntime, which fold_constants uses
    opsets = list(model.opset_import)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = gs.import_onnx(inferred)
    _name_nodes(graph)
    _castlike_to_cast(graph)
    graph.fold_constants(fold_shapes=True, error_ok=True).cleanup().toposort()
    _remove_identities(graph)
    identity_gathers(graph, lambda g: export(g, opsets, model.ir_version), probe)
    shapes, fixed_batch, mixed = probe_shapes(graph, opsets, model.ir_version, probe, label)
    _unflattened_linears(graph, shapes)
    _reshape_to_flatten(graph, shapes)
    _matmul_to_gemm(graph, shapes)
    _channels_last_linears(graph, shapes)
    _normalize_gemms(graph)
    _normalize_convs(graph, shapes)
    _fold_batchnorms(graph)
    fold_norm_affines(graph, shapes, _is_layer, _const)
    fold_layer_scales(graph, _is_layer, _const)
    graph.cleanup().toposort()
    # a layer whose rows mix samples with windows is not read (its weights stay per task, reported)
    mixing = {id(n) for n in graph.nodes if _is_layer(n) and {n.inputs[0].name, n.outputs[0].name} & mixed}
    layers = [Layer(node, "conv" if node.op == "Conv" else "linear", 0)
              for node in graph.nodes if _is_layer(node) and id(node) not in mixing]
    for i, layer in enumerate(layers):
        layer.index = i
    return CanonicalModel(label=label, graph=graph, shapes=shapes, layers=layers, opset_imports=opsets,
                          ir_version=model.ir_version, inputs=input_specs(model),
                          outputs=[o.name for o in model.graph.output], fixed_batch=fixed_batch,
                          unread=_unread(graph, shapes, mixing))


def _unread(graph: gs.Graph, shapes: dict[str, Shape], mixing: set[int]) -> list[str]:
    """Nodes with constant weights that onnxzip does not merge (they stay per task), and why."""
    out = []
    for node in graph.nodes:
        if id(node) in mixing:
            out.append(f"{node.op} '{node.name}' (its batch axis mixes samples with windows)")
            continue
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or _is_layer(node):
            continue
        weight = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            continue  # a product of two activations (attention): no weights to merge
        if node.op == "Conv":
            why = f"a {weight.ndim - 2}-D convolution" if not 3 <= weight.ndim <= 5 else "a Conv it cannot read"
        elif node.op == "MatMul":
            why = f"a MatMul on a rank-{len(shapes.get(node.inputs[0].name) or ())} input"
        else:
            why = {"ConvTranspose": "a transposed convolution"}.get(node.op, "weights onnxzip cannot read")
        out.append(f"{node.op} '{node.name}' ({why})")
    return out


def _is_layer(node: gs.Node) -> bool:
    if node.op == "MatMul":
        return _is_linear_matmul(node)
    if node.op not in ("Conv", "Gemm") or len(node.inputs) != 3:
        return False
    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return False
    if node.op == "Conv":
        return 3 <= node.inputs[1].values.ndim <= 5  # 1-D, 2-D and 3-D convolutions
    return node.attrs.get("transB") == 1 and not node.attrs.get("transA", 0)


def set_inputs(node: gs.Node, tensors) -> None:
    tensors = list(tensors)  # may alias node.inputs
    node.inputs.clear()
    node.inputs.extend(tensors)


def set_outputs(node: gs.Node, tensors) -> None:
    tensors = list(tensors)
    node.outputs.clear()
    node.outputs.extend(tensors)


def _constant(t) -> Optional[np.ndarray]:
    return t.values if isinstance(t, gs.Constant) else None


def _single_consumer(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return len(tensor.outputs) == 1 and tensor not in graph.outputs


def _name_nodes(graph: gs.Graph) -> None:
    """Every node gets a name (ONNX allows none; onnxzip names merged nodes and layers after them)."""
    taken = {node.name for node in graph.nodes}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _castlike_to_cast(graph: gs.Graph) -> None:
    """CastLike(c, x) only reads x's type: as Cast(c, to=type of x) it folds when c is constant.
    (PyTorch's dynamo exporter builds a missing Conv bias as Expand(CastLike(0, x), ...).)"""
    for node in graph.nodes:
        if node.op == "CastLike" and len(node.inputs) == 2 and node.inputs[1].dtype is not None:
            node.op = "Cast"
            node.attrs = {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(node.inputs[1].dtype))}
            set_inputs(node, node.inputs[:1])


def _remove_identities(graph: gs.Graph) -> None:
    """Drop Identity and inference-mode Dropout nodes, wiring consumers to their input."""
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Dropout"):
            continue
        if node.op == "Dropout" and (len(node.inputs) > 2 and _constant(node.inputs[2]) is not None
                                     and bool(_constant(node.inputs[2]))):
            continue  # training-mode dropout: leave it; channel analysis will refuse to share across it
        if any(o.outputs for o in node.outputs[1:]) or node.outputs[0] in graph.outputs:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        for consumer in list(dst.outputs):
            set_inputs(consumer, [src if t is dst else t for t in consumer.inputs])
        node.outputs.clear()
    graph.cleanup()


def probe_shapes(graph: gs.Graph, opsets, ir_version: int, probe: dict[str, np.ndarray],
                 label: str) -> tuple[dict[str, Shape], Optional[int]]:
    """Every tensor's shape, read by running the graph on 1 and 2 samples: dims that change are batch.
    Also the tensors whose batch axis mixes samples with something else (see the end).

    Exporters leave shapes symbolic in different ways; running the graph is the one source that is
    always right.
    """
    model = export(graph, opsets, ir_version)
    known = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in known and tensor.dtype is not None:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
            model.graph.output.append(onnx.helper.make_tensor_value_info(tensor.name, elem, None))
    try:
        session = make_session(model, ["CPUExecutionProvider"])
    except Exception as err:
        raise UnsupportedGraphError(
            f"'{label}': onnxruntime cannot load the graph ({str(err).splitlines()[0][:300]})") from err
    names = [o.name for o in session.get_outputs()]
    feed_names = {i.name for i in session.get_inputs()}
    fixed = {d for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)
             for d in [i.shape[0]]}
    fixed_batch = fixed.pop() if len(fixed) == 1 else None
    sizes = [fixed_batch] if fixed_batch else [1, 2]
    runs = []
    for n in sizes:
        feeds = {k: v[:n] for k, v in probe.items() if k in feed_names}
        if any(len(v) < n for v in feeds.values()):
            raise UnsupportedGraphError(f"'{label}' needs {n} probe samples per input")
        try:
            runs.append(dict(zip(names, (np.shape(x) for x in session.run(names, feeds)))))
        except Exception as err:
            raise UnsupportedGraphError(
                f"'{label}' fails to run in onnxruntime on the calibration samples "
                f"({str(err).splitlines()[0][:300]})") from err
    feed_shapes = [{k: v[:n].shape for k, v in probe.items()} for n in sizes]
    shapes: dict[str, Shape] = {}
    for name in set(runs[0]) | set(feed_shapes[0]):
        variants = [r.get(name) or f.get(name) for r, f in zip(runs, feed_shapes)]
        first = variants[0]
        if any(v is None or len(v) != len(first) for v in variants):
            continue
        shapes[name] = tuple(d if all(v[i] == d for v in variants) else None for i, d in enumerate(first))
    # Tensors whose batch axis holds more than the samples (Swin's windows: (N * windows, T, C)): there
    # the batch axis does not grow 1 -> 2 between the probe runs.
    mixed = {name for name, shape in shapes.items() if len(runs) == 2 and name in runs[0]
             and any(d is None and (runs[0][name][i], runs[1][name][i]) != (1, 2) for i, d in enumerate(shape))}
    return shapes, fixed_batch, mixed


def _reshape_to_flatten(graph: gs.Graph, shapes: dict[str, Shape]) -> None:
    """Reshape (N, C, H, W) -> (N, C*H*W) is a Flatten(axis=1), whatever way the exporter wrote it."""
    for node in graph.nodes:
        if node.op != "Reshape":
            continue
        src, dst = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
        if not src or not dst or len(dst) != 2 or len(src) < 2:
            continue
        if src[0] is None and dst[0] is None and None not in src[1:] and dst[1] == int(np.prod(src[1:])):
            node.op = "Flatten"
            node.attrs = {"axis": 1}
            set_inputs(node, node.inputs[:1])
    graph.cleanup()


def _unflattened_linears(graph: gs.Graph, shapes: dict[str, Shape]) -> None:
    """Reshape(x, (-1, C)) -> Gemm/MatMul -> Reshape back to x's leading axes (PyTorch's
    MultiheadAttention output projection on tokens-first (T, N, C)) is a Linear on x's last axis:
    rewritten as MatMul(x, W) + b on x itself, which _channels_last_linears then reads as a layer."""
    for node in list(graph.nodes):
        if node.op not in ("Gemm", "MatMul") or node.attrs.get("transA", 0):
            continue
        flat = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        out = node.outputs[0]
        back = out.outputs[0] if _single_consumer(out, graph) else None
        if flat is None or flat.op != "Reshape" or back is None or back.op != "Reshape":
            continue
        x = flat.inputs[0]
        src, mid, dst = shapes.get(x.name), shapes.get(flat.outputs[0].name), shapes.get(back.outputs[0].name)
        weight = _constant(node.inputs[1])
        if not src or not mid or not dst or weight is None or weight.ndim != 2 or len(src) < 3 or len(mid) != 2:
            continue
        if node.op == "Gemm":
            weight = (weight.T if node.attrs.get("transB", 0) else weight) * float(node.attrs.get("alpha", 1.0))
        k = len(dst) - 1  # leading axes kept; the rest of x's axes are the linear's input channels
        if k < 2 or tuple(dst[:-1]) != tuple(src[:k]) or None in src[k:] or mid[1] != int(np.prod(src[k:])) \
                or dst[-1] != weight.shape[1] or weight.shape[0] != mid[1]:
            continue
        bias = None
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            c = _constant(node.inputs[2])
            if c is None or c.size not in (1, weight.shape[1]):
                continue
            bias = np.broadcast_to(c.reshape(-1), (weight.shape[1],)) * float(node.attrs.get("beta", 1.0))
        y = back.outputs[0]
        back.outputs.clear()
        node.outputs.clear()
        name = node.name or y.name
        product = gs.Variable(f"{name}.unflat.{_counter[0]}", dtype=weight.dtype) if bias is not None else y
        _counter[0] += 1
        if len(src) > k + 1:  # (T, N, heads, d) -> (T, N, heads * d): copy the kept axes (0), join the rest
            joined = gs.Variable(f"{name}.joined.{_counter[0]}", dtype=x.dtype)
            graph.nodes.append(gs.Node("Reshape", name=f"{name}/join",
                                       inputs=[x, _const(name, "shape", np.array([0] * k + [mid[1]], np.int64))],
                                       outputs=[joined]))
            shapes[joined.name] = tuple(src[:k]) + (mid[1],)
            x = joined
        graph.nodes.append(gs.Node("MatMul", name=name, inputs=[x, _const(name, "W", weight.astype(weight.dtype))],
                                   outputs=[product]))
        if bias is not None:
            graph.nodes.append(gs.Node("Add", name=f"{name}/bias",
                                       inputs=[product, _const(name, "B", bias.astype(weight.dtype))], outputs=[y]))
        shapes[product.name] = dst
    graph.cleanup().toposort()


def _absorb_bias(node: gs.Node, weight: np.ndarray, graph: gs.Graph) -> tuple[np.ndarray, gs.Tensor]:
    """The bias of MatMul `node` (x @ weight): a per-output constant Add right after it, detached from the
    graph and returned with the tensor it wrote; zeros and the MatMul's own output when there is none."""
    out = node.outputs[0]
    add = out.outputs[0] if _single_consumer(out, graph) else None
    if add is not None and add.op == "Add":
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        b = _constant(other)
        if b is not None and b.size == weight.shape[1] and b.shape[-1:] == (weight.shape[1],):
            y = add.outputs[0]
            add.outputs.clear()
            return b.reshape(-1).astype(weight.dtype), y
    return np.zeros(weight.shape[1], dtype=weight.dtype), out


def _matmul_to_gemm(graph: gs.Graph, shapes: dict[str, Shape]) -> None:
    """MatMul(x, W) [+ b] with constant 2-D W and 2-D x becomes Gemm(x, W^T, b, transB=1)."""
    for node in list(graph.nodes):
        if node.op != "MatMul":
            continue
        weight = _constant(node.inputs[1])
        x_shape = shapes.get(node.inputs[0].name)
        if weight is None or weight.ndim != 2 or not x_shape or len(x_shape) != 2:
            continue
        bias, out = _absorb_bias(node, weight, graph)
        x = node.inputs[0]
        node.outputs.clear()
        gemm = gs.Node("Gemm", name=node.name or out.name, attrs={"transB": 1},
                       inputs=[x, _const(node.name, "W", weight.T), _const(node.name, "B", bias)],
                       outputs=[out])
        graph.nodes.append(gemm)
    graph.cleanup().toposort()


def _channels_last_linears(graph: gs.Graph, shapes: dict[str, Shape]) -> None:
    """MatMul(x, W) [+ b] with constant 2-D W and x of rank >= 3 (a Linear on the last axis) becomes
    Transpose(W^T) -> MatMul -> Add(b): the weight is stored (out, in) like a Gemm's and the layer always
    has a bias to merge into."""
    for node in list(graph.nodes):
        weight = _constant(node.inputs[1]) if node.op == "MatMul" and len(node.inputs) == 2 else None
        x_shape = shapes.get(node.inputs[0].name)
        if weight is None or weight.ndim != 2 or not x_shape or len(x_shape) < 3:
            continue
        bias, out = _absorb_bias(node, weight, graph)
        name = node.name or out.name
        _counter[0] += 1
        transposed = gs.Variable(f"{name}.Wt.{_counter[0]}", dtype=weight.dtype)
        product = gs.Variable(f"{name}.y.{_counter[0]}", dtype=weight.dtype)
        x, y = node.inputs[0], out
        node.outputs.clear()
        to_front = _samples_to_front(x_shape)
        if to_front:  # tokens-first (T, N, C), as inside nn.MultiheadAttention: samples moved to axis 0
            x = _transposed(graph, x, to_front, f"{name}/samples_first", shapes)
            y = gs.Variable(f"{name}.out.{_counter[0]}", dtype=weight.dtype)
            shapes[y.name] = tuple(shapes[out.name][i] for i in to_front) if out.name in shapes else None
            graph.nodes.append(gs.Node("Transpose", name=f"{name}/samples_back",
                                       attrs={"perm": [int(i) for i in np.argsort(to_front)]},
                                       inputs=[y], outputs=[out]))
        graph.nodes += [
            gs.Node("Transpose", name=f"{name}/Wt", attrs={"perm": [1, 0]},
                    inputs=[_const(name, "W", np.ascontiguousarray(weight.T))], outputs=[transposed]),
            gs.Node("MatMul", name=name, inputs=[x, transposed], outputs=[product]),
            gs.Node("Add", name=f"{name}/bias", inputs=[product, _const(name, "B", bias)], outputs=[y])]
        shapes[product.name] = shapes.get(y.name)
    graph.cleanup().toposort()


def _samples_to_front(shape) -> Optional[list[int]]:
    """The permutation that brings the sample axis (the one whose size varies: None) to axis 0, or None."""
    axis = next((i for i, d in enumerate(shape) if d is None), 0)
    return [axis] + [i for i in range(len(shape)) if i != axis] if axis else None


def _transposed(graph: gs.Graph, x: gs.Tensor, perm: list[int], name: str, shapes) -> gs.Variable:
    out = gs.Variable(f"{name}.{_counter[0]}", dtype=x.dtype)
    graph.nodes.append(gs.Node("Transpose", name=name, attrs={"perm": perm}, inputs=[x], outputs=[out]))
    if x.name in shapes and shapes[x.name] is not None:
        shapes[out.name] = tuple(shapes[x.name][i] for i in perm)
    return out


def _is_linear_matmul(node: gs.Node) -> bool:
    """The canonical channels-last linear layer of _channels_last_linears."""
    producer = node.inputs[1].inputs[0] if len(node.inputs) == 2 and node.inputs[1].inputs else None
    if producer is None or producer.op != "Transpose" or not isinstance(producer.inputs[0], gs.Constant):
        return False
    consumers = node.outputs[0].outputs
    return (len(consumers) == 1 and consumers[0].op == "Add"
            and any(isinstance(t, gs.Constant) for t in consumers[0].inputs))


_counter = [0]


def _const(owner: str, kind: str, values: np.ndarray) -> gs.Constant:
    _counter[0] += 1
    return gs.Constant(f"{owner or 'layer'}.{kind}.{_counter[0]}", np.ascontiguousarray(values))


def _normalize_gemms(graph: gs.Graph) -> None:
    """Gemm(x, W, C) with constant W and per-output C becomes Gemm(x, W[out,in], b[out], transB=1)."""
    for node in graph.nodes:
        if node.op != "Gemm" or node.attrs.get("transA", 0):
            continue
        weight = _constant(node.inputs[1])
        if weight is None:
            continue
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        w = (weight if node.attrs.get("transB", 0) else weight.T) * alpha
        bias = np.zeros(w.shape[0], dtype=w.dtype)
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            c = _constant(node.inputs[2])
            if c is None or c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                continue  # a bias that varies per sample: not a layer we can merge
            bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)) * beta
        node.attrs = {"transB": 1}
        set_inputs(node, [node.inputs[0], _const(node.name, "W", w.astype(weight.dtype)),
                          _const(node.name, "B", bias.astype(weight.dtype))])


def _normalize_convs(graph: gs.Graph, shapes: dict[str, Shape]) -> None:
    """Conv gets a bias, explicit pads and every attribute spelled out (auto_pad resolved)."""
    for node in graph.nodes:
        if node.op != "Conv":
            continue
        weight = _constant(node.inputs[1])
        if weight is None or weight.ndim < 3:
            continue
        rank = weight.ndim - 2  # 1-D, 2-D or 3-D convolution
        if len(node.inputs) < 3 or not node.inputs[2].name:
            set_inputs(node, node.inputs[:2] + [_const(node.name, "B", np.zeros(weight.shape[0], weight.dtype))])
        elif _constant(node.inputs[2]) is None:
            continue
        kernel = list(weight.shape[2:])
        attrs = {"kernel_shape": kernel, "strides": list(node.attrs.get("strides", [1] * rank)),
                 "dilations": list(node.attrs.get("dilations", [1] * rank)),
                 "group": int(node.attrs.get("group", 1))}
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad in ("NOTSET", ""):
            attrs["pads"] = list(node.attrs.get("pads", [0] * 2 * rank))
        elif auto_pad == "VALID":
            attrs["pads"] = [0] * 2 * rank
        else:
            attrs["pads"] = _same_pads(shapes[node.inputs[0].name][2:], kernel, attrs["strides"],
                                       attrs["dilations"], upper=auto_pad == "SAME_UPPER")
        node.attrs = attrs


def _same_pads(spatial, kernel, strides, dilations, upper: bool) -> list[int]:
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def _fold_batchnorms(graph: gs.Graph) -> None:
    """BatchNormalization right after a Conv/Gemm layer is folded into its weights (exact)."""
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or bn.attrs.get("training_mode", 0):
            continue
        x = bn.inputs[0]
        layer = x.inputs[0] if x.inputs else None
        if layer is None or not _is_layer(layer) or not _single_consumer(x, graph):
            continue
        if any(o.outputs or o in graph.outputs for o in bn.outputs[1:]):
            continue
        params = [_constant(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w = layer.inputs[1].values.astype(np.float64)
        b = layer.inputs[2].values.astype(np.float64)
        dtype = layer.inputs[1].values.dtype
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        b = (b - mean) * scale + beta
        layer.inputs[1] = _const(layer.name, "W", w.astype(dtype))
        layer.inputs[2] = _const(layer.name, "B", b.astype(dtype))
        y = bn.outputs[0]
        bn.outputs.clear()
        set_outputs(layer, [y])
    graph.cleanup()

