"""Layer Hessians kept as their rows, for layers with more inputs than calibration rows.

VGG-16's first fully connected layer reads 25,088 inputs: its Gram is 5 GB in float64 and a
Cholesky of it costs minutes, yet with a few hundred calibration samples it has rank at most a few
hundred. Such a Hessian is kept as H = sum_i c_i X_i^T X_i + lambda I (the rows X_i, the damping
lambda) and every operation the zipper needs is done through the rows: products H R, sums, the
damping, and solves by the Woodbury identity, which factor an (m x m) matrix (m = rows) instead of a
(d x d) one. Same math as the dense path, to rounding.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.linalg


class LowRankHessian:
    """sum_i c_i X_i^T X_i + diag(lam), with each X_i (rows, d) float64; lam a scalar (lam * I) or one
    value per column (a task damped on the columns it owns only)."""

    def __init__(self, terms: list[tuple[np.ndarray, float]], lam, dim: int):
        self.terms = terms
        self.lam = lam
        self.dim = dim

    @classmethod
    def of_rows(cls, rows: np.ndarray, coef: float) -> "LowRankHessian":
        return cls([(rows, coef)], 0.0, rows.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.dim, self.dim

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self
        terms = list(self.terms)
        for x, c in other.terms:
            # the same rows object (tasks reading one shared trunk tensor): add coefficients
            at = next((i for i, (y, _) in enumerate(terms) if y is x), None)
            if at is None:
                terms.append((x, c))
            else:
                terms[at] = (x, terms[at][1] + c)
        return LowRankHessian(terms, self.lam + other.lam, self.dim)

    __radd__ = __add__

    def __matmul__(self, r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, dtype=np.float64)
        out = _diagonal(self.lam, r.ndim) * r
        for x, c in self.terms:  # in place: one (d x n) temporary, not three (fc1: 0.8 GB each)
            term = x.T @ (x @ r)
            term *= c
            out += term
        return out

    def mean_diag(self) -> float:
        return sum(c * float(np.einsum("rd,rd->", x, x)) for x, c in self.terms) / self.dim + float(np.mean(self.lam))

    def plus_identity(self, amount) -> "LowRankHessian":
        """+ amount * I, or + diag(amount) for one value per column."""
        return LowRankHessian(self.terms, self.lam + amount, self.dim)

    def embed(self, cols: np.ndarray, d: int) -> "LowRankHessian":
        """The same Hessian on a wider (union) input space: the given columns, zeros elsewhere."""
        # lam * I on the task's own columns only would not be low-rank + scalar; an undamped
        # Hessian (lam = 0), which is what gets embedded, has no such part
        if np.any(self.lam):
            raise ValueError("embed the undamped Hessian, then damp it")
        terms = []
        for x, c in self.terms:
            wide = np.zeros((len(x), d))
            wide[:, cols] = x
            terms.append((wide, c))
        return LowRankHessian(terms, 0.0, d)

    def solver(self) -> "WoodburySolver":
        return WoodburySolver(self)


class WoodburySolver:
    """(D + Z^T Z)^-1 R = D^-1 (R - Z^T (I + Z D^-1 Z^T)^-1 Z D^-1 R), Z the stacked sqrt(c_i) X_i and D
    the damping: an (m x m) factor instead of a (d x d) one."""

    def __init__(self, h: LowRankHessian):
        if np.any(np.asarray(h.lam) <= 0):
            raise ValueError("a low-rank Hessian needs damping > 0 on every column to be invertible")
        self.lam = h.lam
        self.z: Optional[np.ndarray] = (np.vstack([np.sqrt(c) * x for x, c in h.terms]) if h.terms else None)
        if self.z is not None:
            inner = (self.z / self.lam) @ self.z.T
            inner[np.diag_indices_from(inner)] += 1.0
            self.factor = scipy.linalg.cho_factor(inner, lower=True, check_finite=False)

    def __call__(self, rhs: np.ndarray) -> np.ndarray:
        scaled = rhs / _diagonal(self.lam, np.ndim(rhs))
        if self.z is None:
            return scaled
        inner = scipy.linalg.cho_solve(self.factor, self.z @ scaled, check_finite=False)
        out = self.z.T @ inner
        out /= _diagonal(self.lam, out.ndim)
        np.subtract(scaled, out, out=out)  # in place, as in __matmul__
        return out


def _diagonal(lam, ndim: int):
    """lam as a factor for (d,) or (d, n) arrays: a scalar, or one value per row."""
    lam = np.asarray(lam, dtype=np.float64)
    return lam if lam.ndim == 0 or ndim == 1 else lam[:, None]
