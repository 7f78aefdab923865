"""How many threads numpy/scipy's BLAS may use for a piece of work.

A layer's work (its Gram, a (8192 x d) product per chunk; the Cholesky of its (d+1) x (d+1) Hessian,
pair costs, merged weights) runs between many short onnxruntime runs. Whenever the cores are busy
(onnxruntime's threads, other processes) multithreaded OpenBLAS waits for its own threads: a 145 x 145
Cholesky that takes 0.1 ms took 60 ms inside a merge on a shared 2-core machine, and a (32768 x 146)
Gram 62 ms on two threads against 15 ms on one. So a layer with up to SMALL_DIM inputs does all its
BLAS work on one thread (which also spends the least CPU time); wider layers keep the default.
"""

from __future__ import annotations

import contextlib
import functools

# Layers with at most this many inputs (d + 1) solve on one BLAS thread: a 1025 x 1025 Cholesky is
# about 10 ms on one core, where threads save little and risk much.
SMALL_DIM = 1025


@functools.lru_cache(maxsize=1)
def _controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it the BLAS keeps its own thread count
        return None
    try:
        return ThreadpoolController()
    except Exception:  # pragma: no cover - an unusual BLAS build
        return None


def blas_threads(n: int):
    """A context in which numpy's and scipy's BLAS use at most n threads (no-op without threadpoolctl)."""
    controller = _controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=n, user_api="blas")


def small_work(dim: int):
    """One BLAS thread for the work of a layer with `dim` inputs (bias included) up to SMALL_DIM."""
    return blas_threads(1) if dim <= SMALL_DIM else contextlib.nullcontext()
