"""Write the merged model: every task's graph with its merged weights, then shared work deduplicated.

Each task's canonical graph is exported with its view weights and prefixed `<task>/`. Weights are cut
into blocks by owner set (rows by the neurons' owners, columns by the inputs' owners) and every block
is stored once, named by its content; a task's weight is the Concat of its blocks (a constant
subgraph that onnxruntime and TensorRT fold at load). Blocks cost a few dozen bytes each (names, shapes,
the Concat nodes): a layer whose shared blocks save fewer bytes than that keeps each task's weight
whole, so partial sharing never makes the file larger. Then common-subexpression elimination merges
nodes that compute the same thing from the same inputs: the shared trunk ends up computed once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .canonicalize import Layer
from .state import ZipState


@dataclass
class Emitted:
    model: onnx.ModelProto
    layer_nodes: dict[tuple[str, int], str] = field(default_factory=dict)  # (task, layer) -> node kept
    layer_params: dict[tuple[str, int], set[str]] = field(default_factory=dict)  # -> initializers
    # (task, layer) -> merged-graph tensors holding its whole weight (out, in, ...), bias, and output
    layer_tensors: dict[tuple[str, int], tuple[str, str, str]] = field(default_factory=dict)


def emit(state: ZipState) -> Emitted:
    al = state.al
    tasks = al.tasks
    initializers = _Constants()
    nodes: list[onnx.NodeProto] = []
    layer_node_names: dict[tuple[str, int], str] = {}
    layer_params: dict[tuple[str, int], set[str]] = {}
    layer_tensors: dict[tuple[str, int], tuple[str, str, str]] = {}
    blocked = _worth_blocking(state)
    for task in tasks:
        model = al.models[task]
        proto = model.to_onnx()
        subs = state.substitutions(task, model.graph.nodes)
        blocks = {layer.node.name: _blocks(state, task, layer) if (task, layer.index) in blocked
                  else _whole(layer) for layer in model.layers}
        stored: dict[str, set[str]] = {}
        named = _naming(task, proto)
        weights = {c.name: (layer.node.name, kind) for layer in model.layers
                   for c, kind in ((layer.weight_const, "W"), (layer.bias_const, "B"))}
        task_nodes, renamed = _task_graph(proto, named, subs, blocks, weights, initializers, stored)
        nodes.extend(task_nodes)
        for layer in model.layers:
            layer_node_names[(task, layer.index)] = named(layer.node.name)
            layer_params[(task, layer.index)] = stored.get(layer.node.name, set())
            layer_tensors[(task, layer.index)] = (renamed(layer.weight_const.name), renamed(layer.bias_const.name),
                                                  renamed(layer.output))
    kept, rename, alias = _dedupe(nodes, dict((o.domain, o.version) for o in _opsets(al)))
    outputs = []
    for task in tasks:
        for out in al.models[task].to_onnx().graph.output:
            name = f"{task}/{out.name}"
            source = rename.get(name, name)
            if source != name:
                kept.append(helper.make_node("Identity", [source], [name], name=f"{name}/identity"))
            value = onnx.ValueInfoProto()
            value.CopyFrom(out)
            value.name = name
            outputs.append(value)
    inputs, seen = [], set()
    for task in tasks:
        for value in al.models[task].to_onnx().graph.input:
            if value.name not in seen and value.name in {i.name for i in al.models[task].inputs}:
                seen.add(value.name)
                inputs.append(value)
    used = {name for n in kept for name in n.input}
    graph = helper.make_graph(kept, "onnxzip_merged", inputs, outputs,
                              initializer=[t for name, t in initializers.tensors.items() if name in used])
    model = helper.make_model(graph, opset_imports=_opsets(al), producer_name="onnxzip")
    model.ir_version = max(al.models[t].ir_version for t in tasks)
    layer_nodes = {k: alias.get(v, v) for k, v in layer_node_names.items()}
    layer_tensors = {k: tuple(rename.get(n, n) for n in v) for k, v in layer_tensors.items()}
    return Emitted(model, layer_nodes, layer_params, layer_tensors)


def _opsets(al) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for t in al.tasks:
        for o in al.models[t].opset_imports:
            domain = "" if o.domain == "ai.onnx" else o.domain
            versions[domain] = max(versions.get(domain, 0), o.version)
    return [helper.make_opsetid(d, v) for d, v in sorted(versions.items())]


def _blocks(state: ZipState, task: str, layer: Layer):
    """Row and column runs of equal owner sets for this task's view of the layer."""
    view = state.view(task, state.al.channels[task].layer_out[layer.index])
    row_owners = [view.owners[u] for u in view.view_to_union(task)]
    imap = state.in_map(task, layer)
    if imap is None or layer.depthwise:  # one input column block (depthwise filters have no input axis)
        return _runs(row_owners), [(0, layer.weight.shape[1])]
    col_owners = [imap.owners[u] for u in imap.union]
    return _runs(row_owners), _runs(col_owners)


