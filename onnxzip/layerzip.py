"""Zip one layer position: pair neurons and solve merged weights (MTZ), or refit a task's own layer.

Everything is expressed in the joint input space ("union" columns, bias last) so that partial
sharing, differing widths and more than two tasks are one formulation: a task's input vector has
zeros in the columns it does not own, and a union neuron shared by the tasks P is solved from the
sum of their Hessians. Tasks are zipped one after the other into the joint layer (MTZ Sec. 5.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import pairing
from .canonicalize import Layer
from .hessian import Moments
from .lowrank import LowRankHessian
from .views import AxisMap, GroupView


# Shared channels solved at once (bounds the temporaries of a 25,088-input layer to a few hundred MB).
_CHANNEL_BLOCK = 1024


@dataclass
class TaskSide:
    """One task's layer at this position, with its moments and column maps."""

    task: str
    layer: Layer
    moments: Moments
    weight: float  # the task's share of the error (alpha, 1 - alpha, or 1/N)
    in_map: Optional[AxisMap]
    view_w: np.ndarray  # original weights, input columns in view order, rows in ORIGINAL order
    view_b: np.ndarray
    exact: bool  # the layer's inputs in the merged model equal its original inputs
    inputs: Optional[np.ndarray] = None  # the layer's inputs in the merged model (all samples)
    available_rows: int = 0  # calibration rows the layer has (moments.rows of them feed its Hessian)
    # (RowSample index, input rows batch by batch) kept while the other tasks at this position capture
    patches: Optional[tuple] = None

    @property
    def kk(self) -> int:
        return int(np.prod(self.layer.kernel)) if self.layer.kind == "conv" else 1

    def columns(self) -> np.ndarray:
        """Union column of each of this task's input columns (bias last)."""
        kk = self.kk
        cols = (self.in_map.union[:, None] * kk + np.arange(kk)).ravel()
        return np.append(cols, self.union_dim() - 1)

    def union_dim(self) -> int:
        return self.in_map.union_length * self.kk + 1

    def flat(self) -> np.ndarray:
        """(d_view + 1, n) weights with the bias row: one neuron per column."""
        w = self.view_w.reshape(len(self.view_w), -1)
        return np.vstack([w.T, self.view_b[None, :]]).astype(np.float64)


@dataclass
class ZipResult:
    view: GroupView
    costs: np.ndarray  # predicted error of each shared union channel
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # task -> (W, b) in view order

    @property
    def shared(self) -> int:
        return self.view.shared


def refit(side: TaskSide, damping: float) -> np.ndarray:
    """Least squares of the layer's ORIGINAL pre-activations on its inputs in the merged model,
    ridge-pulled toward the original weights (so exact inputs give back exact weights)."""
    g = side.moments.hessian(1.0)
    ridge = pairing.damping_amount(g, damping)
    rhs = side.moments.cross_moment(1.0) + ridge * side.flat()
    return pairing.spd_solve(pairing.add_identity(g, ridge), rhs)


def task_only(side: TaskSide, order: np.ndarray, options) -> tuple[np.ndarray, np.ndarray]:
    """A layer no other task shares: its weights in view order (`order`: original row per view
    row), refit to the original pre-activations when its inputs changed and calibration is on."""
    if side.layer.depthwise:
        flat = _depthwise_flat(side)  # already view order
        if options.calibrate and not side.exact:
            flat = _depthwise_refit(side, flat, options.damping)
        return (flat[:, :-1].reshape(side.view_w.shape).astype(side.view_w.dtype),
                flat[:, -1].astype(side.view_b.dtype))
    flat = own_weights(side, options)[:, order]
    return _unflat(flat.T, side.view_w)


def calibrating(side: TaskSide, options) -> bool:
    """Least-squares recovery needs the exact Gram; per-channel (Kronecker) Hessians only serve MTZ's
    formula, whose pairing and merge they approximate well."""
    return options.calibrate and getattr(side.moments, "exact_gram", True)


def own_weights(side: TaskSide, options) -> np.ndarray:
    """(d_view + 1, n) weights for neurons that stay the task's own (refit when inputs changed)."""
    if calibrating(side, options) and not side.exact:
        return refit(side, options.damping)
    return side.flat()


