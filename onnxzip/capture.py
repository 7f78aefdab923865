"""Activations with onnxruntime, streamed layer by layer.

A `Frontier` holds, for one model (original or merged), the tensors computed so far over all
calibration samples: at first the graph inputs, then layer outputs as layers are processed. To get
the next tensor it runs only the nodes between what it holds and what it needs (a "segment"), so each
layer's input is computed once per model, not by a full forward pass per layer. Tensors that no
remaining target can need are dropped.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .canonicalize import CanonicalModel, export
from .runtime import make_session, run_batched

# Maps a constant tensor's name to the values this model variant uses (merged or permuted weights).
Substitutions = dict[str, np.ndarray]
# Gives the substitutions for the constants of the given nodes.
SubstitutionsFor = Callable[[list[gs.Node]], Substitutions]


def segment_nodes(graph: gs.Graph, available: set[str], wanted: Iterable[str]) -> list[gs.Node]:
    """Nodes needed to compute `wanted` from `available` tensors (and constants), in graph order."""
    needed: set[int] = set()
    stack = [graph.tensors()[name] for name in wanted if name not in available]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen or tensor.name in available or isinstance(tensor, gs.Constant):
            continue
        seen.add(tensor.name)
        if not tensor.inputs:
            raise RuntimeError(f"tensor '{tensor.name}' is not computable from {sorted(available)}")
        node = tensor.inputs[0]
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(t for t in node.inputs if t.name)
    return [n for n in graph.nodes if id(n) in needed]


def segment_model(model: CanonicalModel, nodes: list[gs.Node], inputs: list[str], outputs: list[str],
                  subs: Substitutions) -> onnx.ModelProto:
    tensors = model.graph.tensors()
    graph = gs.Graph(nodes=nodes, inputs=[tensors[n] for n in inputs], outputs=[tensors[n] for n in outputs],
                     opset=model.opset)
    proto = export(graph, model.opset_imports, model.ir_version)
    _apply_substitutions(proto, subs)
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.ClearField("shape")  # shapes change with the batch; types do not
    return proto


def _apply_substitutions(proto: onnx.ModelProto, subs: Substitutions) -> None:
    for init in proto.graph.initializer:
        if init.name in subs:
            init.CopyFrom(onnx.numpy_helper.from_array(subs[init.name], init.name))


class Frontier:
    """Tensors of one model variant over the whole calibration set, advanced segment by segment."""

    def __init__(self, model: CanonicalModel, feeds: dict[str, np.ndarray], providers, batch_size: int):
        self.model = model
        self.store: dict[str, np.ndarray] = {k: v for k, v in feeds.items()
                                             if k in {i.name for i in model.inputs}}
        self.n = len(next(iter(feeds.values())))
        self.providers = providers
        self.batch_size = model.fixed_batch or batch_size

    def compute(self, wanted: list[str], subs_for: SubstitutionsFor,
                on_batch: Optional[Callable[[slice, list[np.ndarray]], None]] = None,
                keep: bool = True) -> list[Optional[np.ndarray]]:
        """Compute `wanted` tensors from the store; keep them in the store unless keep=False.

        `on_batch(part, arrays)` sees each batch as it is produced (used to accumulate moments).
        Returns the full arrays when kept, else None entries.
        """
        missing = [w for w in wanted if w not in self.store]
        if missing:
            nodes = segment_nodes(self.model.graph, set(self.store), missing)
            used = sorted({t.name for n in nodes for t in n.inputs if t.name in self.store})
            session = make_session(segment_model(self.model, nodes, used, missing, subs_for(nodes)), self.providers)
            results = {name: None for name in missing}
            for part, arrays in run_batched(session, {k: self.store[k] for k in used}, missing,
                                            self.batch_size):
                for name, array in zip(missing, arrays):
                    if keep:
                        if results[name] is None:
                            results[name] = np.empty((self.n,) + array.shape[1:], array.dtype)
                        results[name][part] = array
                if on_batch is not None:
                    current = [self.store[w][part] if w in self.store else arrays[missing.index(w)]
                               for w in wanted]
                    on_batch(part, current)
            if keep:
                self.store.update(results)
        elif on_batch is not None:
            for start in range(0, self.n, self.batch_size):
                part = slice(start, min(self.n, start + self.batch_size))
                on_batch(part, [self.store[w][part] for w in wanted])
        return [self.store.get(w) for w in wanted]

    def retain(self, targets: Iterable[str]) -> None:
        """Drop stored tensors that no target can need any more (targets: tensors still to compute)."""
        graph = self.model.graph
        live: set[str] = set()
        stack = list(targets)
        seen: set[str] = set()
        tensors = graph.tensors()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in self.store:
                live.add(name)
                continue
            tensor = tensors.get(name)
            if tensor is None or isinstance(tensor, gs.Constant) or not tensor.inputs:
                continue
            stack.extend(t.name for t in tensor.inputs[0].inputs if t.name)
        for name in list(self.store):
            if name not in live:
                del self.store[name]