def _whole(layer: Layer):
    return [(0, layer.width)], [(0, layer.weight.shape[1])]


# Serialized bytes a block adds beyond its values (TensorProto name, dims and tags; its name again where a
# Concat reads it), and a Concat node (name, output, attribute): measured on typical emitted models.
_BLOCK_BYTES, _CONCAT_BYTES = 64, 96


def _worth_blocking(state: ZipState) -> set[tuple[str, int]]:
    """The (task, layer index) pairs whose weights are stored as owner blocks: every layer position
    where storing shared blocks once saves more bytes than the blocks and Concats add."""
    al = state.al
    out = set()
    for pos in range(max(len(al.models[t].layers) for t in al.tasks)):
        layers = {t: al.models[t].layers[pos] for t in al.tasks if pos < len(al.models[t].layers)}
        runs = {t: _blocks(state, t, layer) for t, layer in layers.items()}
        if all(len(r) == 1 and len(c) == 1 for r, c in runs.values()):
            continue  # one block per task: splitting changes nothing
        whole, parts, concats = {}, {}, 0  # content -> bytes: equal arrays are stored once either way
        for t, layer in layers.items():
            w, b = state.view_weights(t, layer)
            whole.update({_digest(w): w.nbytes, _digest(b): b.nbytes})
            rows, cols = runs[t]
            for r0, r1 in rows:
                parts[_digest(b[r0:r1])] = b[r0:r1].nbytes
                for c0, c1 in cols:
                    parts[_digest(w[r0:r1, c0:c1])] = w[r0:r1, c0:c1].nbytes
            concats += len(rows) * (len(cols) > 1) + 2 * (len(rows) > 1)  # see _blocked
        whole_cost = sum(whole.values()) + _BLOCK_BYTES * len(whole)
        blocked_cost = sum(parts.values()) + _BLOCK_BYTES * len(parts) + _CONCAT_BYTES * concats
        if blocked_cost < whole_cost:
            out |= {(t, layer.index) for t, layer in layers.items()}
    return out


def _runs(owners: list) -> list[tuple[int, int]]:
    runs, start = [], 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            runs.append((start, i))
            start = i
    return runs


def _digest(array: np.ndarray) -> str:
    array = np.asarray(array, order="C")  # not ascontiguousarray: it makes a scalar 1-D
    return hashlib.sha1(array.tobytes() + str(array.shape).encode() + str(array.dtype).encode()).hexdigest()


class _Constants:
    """Constants stored once by content, each named '<hint>.<the shortest unclaimed prefix of its digest>'
    (10 hex digits unless two contents share them): short names keep the file small."""

    def __init__(self):
        self.tensors: dict[str, onnx.TensorProto] = {}
        self.named: dict[str, str] = {}  # digest -> name
        self.taken: set[str] = set()

    def put(self, array: np.ndarray, hint: str) -> str:
        digest = _digest(array)
        name = self.named.get(digest)
        if name is None:
            size = 10
            while f"{hint}.{digest[:size]}" in self.taken:  # another content has this prefix
                size += 2
            name = f"{hint}.{digest[:size]}"
            self.named[digest] = name
            self.taken.add(name)
            self.tensors[name] = numpy_helper.from_array(np.asarray(array, order="C"), name)
        return name


def _naming(task: str, proto: onnx.ModelProto):
    """Names in the merged graph: '<task>/<name>', written '<task>/name' rather than '<task>//name' for the
    '/a/b' names exporters give (bytes in every name), unless that would make two names one. Graph outputs
    always keep '<task>/<output>' (the contract)."""
    outputs = {o.name for o in proto.graph.output}

    def full(name: str) -> str:
        return f"{task}/{name}"

    def short(name: str) -> str:
        return f"{task}{name}" if name.startswith("/") and name not in outputs else full(name)

    names = {n.name for n in proto.graph.node} | {t for n in proto.graph.node for t in (*n.input, *n.output) if t}
    return short if len({short(n) for n in names}) == len(names) else full


