"""Zip one layer position: pair neurons and solve merged weights (MTZ), or refit a task's own layer.

Everything is expressed in the joint input space ("union" columns, bias last) so that partial
sharing, differing widths and more tasks are one formulation: a task's input vector has zeros in the
columns it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import pairing
from .canonicalize import Layer
from .hessian import Moments
from .views import AxisMap, GroupView


@dataclass
class TaskSide:
    """One task's layer at this position, with its moments and column maps."""

    task: str
    layer: Layer
    moments: Moments
    weight: float  # alpha or 1 - alpha
    in_map: Optional[AxisMap]
    view_w: np.ndarray  # original weights, input columns in view order, rows in ORIGINAL order
    view_b: np.ndarray
    exact: bool  # the layer's inputs in the merged model equal its original inputs
    inputs: Optional[np.ndarray] = None  # the layer's inputs in the merged model (all samples)

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
    pairs: list[tuple[int, int]]
    costs: np.ndarray  # cost of each shared pair
    view: GroupView
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # task -> (W, b) in view order


def refit(side: TaskSide, damping: float) -> np.ndarray:
    """Least squares of the layer's ORIGINAL pre-activations on its inputs in the merged model,
    ridge-pulled toward the original weights (so exact inputs give back exact weights)."""
    g = side.moments.hessian(1.0)
    ridge = pairing.damp(g, damping) - g
    rhs = side.moments.cross_moment(1.0) + ridge @ side.flat()
    return pairing.spd_solve(g + ridge, rhs)


def zip_pair(a: TaskSide, b: TaskSide, k: int, epsilon: Optional[float], options, tasks: list[str],
             rng: np.random.Generator) -> ZipResult:
    """Share up to k neurons between two tasks' layers; see module docstring for the spaces."""
    d = a.union_dim()
    ca, cb = a.columns(), b.columns()
    ha = _embed(a.moments.hessian(a.weight), ca, d)
    hb = _embed(b.moments.hessian(b.weight), cb, d)
    ha_d, hb_d = pairing.damp(ha, options.damping), pairing.damp(hb, options.damping)
    wa, wb = _embed_cols(a.flat(), ca, d), _embed_cols(b.flat(), cb, d)

    solve = pairing.SPDSolver(ha_d + hb_d)  # one factorization for costs and merged weights
    costs = pairing.pair_costs(wa, wb, ha_d, hb_d, solve)
    if options.pairing == "random":
        rows, cols = pairing.random_pairs(wa.shape[1], wb.shape[1], rng)
    else:
        rows, cols = pairing.assign(costs)
    pair_cost = costs[rows, cols]
    keep = np.arange(len(rows)) < k
    if epsilon is not None:
        keep &= pair_cost < epsilon
    rows, cols, pair_cost = rows[keep], cols[keep], pair_cost[keep]
    pairs = list(zip(rows.tolist(), cols.tolist()))
    view = GroupView.paired({a.task: wa.shape[1], b.task: wb.shape[1]}, pairs, a.task, b.task, tasks)

    shared = _shared_weights(a, b, rows, cols, ha, hb, ha_d, hb_d, wa, wb, ca, cb, d, options, solve)
    weights = {}
    for side, own_cols in ((a, ca), (b, cb)):
        own = _own_weights(side, options)
        order = view.order(side.task)  # original neuron index per view row
        by_neuron = {i: s for s, i in enumerate(rows if side is a else cols)}
        w = np.empty((len(order), len(own_cols)))
        for r, neuron in enumerate(order):
            s = by_neuron.get(int(neuron))
            w[r] = shared[own_cols, s] if s is not None else own[:, neuron]
        weights[side.task] = _unflat(w, side.layer, side.view_w)
    return ZipResult(pairs, pair_cost, view, weights)


def _shared_weights(a, b, rows, cols, ha, hb, ha_d, hb_d, wa, wb, ca, cb, d, options, solve) -> np.ndarray:
    """(d, k) merged weight vectors for the shared pairs, in union columns."""
    if len(rows) == 0:
        return np.zeros((d, 0))
    h = solve
    paper = pairing.merged_weights(h, ha_d @ wa[:, rows] + hb_d @ wb[:, cols])
    if not options.calibrate:
        return paper
    # Our closed-form recovery: fit the original models' pre-activations from the inputs the layer
    # sees in the merged model, ridge-pulled toward the paper's solution instead of toward zero.
    cross_a = _embed_rows(a.moments.cross_moment(a.weight)[:, rows], ca, d)
    cross_b = _embed_rows(b.moments.cross_moment(b.weight)[:, cols], cb, d)
    ridge = (ha_d - ha) + (hb_d - hb)
    return pairing.merged_weights(h, cross_a + cross_b + ridge @ paper)


def _own_weights(side: TaskSide, options) -> np.ndarray:
    """(d_view + 1, n) weights for neurons that stay the task's own."""
    if options.calibrate and not side.exact:
        return refit(side, options.damping)
    return side.flat()


def _embed(h: np.ndarray, cols: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((d, d))
    out[np.ix_(cols, cols)] = h
    return out


def _embed_rows(m: np.ndarray, cols: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((d, m.shape[1]))
    out[cols] = m
    return out


_embed_cols = _embed_rows


def _unflat(w: np.ndarray, layer: Layer, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, d_view + 1) rows back to (weights shaped like the layer's, bias)."""
    return w[:, :-1].reshape((len(w),) + like.shape[1:]).astype(like.dtype), w[:, -1].astype(like.dtype)
