"""Function-identical copies of a model with channels permuted inside every channel group.

If onnxzip's derived groups missed a tie (a residual, a depthwise conv, a concat), permuting each
group on its own would change the function: `permuted_copy` therefore doubles as a check of the
derived groups, and merging a model with such a copy must give the model back.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxzip.canonicalize import canonicalize
from onnxzip.capture import _apply_substitutions
from onnxzip.channels import analyze
from onnxzip.views import GroupView, axis_map


def permuted_copy(model: onnx.ModelProto, probe: dict, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """(canonical model with every free channel group randomly permuted, number of groups permuted)."""
    canon = canonicalize(model, "model", probe)
    cg = analyze(canon)
    rng = np.random.default_rng(seed)
    views: dict[int, GroupView] = {}
    permuted = 0

    def view(group: int) -> GroupView:
        nonlocal permuted
        root = cg.find(group)
        if root not in views:
            size = cg.sizes[root]
            order = np.arange(size)
            if cg.frozen_reason(root) is None and not cg.is_input_group(root):
                order = rng.permutation(size)
                permuted += 1
            to_union = np.empty(size, dtype=np.int64)
            to_union[order] = np.arange(size)  # view position r holds original channel order[r]
            views[root] = GroupView([frozenset("a")] * size, {"a": to_union})
        return views[root]

    subs = {}
    for layer in canon.layers:
        rows = view(cg.layer_out[layer.index]).order("a")
        w, b = layer.weight[rows], layer.bias[rows]
        layout = cg.layer_in.get(layer.index)
        if layout is not None and not layer.depthwise:
            w = w[:, axis_map(layout, "a", view).perm]
        subs[layer.weight_const.name], subs[layer.bias_const.name] = w, b
    for use in cg.const_uses:
        values = use.node.inputs[use.input_index].values
        subs[use.node.inputs[use.input_index].name] = np.take(values, axis_map(use.layout, "a", view).perm,
                                                              axis=use.axis)
    out = canon.to_onnx()
    _apply_substitutions(out, subs)
    return out, permuted
