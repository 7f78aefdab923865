"""An ONNX graph run by PyTorch, so that its weights can be trained.

Each initializer becomes one tensor: a `torch.nn.Parameter` when it is to be trained, a buffer
otherwise. Every node that reads an initializer reads that same tensor, so a weight block the merged
model stores once (shared by several tasks) is one Parameter, trained by every task that reads it.
(onnx2torch, the converter on PyPI, gives each node that reads an initializer its own copy, which
would train a shared weight apart; it also lacks the ai.onnx.ml ops some exporters append.)

Only the nodes the requested outputs need are run; an op with no entry in OPS is an error only when
a requested output depends on it.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from ..errors import UnsupportedGraphError


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const(x) -> list[int]:
    return [int(v) for v in x.detach().cpu().reshape(-1).tolist()]


def _spatial_pads(pads: list[int], rank: int) -> list[int]:
    """ONNX pads (begin..., end...) -> F.pad's (last dim first: begin, end, ...)."""
    begins, ends = pads[:rank], pads[rank:]
    out = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _conv(node, x, w, b=None):
    a = _attrs(node)
    rank = w.dim() - 2
    pads = a.get("pads", [0] * 2 * rank)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"", ""):
        raise UnsupportedGraphError(f"Conv '{node.name}': auto_pad is not supported in distillation")
    if any(pads):
        x = F.pad(x, _spatial_pads(pads, rank))
    fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return fn(x, w, b, stride=a.get("strides", [1] * rank), dilation=a.get("dilations", [1] * rank),
              groups=a.get("group", 1))


def _gemm(node, a_, b_, c=None):
    a = _attrs(node)
    a_ = a_.t() if a.get("transA", 0) else a_
    b_ = b_.t() if a.get("transB", 0) else b_
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _pool(node, x, kind):
    a = _attrs(node)
    rank = x.dim() - 2
    kernel, strides = a["kernel_shape"], a.get("strides", [1] * rank)
    pads = a.get("pads", [0] * 2 * rank)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        if any(pads):
            x = F.pad(x, _spatial_pads(pads, rank), value=float("-inf"))
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        return fn(x, kernel, strides, dilation=a.get("dilations", [1] * rank), ceil_mode=ceil)
    if any(pads) and not a.get("count_include_pad", 0):
        symmetric = pads[:rank] == pads[rank:]
        if not symmetric:
            raise UnsupportedGraphError(f"AveragePool '{node.name}': asymmetric pads are not supported")
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        return fn(x, kernel, strides, padding=pads[:rank], ceil_mode=ceil, count_include_pad=False)
    if any(pads):
        x = F.pad(x, _spatial_pads(pads, rank))
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    return fn(x, kernel, strides, ceil_mode=ceil)


def _axes(node, inputs, default=None):
    a = _attrs(node)
    if "axes" in a:
        return list(a["axes"])
    if len(inputs) > 1 and inputs[1] is not None:
        return _const(inputs[1])
    return default


def _reduce(fn):
    def run(node, *inputs):
        x = inputs[0]
        axes = _axes(node, inputs) or list(range(x.dim()))
        keep = bool(_attrs(node).get("keepdims", 1))
        return fn(x, dim=[a % x.dim() for a in axes], keepdim=keep)
    return run


def _clip(node, x, lo=None, hi=None):
    a = _attrs(node)
    lo = a.get("min") if lo is None and "min" in a else lo
    hi = a.get("max") if hi is None and "max" in a else hi
    return torch.clamp(x, min=lo, max=hi)