class _Space:
    """The tasks' Hessians and weights embedded in the union input space, and one Cholesky factor
    per set of tasks whose Hessians are summed (pairing and merging need the same sums)."""

    def __init__(self, sides: list[TaskSide], damping: float):
        self.d = sides[0].union_dim()
        self.cols = {s.task: s.columns() for s in sides}
        self.lam, self.hd = {}, {}  # each task's damping and damped Hessian (the undamped one is not kept)
        for s in sides:
            own = s.moments.hessian(s.weight)
            self.lam[s.task] = pairing.damping_amount(own, damping)  # relative to its own inputs' scale
            self.hd[s.task] = _damped(_embed(own, self.cols[s.task], self.d), self.cols[s.task], self.lam[s.task])
        self.w = {s.task: _embed_rows(s.flat(), self.cols[s.task], self.d) for s in sides}
        self._solvers: dict[frozenset, pairing.SPDSolver] = {}

    def solver(self, tasks) -> pairing.SPDSolver:
        """SPDSolver of the sum of these tasks' damped Hessians, factored once."""
        key = frozenset(tasks)
        if key not in self._solvers:
            self._solvers[key] = pairing.SPDSolver(sum(self.hd[t] for t in sorted(key)))
        return self._solvers[key]


def pair_tasks(sides: list[TaskSide], space: _Space, k: int, epsilon: Optional[float], pairing_mode: str,
               tasks: list[str], rng: np.random.Generator) -> tuple[GroupView, np.ndarray]:
    """Zip each task into the joint layer in turn: MTZ costs against the joint neurons, optimal
    assignment, the k cheapest pairs kept. Returns the union layout and each union channel's cost."""
    first = sides[0]
    owners = [{first.task} for _ in range(first.layer.width)]
    index = [{first.task: i} for i in range(first.layer.width)]
    costs = np.zeros(first.layer.width)
    joint_w, joint_h = space.w[first.task], space.hd[first.task]  # copied before it is changed
    zipped = [first.task]
    for number, side in enumerate(sides[1:], start=2):
        t = side.task
        hs, ws = space.hd[t], space.w[t]
        zipped.append(t)
        solve = space.solver(zipped)  # joint_h + hs
        d = pairing.pair_costs(joint_w, ws, joint_h, hs, solve)
        if pairing_mode == "random":
            rows, cols = pairing.random_pairs(*d.shape, rng)
        else:
            rows, cols = pairing.assign(d)
        keep = np.arange(len(rows)) < k
        if epsilon is not None:
            keep &= d[rows, cols] < epsilon
        rows, cols = rows[keep], cols[keep]
        last = number == len(sides)
        if len(rows) and not last:  # the joint neuron becomes MTZ's merge of the pair, for the next task's costs
            joint_w = joint_w.copy() if joint_w is space.w[first.task] else joint_w
            joint_w[:, rows] = solve(joint_h @ joint_w[:, rows] + hs @ ws[:, cols])
        for u, j in zip(rows.tolist(), cols.tolist()):
            owners[u].add(t)
            index[u][t] = j
            costs[u] += d[u, j]
        alone = np.setdiff1d(np.arange(side.layer.width), cols)
        owners += [{t} for _ in alone]
        index += [{t: int(j)} for j in alone]
        costs = np.concatenate([costs, np.zeros(len(alone))])
        if not last:
            joint_w = np.hstack([joint_w, ws[:, alone]])
            joint_h = solve.h  # the sum the solver factored
    view = GroupView.build([(frozenset(o), i) for o, i in zip(owners, index)], tasks)
    order = sorted(range(len(owners)), key=lambda u: view.to_union[next(iter(index[u]))][next(iter(index[u].values()))])
    return view, costs[order]


def zip_layer(sides: list[TaskSide], k: int, options, tasks: list[str], rng: np.random.Generator,
              view: Optional[GroupView] = None) -> ZipResult:
    """Share up to k neurons per task between the tasks' layers at one position.

    With `view` given (a group tied to earlier layers: residual stream, depthwise channels) the
    pairing is already decided and only the merged weights are solved.
    """
    if sides[0].layer.depthwise:
        return _zip_depthwise(sides, view, options)
    space = _Space(sides, options.damping)
    if view is None:
        view, costs = pair_tasks(sides, space, k, options.epsilon, options.pairing, tasks, rng)
    else:
        costs = _view_costs(view, sides, space)
    shared = _shared_weights(view, sides, space, options)
    weights = {}
    for side in sides:
        order, to_union = view.order(side.task), view.to_union[side.task]
        # neurons that stay the task's own (none at full share: skip their refit)
        own = own_weights(side, options) if any(int(u) not in shared for u in to_union) else None
        w = np.empty((len(order), len(space.cols[side.task])))
        for r, neuron in enumerate(order):
            u = int(to_union[neuron])
            w[r] = shared[u][space.cols[side.task]] if u in shared else own[:, neuron]
        weights[side.task] = _unflat(w, side.view_w)
    return ZipResult(view, costs, weights)


