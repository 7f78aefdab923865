"""Pairing for channel groups written by several layers: residual streams, depthwise and
squeeze-excite ties (MTZ Sec. 4.2.3).

Channels added together must be paired the same way, so the pairing of such a group is decided once,
before its first writer is merged, from costs summed over ALL its writers. A later writer reads
channels whose pairing is not known yet, so its MTZ Hessian cost cannot be formed in a common input
space; what can be formed is the quantity that cost approximates: the expected squared difference of
the two neurons' pre-activations on the same inputs, measured in the original models.
"""

from __future__ import annotations

import numpy as np
import onnx

from . import pairing
from .align import Alignment, JointLayer
from .hessian import RowSample, kept_rows
from .runtime import make_session
from .views import GroupView


def tied_groups(al: Alignment) -> dict[int, list[JointLayer]]:
    """Shareable joint groups written by more than one aligned layer, with their writers."""
    first = al.tasks[0]
    by_group: dict[int, list[JointLayer]] = {}
    for j in al.joint:
        if j.shareable:
            g = al.joint_group(first, al.channels[first].layer_out[j.layers[first].index])
            by_group.setdefault(g, []).append(j)
    return {g: js for g, js in by_group.items() if len(js) > 1}


def _rows(y: np.ndarray, index) -> np.ndarray:
    """(batch, C, ...) -> (batch * positions, C), only the rows at `index` when given; products in
    float32, sums across batches float64."""
    rows = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return np.ascontiguousarray(rows if index is None else rows[index], dtype=np.float32)


class TiedStats:
    """Second moments of every tied writer's pre-activations in the original models: per task
    E[y^2] per channel, and per task pair E[y_s y_t^T]. Collected once, reused for every plan."""

    def __init__(self, al: Alignment, data: dict[str, np.ndarray], options, providers):
        self.groups = tied_groups(al)
        self.tasks = al.tasks
        self.sq, self.cross, self.count = _collect(al, self.groups, data, options, providers) if self.groups \
            else ({}, {}, {})

    def views(self, plan: dict[int, int], options, rng: np.random.Generator) -> dict[int, GroupView]:
        """A pairing per tied group, sharing as many channels as its first writer's plan says."""
        return {g: _pair(js, self.tasks, plan.get(js[0].position, 0), options, rng, self.sq, self.cross, self.count)
                for g, js in self.groups.items()}


def _collect(al: Alignment, groups: dict[int, list[JointLayer]], data: dict[str, np.ndarray], options,
             providers):
    """One pass of the original models over the calibration data."""
    tasks = al.tasks
    writers = [j for js in groups.values() for j in js]
    sessions, names = {}, {}
    for t in tasks:
        model = al.models[t].to_onnx()
        names[t] = [j.layers[t].output for j in writers]
        known = {o.name for o in model.graph.output}
        for name in names[t]:
            if name not in known:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        sessions[t] = make_session(model, providers)
    sq = {(id(j), t): 0.0 for j in writers for t in tasks}
    cross = {(id(j), s, t): 0.0 for j in writers for a, s in enumerate(tasks) for t in tasks[a + 1:]}
    count = {id(j): 0 for j in writers}
    # Every tied writer's output of both models is alive at once here: a quarter of the usual batch
    # keeps this pass from being the memory peak of a big merge.
    batch = al.models[tasks[0]].fixed_batch or max(1, options.batch_size // 4)
    feeds = {t: {i.name: data[i.name] for i in al.models[t].inputs} for t in tasks}
    n = len(next(iter(data.values())))
    samples: dict[int, RowSample] = {}  # per writer: the rows its statistics use (options.hessian_rows)
    for start in range(0, n, batch):
        part = slice(start, min(n, start + batch))
        outs = {t: dict(zip(names[t], sessions[t].run(names[t], {k: v[part] for k, v in feeds[t].items()})))
                for t in tasks}
        for j in writers:
            if id(j) not in samples:
                shape = outs[tasks[0]][j.layers[tasks[0]].output].shape
                per_sample = int(np.prod(shape[2:]))
                samples[id(j)] = RowSample(n * per_sample, kept_rows(n * per_sample, shape[1], options.hessian_rows),
                                           per_sample, (options.seed, len(al.joint) + j.position))
            index = samples[id(j)].batch(part)
            rows = {t: _rows(outs[t][j.layers[t].output], index) for t in tasks}
            for t in tasks:
                sq[(id(j), t)] = sq[(id(j), t)] + np.einsum("rc,rc->c", rows[t], rows[t]).astype(np.float64)
            for a, s in enumerate(tasks):
                for t in tasks[a + 1:]:
                    cross[(id(j), s, t)] = cross[(id(j), s, t)] + (rows[s].T @ rows[t]).astype(np.float64)
            count[id(j)] += len(rows[tasks[0]])
    return sq, cross, count


def _pair(js, tasks, k, options, rng, sq, cross, count) -> GroupView:
    """Zip task after task into the group, with costs 1/2 E[(y_u - y_j)^2] summed over the writers."""
    first = tasks[0]
    width = len(sq[(id(js[0]), first)])
    owners = [{first} for _ in range(width)]
    index = [{first: i} for i in range(width)]
    for t in tasks[1:]:
        rep = [min(o, key=tasks.index) for o in owners]  # a union channel's activations: its first owner's
        cost = 0.0
        for j in js:
            n = count[id(j)]
            a_sq = np.array([sq[(id(j), r)][index[u][r]] for u, r in enumerate(rep)])
            ab = np.stack([cross[(id(j), r, t)][index[u][r]] for u, r in enumerate(rep)])
            cost = cost + 0.5 * (a_sq[:, None] + sq[(id(j), t)][None, :] - 2 * ab) / n
        cost = np.maximum(cost, 0.0)
        if options.pairing == "random":
            rows, cols = pairing.random_pairs(*cost.shape, rng)
        else:
            rows, cols = pairing.assign(cost)
        keep = np.arange(len(rows)) < k
        if options.epsilon is not None:
            keep &= cost[rows, cols] < options.epsilon
        for u, j in zip(rows[keep].tolist(), cols[keep].tolist()):
            owners[u].add(t)
            index[u][t] = j
        alone = np.setdiff1d(np.arange(cost.shape[1]), cols[keep])
        owners += [{t} for _ in alone]
        index += [{t: int(j)} for j in alone]
    return GroupView.build([(frozenset(o), i) for o, i in zip(owners, index)], tasks)

