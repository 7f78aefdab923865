"""Layer Hessians computed where the activations are: a small ONNX graph per layer that turns a batch
of inputs into X^T X (and X^T Y) inside onnxruntime, so on a GPU only the (d x d) matrices cross to
the host, not the im2col patches.

im2col is itself a convolution: a grouped Conv whose C*k*k one-hot filters copy each patch element
to its own output channel, in the (channel, row, column) order of W.reshape(out, -1). The products
are Gemm with transA=1 (no transpose materialized); sums of columns supply the bias row.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .canonicalize import Layer
from .runtime import make_session


def _one_hot_filters(channels: int, kernel: tuple[int, ...]) -> np.ndarray:
    """(C * prod(kernel), 1, *kernel): filter c*kk + p copies kernel position p of channel c."""
    kk = int(np.prod(kernel))
    filters = np.zeros((channels * kk, 1) + tuple(kernel), np.float32)
    for c in range(channels):
        for p, offset in enumerate(np.ndindex(*kernel)):
            filters[(c * kk + p, 0) + offset] = 1.0
    return filters


def gram_model(layer: Layer, targets: bool, flat=None, sampled: bool = False, opset: int = 13) -> onnx.ModelProto:
    """x [, y] [, index] -> rows, sums of x, X^T X [, sums of y, X^T Y], with X the layer's input rows
    (only those at `index` when `sampled`, as hessian.RowSample hands them out) and y the target rows
    that go with them (hessian.output_rows: already only those at `index`).

    `flat` = (w, b, lo, hi): adjust the targets for a following ReLU/Clip as FlatRange.targets does,
    with the original neurons' response to X computed on the device too.
    """
    d = int(np.prod(layer.weight.shape[1:]))
    nodes, inits = [], []
    if layer.kind == "conv":
        attrs = layer.node.attrs
        channels = int(layer.weight.shape[1])
        inits.append(numpy_helper.from_array(_one_hot_filters(channels, layer.kernel), "onehot"))
        nodes += [helper.make_node("Conv", ["x", "onehot"], ["patches"], group=channels,
                                   kernel_shape=list(layer.kernel), strides=list(attrs["strides"]),
                                   pads=list(attrs["pads"]), dilations=list(attrs["dilations"])),
                  helper.make_node("Transpose", ["patches"], ["nhwc"],
                                   perm=[0] + list(range(2, len(layer.kernel) + 2)) + [1])]
        rows_of = "nhwc"
    else:
        rows_of = "x"
    inits.append(numpy_helper.from_array(np.array([-1, d], np.int64), "shape_x"))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    nodes.append(helper.make_node("Reshape", [rows_of, "shape_x"], ["X_all" if sampled else "X"]))
    if sampled:
        nodes.append(helper.make_node("Gather", ["X_all", "index"], ["X"], axis=0))
    nodes += [helper.make_node("Gemm", ["X", "X"], ["xtx"], transA=1),
              helper.make_node("ReduceSum", ["X", "axis0"], ["xsum"], keepdims=0),
              helper.make_node("Shape", ["X"], ["xshape"]),
              helper.make_node("Gather", ["xshape", "axis0"], ["rows"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("xtx", "xsum")]
    outputs.append(helper.make_tensor_value_info("rows", TensorProto.INT64, None))
    if targets:
        y_rows = "y"
        if flat is not None:
            nodes += _flat_range_nodes(*flat, inits)
            y_rows = "y_flat"
        nodes += [helper.make_node("Gemm", ["X", y_rows], ["xty"], transA=1),
                  helper.make_node("ReduceSum", [y_rows, "axis0"], ["ysum"], keepdims=0)]
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("xty", "ysum")]
    if sampled:
        inputs.append(helper.make_tensor_value_info("index", TensorProto.INT64, [None]))
    graph = helper.make_graph(nodes, "gram", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _flat_range_nodes(w: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, inits):
    """y -> y_flat (rows): where y is deep in the activation's flat range, the original neuron's
    response to the rows X if it lands there too, else the range's edge."""
    big = np.finfo(np.float32).max
    for name, values in (("lo", lo), ("hi", hi)):
        inits.append(numpy_helper.from_array(np.clip(values, -big, big).astype(np.float32).reshape(1, -1), name))
    inits += [numpy_helper.from_array(w.reshape(len(w), -1).astype(np.float32), "w_orig"),
              numpy_helper.from_array(b.astype(np.float32), "b_orig")]
    return [helper.make_node("Gemm", ["X", "w_orig", "b_orig"], ["resp"], transB=1),
            helper.make_node("Less", ["y", "lo"], ["below"]),
            helper.make_node("Min", ["resp", "lo"], ["resp_lo"]),
            helper.make_node("Where", ["below", "resp_lo", "y"], ["y_lo"]),
            helper.make_node("Greater", ["y_lo", "hi"], ["above"]),
            helper.make_node("Max", ["resp", "hi"], ["resp_hi"]),
            helper.make_node("Where", ["above", "resp_hi", "y_lo"], ["y_flat"])]


class DeviceMoments:
    """Moments with the same interface as hessian.Moments, accumulated by onnxruntime on its device."""

    def __init__(self, layer: Layer, targets: bool, providers, gram: Optional[np.ndarray] = None, flat=None,
                 sampled: bool = False):
        d = int(np.prod(layer.weight.shape[1:]))
        self.session = make_session(gram_model(layer, targets, flat, sampled), providers)
        self.sampled = sampled
        self.gram = np.zeros((d + 1, d + 1)) if gram is None else gram
        self.own_gram = gram is None
        self.cross = np.zeros((d + 1, layer.width)) if targets else None
        self.rows = 0

    def update_batch(self, x: np.ndarray, y: Optional[np.ndarray] = None, index: Optional[np.ndarray] = None) -> None:
        """x: a batch of the layer's input tensor; y: the target rows that go with the rows used;
        index: the rows to use (a sampled layer's, see hessian.RowSample)."""
        if self.sampled and len(index) == 0:
            return
        feeds = {"x": np.ascontiguousarray(x, np.float32)}
        if self.cross is not None:
            feeds["y"] = np.ascontiguousarray(y, np.float32)
        if self.sampled:
            feeds["index"] = np.asarray(index, np.int64)
        out = self.session.run(None, feeds)
        xtx, xsum, rows = out[0], out[1], int(np.asarray(out[2]).reshape(-1)[0])
        if self.own_gram:
            self.gram[:-1, :-1] += xtx
            self.gram[:-1, -1] += xsum
            self.gram[-1, :-1] += xsum
            self.gram[-1, -1] += rows
        if self.cross is not None:
            self.cross[:-1] += out[3]
            self.cross[-1] += out[4]
        self.rows += rows

    def hessian(self, weight: float) -> np.ndarray:
        return self.gram * (weight / max(self.rows, 1))

    def cross_moment(self, weight: float, columns=None) -> np.ndarray:
        """weight/n * sum x y^T, for the given target columns only when given."""
        return (self.cross if columns is None else self.cross[:, columns]) * (weight / max(self.rows, 1))