def _members(view: GroupView, u: int) -> dict[str, int]:
    return {t: int(np.flatnonzero(m == u)[0]) for t, m in view.to_union.items() if u in m}


def _shared_weights(view: GroupView, sides, space: _Space, options) -> dict[int, np.ndarray]:
    """Merged weight vector (union columns) of every union channel shared by two or more tasks:
    one solve per owner set. Paper: (sum H_t)^-1 sum H_t w_t. Calibrated: least squares of the
    original pre-activations from the merged model's inputs, ridge-pulled toward the paper's."""
    by_set: dict[frozenset, list[int]] = {}
    for u, owners in enumerate(view.owners):
        if len(owners) > 1:
            by_set.setdefault(owners, []).append(u)
    cross = {s.task: s.moments for s in sides}
    side_weight = {s.task: s.weight for s in sides}
    out: dict[int, np.ndarray] = {}
    for owners, all_channels in by_set.items():
        tasks = sorted(owners)
        solve = space.solver(tasks)
        # a block of channels at a time: the (d x channels) temporaries stay small for wide layers
        for start in range(0, len(all_channels), _CHANNEL_BLOCK):
            channels = all_channels[start:start + _CHANNEL_BLOCK]
            members = [_members(view, u) for u in channels]
            rhs = sum(space.hd[t] @ space.w[t][:, [m[t] for m in members]] for t in tasks)
            merged = pairing.merged_weights(solve, rhs)
            if all(calibrating(s, options) for s in sides):
                fit = sum(_embed_rows(cross[t].cross_moment(side_weight[t], [m[t] for m in members]),
                                      space.cols[t], space.d) for t in tasks)
                ridge = sum(_owned(space, t) for t in tasks)  # hd - h: the damping on the diagonal
                merged = solve(fit + ridge[:, None] * merged)
            for i, u in enumerate(channels):
                out[u] = merged[:, i]
    return out


def _view_costs(view: GroupView, sides, space: _Space) -> np.ndarray:
    """MTZ's predicted error of the pairs a given view makes (two-task pairs; 0 elsewhere)."""
    costs = np.zeros(view.size)
    if len(sides) != 2:
        return costs
    a, b = sides[0].task, sides[1].task
    pairs = [(u, m) for u in range(view.size) if len(view.owners[u]) == 2 for m in [_members(view, u)]]
    if pairs:
        diff = space.w[a][:, [p[1][a] for p in pairs]] - space.w[b][:, [p[1][b] for p in pairs]]
        m_diff = space.hd[a] @ space.solver((a, b))(space.hd[b] @ diff)  # M diff, M never formed
        costs[[p[0] for p in pairs]] = np.maximum(0.5 * np.einsum("dk,dk->k", diff, m_diff), 0.0)
    return costs


