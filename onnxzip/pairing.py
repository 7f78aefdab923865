"""Neuron pairing and merged weights: the math of Multi-Task Zipping (MTZ), vectorized.

Conventions: a weight matrix holds one neuron per COLUMN, in the joint ("union") input space with the
bias as the last row, so `A` is (d, n_A). Hessians are (d, d), already scaled by alpha/n and damped.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.optimize import linear_sum_assignment

from .lowrank import LowRankHessian


def damping_amount(h, damping: float) -> float:
    """lambda * mean(diag(H)): the ridge that keeps solves stable where calibration does not span
    the input (lambda itself when H is zero)."""
    if isinstance(h, LowRankHessian):
        scale = h.mean_diag()
    else:
        scale = float(np.mean(np.diag(h))) if h.size else 0.0
    return damping * scale if scale > 0 else damping


def add_identity(h, amount: float):
    """H + amount * I (a new matrix or low-rank Hessian)."""
    if isinstance(h, LowRankHessian):
        return h.plus_identity(amount)
    out = h.copy()
    out[np.diag_indices_from(out)] += amount
    return out


class SPDSolver:
    """Factor a symmetric positive definite H once (Cholesky), solve for many right-hand sides."""

    def __init__(self, h: np.ndarray):
        self.h = h
        self.woodbury = h.solver() if isinstance(h, LowRankHessian) else None
        if self.woodbury is not None:
            return
        try:
            self.factor = scipy.linalg.cho_factor(h, lower=True, check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            self.factor = None  # not numerically SPD: least squares below

    def __call__(self, rhs: np.ndarray) -> np.ndarray:
        if self.woodbury is not None:
            return self.woodbury(rhs)
        if self.factor is not None:
            return scipy.linalg.cho_solve(self.factor, rhs, check_finite=False)
        return np.linalg.lstsq(self.h, rhs, rcond=None)[0]


def spd_solve(h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve H X = RHS for symmetric positive definite H (Cholesky), falling back to lstsq."""
    return SPDSolver(h)(rhs)


def pair_costs(a: np.ndarray, b: np.ndarray, ha: np.ndarray, hb: np.ndarray,
               solve_sum=None, block: int = 1024) -> np.ndarray:
    """All pair costs d(i, j) = 1/2 (a_i - b_j)^T M (a_i - b_j), M = H_A (H_A + H_B)^-1 H_B (MTZ eq. 14).

    M does not depend on the pair, so every cost comes from one product:
    D = 1/2 (diag(A^T M A) 1^T + 1 diag(B^T M B)^T - 2 A^T M B). M itself is never formed: with
    S = H_A + H_B, M X = H_A S^-1 (H_B X), so two solves with n right-hand sides replace a (d x d) one
    (a 3x3 convolution has d = 9 n). O(d^3 / 3 + d^2 n + d n^2), no pair loop.
    `solve_sum` may pass an SPDSolver of H_A + H_B that the caller reuses for the merged weights;
    `block` columns are multiplied at once (bounds the temporaries; the result does not depend on it).
    """
    solve = solve_sum or SPDSolver(ha + hb)

    def m_times(x):  # M X
        return ha @ solve(hb @ x)

    # A block of columns at a time: for a 25,088-input layer every (d x n) temporary is 0.8 GB
    ma = np.empty(a.shape)
    for cols in _blocks(a.shape[1], block):
        ma[:, cols] = m_times(a[:, cols])
    da = np.einsum("dn,dn->n", a, ma)
    db = np.empty(b.shape[1])
    cross = np.empty((a.shape[1], b.shape[1]))
    for cols in _blocks(b.shape[1], block):
        mb = m_times(b[:, cols])
        db[cols] = np.einsum("dn,dn->n", b[:, cols], mb)
        # A^T M B, symmetrized over M = M^T (exact arithmetic) for the same rounding either way round
        cross[:, cols] = 0.5 * (a.T @ mb + ma.T @ b[:, cols])
    costs = 0.5 * (da[:, None] + db[None, :] - 2.0 * cross)
    return np.maximum(costs, 0.0)


def _blocks(n: int, size: int):
    return (slice(start, min(n, start + size)) for start in range(0, n, size))


def pair_cost_loop(a: np.ndarray, b: np.ndarray, ha: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """The same costs, one pair at a time, the way MTZ's reference code does it (for benchmarks)."""
    m = np.linalg.inv(np.linalg.inv(ha) + np.linalg.inv(hb))
    costs = np.empty((a.shape[1], b.shape[1]))
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            diff = a[:, i] - b[:, j]
            costs[i, j] = 0.5 * diff @ m @ diff
    return costs


def assign(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one pairing (min total cost), sorted by cost: (rows, cols) of min(n_A, n_B) pairs."""
    rows, cols = linear_sum_assignment(costs)
    order = np.argsort(costs[rows, cols], kind="stable")
    return rows[order], cols[order]


def random_pairs(n_a: int, n_b: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = min(n_a, n_b)
    return rng.permutation(n_a)[:k], rng.permutation(n_b)[:k]


def merged_weights(h, rhs: np.ndarray) -> np.ndarray:
    """MTZ eq. 16 / RegMean: w = (H_A + H_B)^-1 (H_A a + H_B b), one solve for all shared neurons.

    `h` is H_A + H_B (or its SPDSolver), `rhs` is H_A A_pairs + H_B B_pairs (or, when calibrating,
    the cross moments with the original models' pre-activations); one column per shared neuron.
    """
    return (h if isinstance(h, SPDSolver) else SPDSolver(h))(rhs)
