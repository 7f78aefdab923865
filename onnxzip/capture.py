"""Activations with onnxruntime, streamed layer by layer.

A `Frontier` holds, for one model (original or merged), the tensors computed so far over all
calibration samples: at first the graph inputs, then layer outputs as layers are processed. To get
the next tensor it runs only the nodes between what it holds and what it needs (a "segment"), so each
layer's input is computed once per model, not by a full forward pass per layer. Tensors that no
remaining target can need are dropped.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
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
    given = set(inputs)
    for node in proto.graph.node:  # a Split recomputed for one output: the others are given, not redefined
        for i, name in enumerate(node.output):
            if name in given:
                node.output[i] = f"{name}/recomputed"
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.ClearField("shape")  # shapes change with the batch; types do not
    return proto


def _apply_substitutions(proto: onnx.ModelProto, subs: Substitutions) -> None:
    for init in proto.graph.initializer:
        if init.name in subs:
            init.CopyFrom(onnx.numpy_helper.from_array(subs[init.name], init.name))


class Spilled:
    """A tensor over the whole calibration set kept in an .npy file, written and read a batch at a
    time, so big activations (ResNet-50 at 224x224: 0.8 GB per tensor for 256 samples) do not all
    sit in memory at once. Indexing returns an ordinary array."""

    def __init__(self, path: str, shape: tuple, dtype: np.dtype):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        try:
            return np.array(mapped[index])
        finally:
            del mapped  # unmapped: the pages leave this process's memory


class SpillWriter:
    """Appends batches (in order) to an .npy file; no mapping, so nothing stays resident."""

    def __init__(self, path: str, shape: tuple, dtype: np.dtype):
        self.path, self.shape, self.dtype = path, shape, dtype
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                         "fortran_order": False, "shape": shape})

    def __setitem__(self, part: slice, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).data)  # no extra copy

    def close(self) -> Spilled:
        self.file.close()
        spilled = Spilled(self.path, self.shape, self.dtype)
        weakref.finalize(spilled, _unlink, self.path)  # the file goes when nothing refers to it
        return spilled


def new_tensor(shape: tuple, dtype, spill_dir: Optional[str] = None):
    """An empty array to fill batch by batch, or with `spill_dir` a SpillWriter into a new file
    there (batches in order); `done` turns either into what is read back."""
    if spill_dir is None:
        return np.empty(shape, dtype)
    fd, path = tempfile.mkstemp(dir=spill_dir, suffix=".npy")
    os.close(fd)
    return SpillWriter(path, shape, dtype)


def done(tensor):
    return tensor.close() if isinstance(tensor, SpillWriter) else tensor


def same_values(a, b, chunk: int = 16) -> bool:
    """np.array_equal for in-memory or spilled tensors, a few samples at a time."""
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    return all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, len(a), chunk))


def segment_key(nodes: list[gs.Node], stored: dict[str, object], outputs: list[str],
                subs: Substitutions) -> Optional[tuple]:
    """What a segment computes, independent of tensor names: each node's op, attributes and inputs,
    an input being a stored tensor (by object identity), a constant (by its values, substitutions
    applied) or an earlier node's output (by position). Two segments with the same key compute the
    same values: a trunk shared by every task's merged model is computed once (SegmentCache).
    None when an attribute is not a plain value (no reuse then, never a wrong one)."""
    token: dict[str, tuple] = {name: ("stored", id(value)) for name, value in stored.items()}
    parts = []
    for i, node in enumerate(nodes):
        inputs = []
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                values = np.asarray(subs.get(t.name, t.values))
                inputs.append(("const", values.dtype.str, values.shape, hashlib.sha1(values.tobytes()).hexdigest()))
            elif not t.name:
                inputs.append(None)  # an omitted optional input
            elif t.name in token:
                inputs.append(token[t.name])
            else:
                return None
        attrs = sorted(node.attrs.items())
        if not all(_plain(v) for _, v in attrs):
            return None
        parts.append((node.op, node.domain or "", repr(attrs), tuple(inputs)))
        for j, out in enumerate(node.outputs):
            token[out.name] = ("node", i, j)
    return tuple(parts), tuple(token[o] for o in outputs)


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (int, float, str, bytes, bool))


class SegmentCache:
    """The last few segments computed by any of the frontiers sharing it, by segment_key.

    A key names stored inputs by object identity; an id can be reused once its object is gone, so
    each entry keeps weak references to its inputs and is dropped when one of them has died."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: dict[tuple, tuple[list, list]] = {}

    def get(self, key) -> Optional[list]:
        entry = self.entries.get(key) if key is not None else None
        if entry is None:
            return None
        values, inputs = entry
        if any(ref() is None for ref in inputs):
            del self.entries[key]
            return None
        return values

    def put(self, key, values: list, inputs: list) -> None:
        if key is None:
            return
        self.entries[key] = (values, [weakref.ref(i) for i in inputs])
        while len(self.entries) > self.size:  # oldest first: dicts keep insertion order
            del self.entries[next(iter(self.entries))]