def _reshape(node, x, shape):
    shape = _const(shape)
    shape = [x.shape[i] if s == 0 and not _attrs(node).get("allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _split(node, x, split=None):
    a = _attrs(node)
    axis = a.get("axis", 0) % x.dim()
    sizes = list(a["split"]) if "split" in a else (_const(split) if split is not None else None)
    if sizes is None:
        parts = a.get("num_outputs", len(node.output))
        sizes = [x.shape[axis] // parts] * parts
    return tuple(torch.split(x, sizes, dim=axis))


def _squeeze(node, x, axes=None):
    dims = _axes(node, [x, axes])
    return x.squeeze() if dims is None else x.squeeze([d % x.dim() for d in dims])


def _unsqueeze(node, x, axes=None):
    for d in sorted(a % (x.dim() + len(_axes(node, [x, axes]))) for a in _axes(node, [x, axes])):
        x = x.unsqueeze(d)
    return x


def _resize(node, x, roi=None, scales=None, sizes=None):
    a = _attrs(node)
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if sizes is not None and sizes.numel():
        size = _const(sizes)[2:]
    else:
        size = [int(np.floor(d * s)) for d, s in zip(x.shape[2:], scales.reshape(-1).tolist()[2:])]
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "linear", align_corners=False)


def _pad(node, x, pads=None, value=None, axes=None):
    a = _attrs(node)
    pads = list(a["pads"]) if "pads" in a else _const(pads)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rank = x.dim()
    flat = _spatial_pads(pads, rank)
    fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
    return F.pad(x, flat, mode={"edge": "replicate"}.get(mode, mode), value=fill if mode == "constant" else None)


def _transpose(node, x):
    perm = _attrs(node).get("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


def _flatten(node, x):
    axis = _attrs(node).get("axis", 1) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _softmax(fn):
    def run(node, x):
        return fn(x, dim=_attrs(node).get("axis", -1))
    return run


def _cast(node, x):
    to = helper.tensor_dtype_to_np_dtype(_attrs(node)["to"])
    return x.to(torch.from_numpy(np.zeros(0, to)).dtype)


def _batchnorm(node, x, scale, bias, mean, var):
    eps = _attrs(node).get("epsilon", 1e-5)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)


def _layer_norm(node, x, scale, bias=None):
    a = _attrs(node)
    axis = a.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * scale
    return y + bias if bias is not None else y


def _gather(node, x, indices):
    axis = _attrs(node).get("axis", 0) % x.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = torch.index_select(x, axis, indices.reshape(-1))
    return out.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _const(starts), _const(ends)
    axes = _const(axes) if axes is not None else list(range(len(starts)))
    steps = _const(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise UnsupportedGraphError("distillation cannot run a strided Slice yet; merge without distillation")
        n = x.shape[a % x.dim()]
        s, e = max(-n, min(s, n)), max(-n, min(e, n))
        index[a % x.dim()] = slice(s, e)
    return x[tuple(index)]


def _expand(node, x, shape):
    shape = _const(shape)
    full = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(full)


def _gelu(node, x):
    approximate = _attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return F.gelu(x, approximate="tanh" if approximate == "tanh" else "none")


OPS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda n, a, b: a @ b,
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b, "Pow": lambda n, a, b: torch.pow(a, b),
    "Sum": lambda n, *xs: sum(xs), "Max": lambda n, *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "Min": lambda n, *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Mean": lambda n, *xs: sum(xs) / len(xs),
    "Relu": lambda n, x: F.relu(x), "Sigmoid": lambda n, x: torch.sigmoid(x), "Tanh": lambda n, x: torch.tanh(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, _attrs(n).get("alpha", 0.01)),
    "Elu": lambda n, x: F.elu(x, _attrs(n).get("alpha", 1.0)),
    "HardSigmoid": lambda n, x: torch.clamp(_attrs(n).get("alpha", 0.2) * x + _attrs(n).get("beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: F.hardswish(x), "Softplus": lambda n, x: F.softplus(x),
    "Erf": lambda n, x: torch.erf(x), "Gelu": _gelu, "Sqrt": lambda n, x: torch.sqrt(x),
    "Exp": lambda n, x: torch.exp(x), "Log": lambda n, x: torch.log(x), "Neg": lambda n, x: -x,
    "Abs": lambda n, x: torch.abs(x), "Reciprocal": lambda n, x: 1.0 / x,
    "Clip": _clip, "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Identity": lambda n, x: x, "Dropout": lambda n, x, *rest: x, "Cast": _cast,
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose,
    "Concat": lambda n, *xs: torch.cat(xs, dim=_attrs(n)["axis"]), "Split": _split,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Pad": _pad, "Resize": _resize, "Upsample": _resize,
    "MaxPool": lambda n, x: _pool(n, x, "max"), "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "GlobalAveragePool": lambda n, x: x.mean(dim=list(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=list(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
    "BatchNormalization": _batchnorm, "LayerNormalization": _layer_norm,
    "Gather": _gather, "Slice": _slice, "Expand": _expand,
    "Shape": lambda n, x: torch.tensor(list(x.shape)[_attrs(n).get("start", 0):_attrs(n).get("end", x.dim())],
                                       dtype=torch.int64, device=x.device),
    "Equal": lambda n, a, b: a == b, "Where": lambda n, c, a, b: torch.where(c.bool(), a, b),
    "ConstantOfShape": lambda n, shape: torch.full(
        _const(shape), float(numpy_helper.to_array(_attrs(n)["value"]).reshape(-1)[0]) if "value" in _attrs(n) else 0.0,
        device=shape.device),
}


def needed_nodes(graph: onnx.GraphProto, outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in graph (topological) order."""
    producer = {o: n for n in graph.node for o in n.output}
    keep, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    return [n for n in graph.node if id(n) in keep]


class TorchGraph(torch.nn.Module):
    """The nodes of `model` that compute `outputs`, as a torch module; initializers named in
    `trainable` are Parameters (one per initializer), the others buffers."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str], trainable: Iterable[str] = ()):
        super().__init__()
        self.outputs = list(outputs)
        self.nodes = needed_nodes(model.graph, self.outputs)
        missing = sorted({n.op_type for n in self.nodes if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if missing:
            raise UnsupportedGraphError(
                f"distillation cannot run {', '.join(missing)} in PyTorch yet; merge without distillation")
        used = {i for n in self.nodes for i in n.input}
        initializers = {t.name for t in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in initializers]
        trainable = set(trainable)
        self.names: dict[str, str] = {}  # ONNX initializer name -> attribute name
        self.params = torch.nn.ParameterDict()
        for i, init in enumerate(t for t in model.graph.initializer if t.name in used):
            key = f"t{i}"
            self.names[init.name] = key
            value = torch.from_numpy(np.array(numpy_helper.to_array(init)))
            if init.name in trainable:
                self.params[key] = torch.nn.Parameter(value.float() if value.is_floating_point() else value)
            else:
                self.register_buffer(key, value, persistent=False)
        self.constants = {n.output[0]: torch.from_numpy(np.array(numpy_helper.to_array(_attrs(n)["value"])))
                          for n in self.nodes if n.op_type == "Constant"}

    def tensor(self, name: str) -> torch.Tensor:
        key = self.names[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._run(feeds, self.nodes, self.outputs)

    def evaluate(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors that need no inputs (a layer weight: its trained blocks joined by Concat)."""
        wanted = set(id(n) for n in needed_nodes(_Nodes(self.nodes), names))
        return self._run({}, [n for n in self.nodes if id(n) in wanted], names)

    def _run(self, feeds: dict[str, torch.Tensor], nodes, outputs) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = dict(feeds)
        for name in self.names:
            values[name] = self.tensor(name)
        device = next(iter(values.values())).device
        for node in nodes:
            if node.op_type == "Constant":
                values[node.output[0]] = self.constants[node.output[0]].to(device)
                continue
            args = [values[i] if i else None for i in node.input]
            while args and args[-1] is None:
                args.pop()
            out = OPS[node.op_type](node, *args)
            for name, value in zip(node.output, out if isinstance(out, tuple) else (out,)):
                values[name] = value
        return {name: values[name] for name in outputs}


class _Nodes:
    """A list of nodes that needed_nodes can walk like a GraphProto."""

    def __init__(self, nodes):
        self.node = nodes
