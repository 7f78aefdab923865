"""Pairing for channel groups written by several layers: residual streams, depthwise and
squeeze-excite ties (MTZ Sec. 4.2.3).

Channels added together must be paired the same way, so the pairing of such a group is decided once,
before its first writer is merged, from costs summed over ALL its writers. A later writer reads
channels whose pairing is not known yet, so its MTZ Hessian cost cannot be formed in a common input
space; what can be formed is the quantity that cost approximates: the expected squared difference of
the two neurons' pre-activations on the same inputs, measured in the original models (at the rows
the OriginalRecord kept).
"""

from __future__ import annotations

import numpy as np

from . import pairing
from .align import Alignment, JointLayer
from .blas import small_work
from .record import OriginalRecord
from .views import GroupView


def tied_groups(al: Alignment) -> dict[int, list[JointLayer]]:
    """Shareable joint groups paired from their writers' activations, with those writers: groups written
    by more than one aligned layer, and groups whose writer reads channels the tasks do not share (its
    MTZ costs vanish there: inputs no task has in common cost nothing to merge, so say nothing)."""
    first = al.tasks[0]
    by_group: dict[int, list[JointLayer]] = {}
    for j in al.joint:
        if j.shareable:
            g = al.joint_group(first, al.channels[first].layer_out[j.layers[first].index])
            by_group.setdefault(g, []).append(j)
    shared = set(by_group) | _fixed_inputs(al)
    return {g: js for g, js in by_group.items()
            if len(js) > 1 or any(_reads_unshared(al, j, shared) for j in js)}


def _fixed_inputs(al: Alignment) -> set[int]:
    everyone = {name for name, owners in al.shared_inputs.items() if len(owners) == len(al.tasks)}
    return {al.joint_group(t, g) for t in al.tasks for key, g in al.channels[t].input_group.items()
            if key[0] <= everyone}


def _reads_unshared(al: Alignment, j: JointLayer, shared: set[int]) -> bool:
    t = al.tasks[0]
    layout = al.channels[t].layer_in.get(j.layers[t].index)
    return layout is not None and any(al.joint_group(t, s.group) not in shared for s in layout.segments)


# Recorded rows multiplied at once: bounds the temporaries of one update.
_CHUNK_ROWS = 8192


class TiedStats:
    """Second moments of every tied writer's pre-activations in the original models: per task
    E[y^2] per channel, and per task pair E[y_s y_t^T], over the rows the OriginalRecord kept (the
    same rows for every task at a position). Collected once, reused for every plan."""

    def __init__(self, al: Alignment, record: OriginalRecord):
        self.groups = tied_groups(al)
        self.tasks = al.tasks
        self.sq, self.cross, self.count = _collect(self.groups, self.tasks, record)

    def views(self, plan: dict[int, int], options, rng: np.random.Generator) -> dict[int, GroupView]:
        """A pairing per tied group, sharing as many channels as its first writer's plan says."""
        return {g: _pair(js, self.tasks, plan.get(js[0].position, 0), options, rng, self.sq, self.cross, self.count)
                for g, js in self.groups.items()}


def tied_writers(al: Alignment) -> dict[str, set[int]]:
    """Per task, the layer indices whose recorded rows TiedStats needs."""
    return {t: {j.layers[t].index for js in tied_groups(al).values() for j in js} for t in al.tasks}


def _collect(groups: dict[int, list[JointLayer]], tasks: list[str], record: OriginalRecord):
    sq, cross, count = {}, {}, {}
    for j in (j for js in groups.values() for j in js):
        rows = {t: record.get(t, j.layers[t]).rows for t in tasks}
        n = len(rows[tasks[0]])
        if any(len(r) != n for r in rows.values()):
            raise RuntimeError(f"tied layer {j.position}: the tasks' recorded rows differ in number")
        for t in tasks:
            sq[(id(j), t)] = 0.0
        for a, s in enumerate(tasks):
            for t in tasks[a + 1:]:
                cross[(id(j), s, t)] = 0.0
        with small_work(max(r.shape[1] for r in rows.values()) + 1):  # (C x C) products: see blas.py
            for start in range(0, n, _CHUNK_ROWS):
                chunk = {t: np.asarray(r[start:start + _CHUNK_ROWS], np.float32) for t, r in rows.items()}
                for t in tasks:
                    sq[(id(j), t)] = sq[(id(j), t)] + np.einsum("rc,rc->c", chunk[t], chunk[t]).astype(np.float64)
                for a, s in enumerate(tasks):
                    for t in tasks[a + 1:]:
                        cross[(id(j), s, t)] = cross[(id(j), s, t)] + (chunk[s].T @ chunk[t]).astype(np.float64)
        count[id(j)] = n
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