def _task_graph(proto: onnx.ModelProto, named, subs: dict, blocks: dict, weight_inputs: dict,
                initializers: _Constants, stored: dict[str, set[str]]):
    """This task's nodes, renamed by `named` (`<task>/...`), with constants stored by content; and the
    renaming. `weight_inputs`: layer weight and bias initializer -> (layer node name, "W" or "B")."""
    graph_inputs = {i.name for i in proto.graph.input}
    init_values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    init_values.update(subs)
    const_names: dict[str, str] = {}
    extra_nodes: list[onnx.NodeProto] = []
    for name, values in init_values.items():
        # Names come from content only, so equal blocks of different tasks become one initializer.
        hint = {"W": "w", "B": "b"}.get(weight_inputs.get(name, ("", ""))[1], "c")
        if name in weight_inputs:
            node_name, kind = weight_inputs[name]
            names = stored.setdefault(node_name, set())
            const_names[name] = _blocked(values, kind, blocks[node_name], f"{named(node_name)}/{kind}",
                                         hint, initializers, extra_nodes, names)
        else:
            const_names[name] = initializers.put(values, hint)

    def rename(tensor: str) -> str:
        if not tensor or tensor in graph_inputs:
            return tensor
        return const_names.get(tensor, named(tensor))

    out = list(extra_nodes)
    for node in proto.graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = named(node.name)
        del new.input[:]
        new.input.extend(rename(i) for i in node.input)
        del new.output[:]
        new.output.extend(rename(o) for o in node.output)
        out.append(new)
    return out, rename


def _blocked(values: np.ndarray, kind: str, runs, base: str, hint: str, initializers: _Constants,
             extra_nodes: list, names: set[str]) -> str:
    """Store a layer weight as owner-set blocks; return the tensor name that holds the whole weight."""
    row_runs, col_runs = runs

    def store(block):
        name = initializers.put(block, hint)
        names.add(name)
        return name

    if kind == "B":
        parts = [store(values[a:b]) for a, b in row_runs]
        return _concat(parts, 0, f"{base}", extra_nodes)
    rows = []
    for r, (a, b) in enumerate(row_runs):
        cols = [store(values[a:b, c:d]) for c, d in col_runs]
        rows.append(_concat(cols, 1, f"{base}/r{r}", extra_nodes))
    return _concat(rows, 0, base, extra_nodes)


def _concat(parts: list[str], axis: int, name: str, extra_nodes: list) -> str:
    if len(parts) == 1:
        return parts[0]
    extra_nodes.append(helper.make_node("Concat", parts, [name], name=f"{name}/concat", axis=axis))
    return name


def _attribute_key(node: onnx.NodeProto, opsets: dict[str, int]) -> tuple:
    """Attributes that matter: those set to their default are dropped, because exporters differ in
    spelling them out (storage_order=0, auto_pad=NOTSET, pads of zeros...)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
        defaults = {name: a.default_value for name, a in schema.attributes.items()}
    except Exception:  # unknown op: compare every attribute
        defaults = {}
    key = []
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        default = defaults.get(attr.name)
        if default is not None and default.type != onnx.AttributeProto.UNDEFINED and \
                helper.get_attribute_value(default) == value:
            continue
        if attr.name == "pads" and not any(value) or attr.name in ("strides", "dilations") and set(value) == {1}:
            continue
        key.append(attr.SerializeToString())
    return tuple(sorted(key))


def _dedupe(nodes: list[onnx.NodeProto], opsets: dict[str, int]):
    """Common-subexpression elimination: a node with the same op, attributes and (renamed) inputs as
    an earlier one is dropped and its outputs point at the earlier node's.

    Returns the kept nodes, tensor renames, and dropped node name -> kept node name.
    """
    rename: dict[str, str] = {}
    alias: dict[str, str] = {}
    seen: dict[tuple, onnx.NodeProto] = {}
    kept = []
    for node in nodes:
        inputs = tuple(rename.get(i, i) for i in node.input)
        key = (node.domain, node.op_type, inputs, _attribute_key(node, opsets), len(node.output))
        if key in seen:
            for mine, theirs in zip(node.output, seen[key].output):
                rename[mine] = theirs
            alias[node.name] = seen[key].name
            continue
        del node.input[:]
        node.input.extend(inputs)
        seen[key] = node
        kept.append(node)
    return kept, rename, alias