class Frontier:
    """Tensors of one model variant over the whole calibration set, advanced segment by segment.

    Tensors larger than `spill_bytes` are kept on disk in `spill_dir` (see Spilled). Frontiers
    given one `cache` reuse each other's results for segments that compute the same values."""

    def __init__(self, model: CanonicalModel, feeds: dict[str, np.ndarray], providers, batch_size: int,
                 spill_dir: Optional[str] = None, spill_bytes: float = float("inf"),
                 cache: Optional[SegmentCache] = None):
        self.model = model
        self.cache = cache
        self.store: dict[str, np.ndarray] = {k: v for k, v in feeds.items()
                                             if k in {i.name for i in model.inputs}}
        self.n = len(next(iter(feeds.values())))
        self.providers = providers
        self.batch_size = model.fixed_batch or batch_size
        self.spill_dir, self.spill_bytes = spill_dir, spill_bytes

    def compute(self, wanted: list[str], subs_for: SubstitutionsFor, like: Optional[dict] = None) -> list:
        """Compute the `wanted` tensors from the store (running only the nodes in between), keep them
        in the store and return them.

        `like` maps a wanted name to another variant's tensor it probably equals (every task's merged
        model computes the same shared trunk). While each batch matches, nothing is stored; if all
        do, the store keeps that very object: one copy in memory, nothing written to disk twice."""
        missing = [w for w in wanted if w not in self.store]
        if missing:
            nodes = segment_nodes(self.model.graph, set(self.store), missing)
            used = sorted({t.name for n in nodes for t in n.inputs if t.name in self.store})
            subs = subs_for(nodes)
            key = (segment_key(nodes, {k: self.store[k] for k in used}, missing, subs)
                   if self.cache is not None else None)
            known = self.cache.get(key) if self.cache is not None else None
            if known is not None:
                self.store.update(zip(missing, known))
                return [self.store.get(w) for w in wanted]
            session = make_session(segment_model(self.model, nodes, used, missing, subs), self.providers)
            like = {k: v for k, v in (like or {}).items() if k in missing and v is not None and len(v) == self.n}
            results = {}
            for part, arrays in run_batched(session, {k: self.store[k] for k in used}, missing,
                                            self.batch_size):
                for name, array in zip(missing, arrays):
                    if name in like:
                        if like[name].shape[1:] == array.shape[1:] and np.array_equal(like[name][part], array):
                            continue
                        results[name] = self._allocate((self.n,) + array.shape[1:], array.dtype)
                        for start in range(0, part.start, self.batch_size):  # the batches that matched
                            matched = slice(start, min(part.start, start + self.batch_size))
                            results[name][matched] = like[name][matched]
                        del like[name]
                    elif name not in results:
                        results[name] = self._allocate((self.n,) + array.shape[1:], array.dtype)
                    results[name][part] = array
            results.update(like)  # every batch matched
            self.store.update({k: done(v) for k, v in results.items()})
            if self.cache is not None:
                self.cache.put(key, [self.store[m] for m in missing], [self.store[k] for k in used])
        return [self.store.get(w) for w in wanted]

    def _allocate(self, shape: tuple, dtype):
        big = np.prod(shape, dtype=np.int64) * np.dtype(dtype).itemsize > self.spill_bytes
        return new_tensor(shape, dtype, self.spill_dir if big else None)

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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # its folder was already removed with the merge
        pass