def _zip_depthwise(sides: list[TaskSide], view: GroupView, options) -> ZipResult:
    """Depthwise convolution: each channel has its own k*k filter, so a shared channel's filter is
    solved from that channel's Hessians alone (a (k*k+1)-sized system per channel, batched)."""
    weights = {}
    grams = {s.task: s.moments.hessian(s.weight) for s in sides}  # (C, kk+1, kk+1), view order
    flats = {s.task: _depthwise_flat(s) for s in sides}  # (C, kk+1), view order
    merged: dict[int, np.ndarray] = {}
    by_set: dict[frozenset, list[int]] = {}
    for u, owners in enumerate(view.owners):
        if len(owners) > 1:
            by_set.setdefault(owners, []).append(u)
    pos = {s.task: {int(u): r for r, u in enumerate(view.view_to_union(s.task))} for s in sides}
    for owners, channels in by_set.items():
        tasks = sorted(owners)
        h = {t: grams[t][[pos[t][u] for u in channels]] for t in tasks}
        hd = {t: _damp_stack(h[t], options.damping) for t in tasks}
        total = sum(hd.values())
        rhs = sum(np.einsum("cij,cj->ci", hd[t], flats[t][[pos[t][u] for u in channels]]) for t in tasks)
        w = np.linalg.solve(total, rhs[..., None])[..., 0]
        if options.calibrate:
            side_weight = {s.task: s.weight for s in sides}
            fit = sum(next(s for s in sides if s.task == t).moments.cross_moment(side_weight[t])
                      [[pos[t][u] for u in channels]] for t in tasks)
            ridge = sum(hd[t] - h[t] for t in tasks)
            w = np.linalg.solve(total, (fit + np.einsum("cij,cj->ci", ridge, w))[..., None])[..., 0]
        for i, u in enumerate(channels):
            merged[u] = w[i]
    for side in sides:
        own = flats[side.task]
        if options.calibrate and not side.exact:
            own = _depthwise_refit(side, own, options.damping)
        rows = np.array([merged[int(u)] if int(u) in merged else own[r]
                         for r, u in enumerate(view.view_to_union(side.task))])
        kernel = rows[:, :-1].reshape(side.view_w.shape)
        weights[side.task] = (kernel.astype(side.view_w.dtype), rows[:, -1].astype(side.view_b.dtype))
    return ZipResult(view, np.zeros(view.size), weights)


def _depthwise_refit(side: TaskSide, flat: np.ndarray, damping: float) -> np.ndarray:
    g = side.moments.hessian(1.0)
    gd = _damp_stack(g, damping)
    rhs = side.moments.cross_moment(1.0) + np.einsum("cij,cj->ci", gd - g, flat)
    return np.linalg.solve(gd, rhs[..., None])[..., 0]


def _depthwise_flat(side: TaskSide) -> np.ndarray:
    """(C, kk+1) filters with bias, channels in view order (view_w rows are already view order)."""
    w = side.view_w.reshape(len(side.view_w), -1)
    return np.hstack([w, side.view_b[:, None]]).astype(np.float64)


def _damp_stack(h: np.ndarray, damping: float) -> np.ndarray:
    scale = np.einsum("cii->c", h) / h.shape[-1]
    eye = np.eye(h.shape[-1])
    return h + (damping * np.where(scale > 0, scale, 1.0))[:, None, None] * eye


def _damped(h, cols: np.ndarray, lam: float):
    """H + lam on the diagonal of the columns the task owns: a task's damping must not pull the merged
    weights of inputs it does not have toward zero (a shared neuron keeps other tasks' own columns)."""
    if _owns_all(cols, h.shape[0]):
        return pairing.add_identity(h, lam)
    if isinstance(h, LowRankHessian):
        mask = np.zeros(h.shape[0])
        mask[cols] = lam
        return h.plus_identity(mask)
    out = h.copy()
    out[cols, cols] += lam
    return out


def _owned(space: "_Space", task: str) -> np.ndarray:
    """The damping task `task` put on each union column (see _damped)."""
    out = np.zeros(space.d)
    out[space.cols[task]] = space.lam[task]
    return out


def _owns_all(cols: np.ndarray, d: int) -> bool:
    """The task owns every union column, in order: embedding changes nothing (and copies nothing)."""
    return len(cols) == d and np.array_equal(cols, np.arange(d))


def _embed(h: np.ndarray, cols: np.ndarray, d: int) -> np.ndarray:
    if _owns_all(cols, d):
        return h
    if isinstance(h, LowRankHessian):
        return h.embed(cols, d)
    out = np.zeros((d, d))
    out[np.ix_(cols, cols)] = h
    return out


def _embed_rows(m: np.ndarray, cols: np.ndarray, d: int) -> np.ndarray:
    if _owns_all(cols, d):
        return m  # VGG's fc1: 0.8 GB not copied
    out = np.zeros((d, m.shape[1]))
    out[cols] = m
    return out


def _unflat(w: np.ndarray, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, d_view + 1) rows back to (weights shaped like the layer's, bias)."""
    return w[:, :-1].reshape((len(w),) + like.shape[1:]).astype(like.dtype), w[:, -1].astype(like.dtype)
