"""The joint model while it is being zipped: group views and each task's current layer weights.

Layers not yet processed keep their original weights, permuted into the current views; processed
layers hold their merged (or refit) weights in view order. From this state come the substitutions
that turn a task's canonical graph into its part of the merged model.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .align import Alignment
from .canonicalize import Layer
from .views import AxisMap, GroupView, axis_map


class ZipState:
    def __init__(self, alignment: Alignment):
        self.al = alignment
        self.tasks = alignment.tasks
        self.views: dict[int, GroupView] = {}
        self.weights: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # processed layers
        self.modified: dict[str, set[int]] = {t: set() for t in self.tasks}  # layers whose function changed
        self._init_views()

    def _init_views(self) -> None:
        members: dict[int, dict[str, int]] = {}
        for (task, root), joint in self.al.joint_of.items():
            cg = self.al.channels[task]
            if cg.find(root) == root:
                members.setdefault(joint, {})[task] = cg.sizes[root]
        everyone = {n for n, owners in self.al.shared_inputs.items() if len(owners) == len(self.tasks)}
        fixed = {self.al.joint_group(t, g) for t in self.tasks
                 for key, g in self.al.channels[t].input_group.items() if key[0] <= everyone}
        for joint, widths in members.items():
            if joint in fixed and len(widths) > 1 and len(set(widths.values())) == 1:
                # the same graph input read by every model: one space, identical for all tasks
                self.views[joint] = GroupView.identical(next(iter(widths.values())), list(widths), self.tasks)
            else:
                self.views[joint] = GroupView.unshared(widths, self.tasks)

    # --- views -------------------------------------------------------------------------------------
    def view(self, task: str, group: int) -> GroupView:
        return self.views[self.al.joint_group(task, group)]

    def in_map(self, task: str, layer: Layer) -> Optional[AxisMap]:
        layout = self.al.channels[task].layer_in.get(layer.index)
        return axis_map(layout, task, lambda g: self.view(task, g)) if layout is not None else None

    def out_order(self, task: str, layer: Layer) -> np.ndarray:
        return self.view(task, self.al.channels[task].layer_out[layer.index]).order(task)

    # --- weights -----------------------------------------------------------------------------------
    def view_weights(self, task: str, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        """The layer's weights as the merged model holds them for `task` (view order)."""
        if (task, layer.index) in self.weights:
            return self.weights[(task, layer.index)]
        return self.permuted_original(task, layer)

    def permuted_original(self, task: str, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        rows = self.out_order(task, layer)
        w, b = layer.weight[rows], layer.bias[rows]
        imap = self.in_map(task, layer)
        if imap is not None and not layer.depthwise:  # a depthwise filter has no input-channel axis
            w = w[:, imap.perm]
        return w, b

    def input_exact(self, task: str, layer: Layer) -> bool:
        """True when no layer upstream of `layer` has changed function for `task`."""
        return not (self.upstream(task, layer) & self.modified[task])

    def upstream(self, task: str, layer: Layer) -> set[int]:
        cache = self.__dict__.setdefault("_upstream", {})
        key = (task, layer.index)
        if key not in cache:
            model = self.al.models[task]
            index = {id(l.node): l.index for l in model.layers}
            seen, found, stack = set(), set(), [layer.node.inputs[0]]
            while stack:
                tensor = stack.pop()
                if tensor.name in seen or not tensor.inputs:
                    continue
                seen.add(tensor.name)
                node = tensor.inputs[0]
                if id(node) in index:
                    found.add(index[id(node)])
                stack.extend(t for t in node.inputs if t.name and not isinstance(t, gs.Constant))
            cache[key] = found
        return cache[key]

    # --- substitutions -----------------------------------------------------------------------------
    def substitutions(self, task: str, nodes) -> dict[str, np.ndarray]:
        """Values of the constants of `nodes` in `task`'s part of the merged model."""
        subs: dict[str, np.ndarray] = {}
        node_ids = {id(n) for n in nodes}
        for layer in self.al.models[task].layers:
            if id(layer.node) in node_ids:
                w, b = self.view_weights(task, layer)
                subs[layer.weight_const.name] = w.astype(layer.weight.dtype)
                subs[layer.bias_const.name] = b.astype(layer.bias.dtype)
        for use in self.al.channels[task].const_uses:
            if id(use.node) in node_ids:
                values = self._const_in_view(task, use)
                partners = self._partners().get((task, id(use)))
                if partners and self._fully_shared(task, use):
                    # every task's channels are one here: one constant for all (their mean), so the
                    # op runs once; the layers after it are fit to what it then computes
                    values = np.mean([values] + [self._const_in_view(t, u) for t, u in partners],
                                     axis=0).astype(values.dtype)
                subs[use.node.inputs[use.input_index].name] = values
        return subs

    def _const_in_view(self, task: str, use) -> np.ndarray:
        perm = axis_map(use.layout, task, lambda g: self.view(task, g)).perm
        return np.take(use.node.inputs[use.input_index].values, perm, axis=use.axis)

    def _fully_shared(self, task: str, use) -> bool:
        return all(all(len(o) == len(self.tasks) for o in self.view(task, seg.group).owners)
                   for seg in use.layout.segments)

    def _partners(self) -> dict:
        """(task, id(const use)) -> the same constant in every other task: the uses of one op type,
        input, shape and joint channel groups, matched in graph order (None where the counts differ)."""
        if "_partner_map" not in self.__dict__:
            def key(t, use):
                return (use.node.op, use.input_index, use.node.inputs[use.input_index].values.shape,
                        tuple(self.al.joint_group(t, seg.group) for seg in use.layout.segments))
            by_key = {t: {} for t in self.tasks}
            for t in self.tasks:
                for use in self.al.channels[t].const_uses:
                    by_key[t].setdefault(key(t, use), []).append(use)
            partners = {}
            for t in self.tasks:
                for k, uses in by_key[t].items():
                    others = {s: by_key[s].get(k, []) for s in self.tasks if s != t}
                    if all(len(o) == len(uses) for o in others.values()):
                        for i, use in enumerate(uses):
                            partners[(t, id(use))] = [(s, o[i]) for s, o in others.items()]
            self._partner_map = partners
        return self._partner_map
