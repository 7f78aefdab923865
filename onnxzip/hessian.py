"""Streaming second moments of a layer's inputs: the layer Hessians of MTZ, accumulated batch by batch.

For a fully connected layer a row of X is one sample's input; for a convolution it is one k*k*C_in
patch (im2col), so a batch contributes samples*H_out*W_out rows. Moments are kept in float64; the
activations themselves never are, and only one batch of them is alive at a time.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from .canonicalize import CanonicalModel, Layer
from .lowrank import LowRankHessian

# Rows multiplied at once: bounds the float64 temporaries of one update.
_CHUNK_ROWS = 8192
# A sampled layer keeps at least this many rows per input (see kept_rows).
MIN_ROWS_PER_INPUT = 16
# hessian_rows "auto" (opt-in; the default stays 32,768): ROWS_PER_INPUT rows per input (d + 1), within
# [AUTO_MIN_ROWS, AUTO_MAX_ROWS]. A Hessian's estimate depends on its rows per input, not on one fixed
# count: 32,768 rows are 226 per input on a 145-input layer and 57 on a 577-input one. Accuracy drop at
# full share, mean of 8 seeds (points; one test sample is 0.17): resnet_legacy 1.84 against 1.71 from
# every row and 1.77 from 32,768; mobilenet_legacy 5.80 against 6.15 and 6.08 (a seed's spread 0.3-0.9).
# Not the default: at seed 0 it moves pinned test caps (mobilenet_legacy 7.54 against a cap of 7.5),
# and with a floor of 8,192 three_tasks_legacy (a: 3.18 against a cap of 3.0).
ROWS_PER_INPUT = 64
AUTO_MIN_ROWS, AUTO_MAX_ROWS = 16384, 32768


def layer_rows(layer: Layer, x: np.ndarray, index: Optional[np.ndarray] = None) -> np.ndarray:
    """The rows the layer's weights see: x itself for Gemm, im2col patches for Conv; only the rows
    at `index` (into this batch's rows, in order) when given."""
    if layer.kind == "linear":  # channels last: every position of a rank >= 3 input is a row
        rows = x.reshape(-1, x.shape[-1])
        return rows if index is None else rows[index]
    attrs = layer.node.attrs
    return im2col(x, layer.kernel, attrs["strides"], attrs["pads"], attrs["dilations"], index)


def output_rows(layer: Layer, y: np.ndarray, index: Optional[np.ndarray] = None) -> np.ndarray:
    """A layer's pre-activations as rows matching `layer_rows` (channels last)."""
    if layer.kind == "linear":
        rows = y.reshape(-1, y.shape[-1])
        return rows if index is None else rows[index]
    if index is None:
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    spatial = y.shape[2:]
    sample, position = np.divmod(index, int(np.prod(spatial)))
    # advanced indices split by the channel slice: the rows come first, (rows, channels)
    return y[(sample, slice(None)) + np.unravel_index(position, spatial)]


def rows_per_sample(layer: Layer, x: np.ndarray) -> int:
    """Rows one sample contributes: 1 for Gemm, the positions of a channels-last linear layer's input,
    the output positions of a Conv."""
    if layer.kind == "linear":
        return int(np.prod(x.shape[1:-1], dtype=np.int64))
    attrs = layer.node.attrs
    return len(im2col(x[:1, :1], layer.kernel, attrs["strides"], attrs["pads"], attrs["dilations"]))


def auto_rows(dim: int) -> int:
    """The default cap for a layer with `dim` inputs: ROWS_PER_INPUT * (dim + 1) within
    [AUTO_MIN_ROWS, AUTO_MAX_ROWS] (3x3 convolutions of 16 channels, 144 inputs: 16,384 rows; of 32:
    18,496; of 64 and more: 32,768)."""
    return min(AUTO_MAX_ROWS, max(AUTO_MIN_ROWS, ROWS_PER_INPUT * (dim + 1)))


def kept_rows(total: int, dim: int, cap) -> int:
    """How many of a layer's `total` calibration rows feed its Hessian: all (cap None), `cap` rows, or
    with cap "auto" auto_rows(dim); never fewer than MIN_ROWS_PER_INPUT per input (so the Hessian stays
    well determined)."""
    if cap is None:
        return total
    if cap == "auto":
        cap = auto_rows(dim)
    return min(total, max(cap, MIN_ROWS_PER_INPUT * (dim + 1)))


class RowSample:
    """A fixed random subset of a layer's calibration rows (sample-major order, like im2col), drawn
    from the merge seed and the layer position so that every task's layer there (and every run)
    uses the same rows. Hands out each batch's part as indices into that batch's rows."""

    def __init__(self, total: int, keep: int, per_sample: int, seed: tuple):
        self.total, self.per_sample = total, per_sample
        self.index = None if keep >= total else np.sort(
            np.random.default_rng(seed).choice(total, size=keep, replace=False))

    @property
    def kept(self) -> int:
        return self.total if self.index is None else len(self.index)

    def batch(self, part: slice) -> Optional[np.ndarray]:
        """Indices into the rows of samples part.start:part.stop, or None for all of them."""
        if self.index is None:
            return None
        span = self.span(part)
        return self.index[span] - part.start * self.per_sample

    def span(self, part: slice) -> slice:
        """Where the kept rows of samples part.start:part.stop lie among all kept rows (in order)."""
        lo, hi = part.start * self.per_sample, part.stop * self.per_sample
        if self.index is not None:
            lo, hi = np.searchsorted(self.index, [lo, hi])
        return slice(int(lo), int(hi))


def position_sample(models: Iterable[CanonicalModel], layer: Layer, samples: int, per_sample: int,
                    cap, seed: int) -> RowSample:
    """The rows behind the Hessians at `layer`'s position: the same for every task's layer there
    (tasks sharing a Gram, and the tied-channel statistics, compare rows one to one), drawn from the
    merge seed and the position so every run uses the same rows."""
    total = samples * per_sample
    there = [m.layers[layer.index] for m in models if layer.index < len(m.layers)]
    dim = max(int(np.prod(l.weight.shape[1:])) for l in there)
    return RowSample(total, kept_rows(total, dim, cap), per_sample, (seed, layer.index))


def im2col(x: np.ndarray, kernel, strides, pads, dilations, index: Optional[np.ndarray] = None) -> np.ndarray:
    """(b, C, *spatial) -> (b * output positions, C * prod(kernel)) for a convolution of any rank,
    columns ordered like W.reshape(out, -1); only the rows at `index` when given (gathered directly,
    the other patches are never built)."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    rank = len(spatial)
    begins, ends = list(pads[:rank]), list(pads[rank:])
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begins, ends))) if any(pads) else x
    out = [(n + p0 + p1 - d * (k - 1) - 1) // s + 1
           for n, k, s, d, p0, p1 in zip(spatial, kernel, strides, dilations, begins, ends)]
    offsets = list(np.ndindex(*kernel))  # kernel positions, in the order of W's flattened columns
    if index is not None:
        sample, position = np.divmod(index, int(np.prod(out)))
        corner = [o * s for o, s in zip(np.unravel_index(position, out), strides)]
        cols = np.empty((len(index), c) + tuple(kernel), dtype=x.dtype)
        for off in offsets:
            at = tuple(corner[a] + off[a] * dilations[a] for a in range(rank))
            cols[(slice(None), slice(None)) + off] = xp[(sample, slice(None)) + at]  # (rows, C)
        return cols.reshape(len(index), -1)
    cols = np.empty((b,) + tuple(out) + (c,) + tuple(kernel), dtype=x.dtype)
    for off in offsets:
        window = xp[(slice(None), slice(None)) + tuple(
            slice(off[a] * dilations[a], off[a] * dilations[a] + strides[a] * (out[a] - 1) + 1, strides[a])
            for a in range(rank))]
        cols[(slice(None),) * (rank + 2) + off] = np.moveaxis(window, 1, -1)
    return cols.reshape(b * int(np.prod(out)), -1)


class Moments:
    """Running sum of [x, 1][x, 1]^T (and of [x, 1] y^T when targets are given), plus the row count.

    Each chunk's product runs in the activations' float32 (twice the speed of float64 BLAS); the
    sums across chunks are float64, which bounds the rounding to one chunk's worth.
    """

    def __init__(self, dim: int, targets: Optional[int] = None, gram: Optional[np.ndarray] = None):
        self.gram = np.zeros((dim + 1, dim + 1)) if gram is None else gram
        self.own_gram = gram is None  # False: the gram is another task's (identical inputs)
        self.cross = np.zeros((dim + 1, targets)) if targets else None
        self.rows = 0

    def update(self, x: np.ndarray, y: Optional[np.ndarray] = None) -> None:
        for start in range(0, len(x), _CHUNK_ROWS):
            xb = np.empty((min(_CHUNK_ROWS, len(x) - start), x.shape[1] + 1), dtype=np.float32)
            xb[:, :-1] = x[start:start + len(xb)]
            xb[:, -1] = 1.0
            if self.own_gram:
                self.gram += xb.T @ xb
            if self.cross is not None:
                self.cross += xb.T @ y[start:start + len(xb)].astype(np.float32, copy=False)
        self.rows += len(x)

    def hessian(self, weight: float) -> np.ndarray:
        """weight/n * sum x x^T: MTZ's layer Hessian (eq. 7-8) with alpha or 1-alpha as weight."""
        return self.gram * (weight / max(self.rows, 1))

    def cross_moment(self, weight: float, columns=None) -> np.ndarray:
        """weight/n * sum x y^T, for the given target columns only when given."""
        return (self.cross if columns is None else self.cross[:, columns]) * (weight / max(self.rows, 1))


class RowMoments(Moments):
    """Moments that keep the rows themselves (float64, with the 1 column) instead of their Gram, for
    layers with fewer calibration rows than inputs: the Hessian is then low-rank plus damping and is
    used through its rows (lowrank.py). `gram` is the rows array, shared by tasks whose inputs are
    identical like a Gram is."""

    def __init__(self, dim: int, total_rows: int, targets: Optional[int] = None,
                 gram: Optional[np.ndarray] = None):
        super().__init__(dim, targets, gram=np.zeros(0))
        self.own_gram = gram is None
        self.gram = np.empty((total_rows, dim + 1)) if gram is None else gram

    def update(self, x: np.ndarray, y: Optional[np.ndarray] = None) -> None:
        if self.own_gram:
            self.gram[self.rows:self.rows + len(x), :-1] = x
            self.gram[self.rows:self.rows + len(x), -1] = 1.0
        own, self.own_gram = self.own_gram, False  # cross moments as usual, no Gram
        super().update(x, y)
        self.own_gram = own

    def hessian(self, weight: float) -> LowRankHessian:
        return LowRankHessian.of_rows(self.gram, weight / max(self.rows, 1))


class KroneckerMoments(Moments):
    """Moments whose Hessian is the per-channel (C x C) one, as MTZ's reference code does for wide
    convolutions: H ~ H_c (x) I_kk, i.e. each kernel position sees the channel statistics of the input
    pixels and positions are taken as uncorrelated. The Gram costs rows * C^2 instead of
    rows * (C k k)^2. Too rough for least squares (exact_gram False): such layers merge by MTZ's
    formula."""

    exact_gram = False

    def __init__(self, channels: int, kk: int, targets: Optional[int] = None, gram: Optional[np.ndarray] = None):
        super().__init__(channels * kk, targets, gram=np.zeros(0))
        self.channels, self.kk = channels, kk
        self.gram = np.zeros((channels + 1, channels + 1)) if gram is None else gram
        self.own_gram = gram is None

    def update(self, x: np.ndarray, y: Optional[np.ndarray] = None) -> None:
        own, self.own_gram = self.own_gram, False  # the full Gram is never formed
        super().update(x, y)
        self.own_gram = own
        if own:
            centre = x[:, self.kk // 2::self.kk]  # each patch's middle pixel: one input pixel per row
            for start in range(0, len(centre), _CHUNK_ROWS):
                xb = np.empty((min(_CHUNK_ROWS, len(centre) - start), self.channels + 1), dtype=np.float32)
                xb[:, :-1] = centre[start:start + len(xb)]
                xb[:, -1] = 1.0
                self.gram += xb.T @ xb

    def hessian(self, weight: float) -> np.ndarray:
        """The (C k k + 1)-sized Hessian the rest of onnxzip expects, built from the channel one."""
        c, kk = self.channels, self.kk
        h = self.gram * (weight / max(self.rows, 1))
        full = np.zeros((c * kk + 1, c * kk + 1))
        # The bias is shared out over the k*k positions (each adds b/kk), which keeps H positive
        # semi-definite: E[(sum_p x_p.dw_p + db)^2] ~ sum_p E[(x_p.dw_p + db/kk)^2].
        full[:-1, :-1] = np.kron(h[:-1, :-1], np.eye(kk))
        full[:-1, -1] = full[-1, :-1] = np.repeat(h[:-1, -1], kk) / kk
        full[-1, -1] = h[-1, -1] / kk
        return full


class ChannelMoments:
    """Moments per channel, for depthwise convolutions: channel c's k*k patches predict only output
    channel c, so each channel has its own (k*k+1)-sized Hessian."""

    def __init__(self, channels: int, kk: int, targets: bool):
        self.gram = np.zeros((channels, kk + 1, kk + 1))
        self.cross = np.zeros((channels, kk + 1)) if targets else None
        self.rows = 0
        self.own_gram = True

    def update(self, x: np.ndarray, y: Optional[np.ndarray] = None) -> None:
        channels = self.gram.shape[0]
        for start in range(0, len(x), _CHUNK_ROWS):
            part = x[start:start + _CHUNK_ROWS].reshape(-1, channels, self.gram.shape[1] - 1)
            xb = np.concatenate([part, np.ones(part.shape[:2] + (1,), np.float32)], axis=2)
            self.gram += np.einsum("rci,rcj->cij", xb, xb, optimize=True)
            if self.cross is not None:
                self.cross += np.einsum("rci,rc->ci", xb, y[start:start + _CHUNK_ROWS].astype(np.float32))
        self.rows += len(x)

    def hessian(self, weight: float) -> np.ndarray:
        return self.gram * (weight / max(self.rows, 1))

    def cross_moment(self, weight: float) -> np.ndarray:
        return self.cross * (weight / max(self.rows, 1))
