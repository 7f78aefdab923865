"""onnxruntime sessions: provider choice (CUDA only when it really loads), quiet logs, batched runs."""

from __future__ import annotations

import functools
import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import onnx

# onnxruntime's own warnings (failed CUDA loads, optimizer notes) are noise for our users.
_QUIET = 3


@functools.lru_cache(maxsize=1)
def _ort():
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA), "
            "never both") from err
    ort.set_default_logger_severity(_QUIET)
    return ort


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when onnxruntime's CUDA provider actually loads here (libraries and a GPU present)."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7)
    ort.set_default_logger_severity(4)  # a failed CUDA load logs errors we expect here
    try:
        session = ort.InferenceSession(probe.SerializeToString(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(_QUIET)


def known_providers() -> list[str]:
    """Every execution provider name this onnxruntime knows, the ones this build has first."""
    ort = _ort()
    available = list(ort.get_available_providers())
    return available + [p for p in ort.get_all_providers() if p not in available]


def default_providers() -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_available() else ["CPUExecutionProvider"]


def resolve_providers(requested: Optional[Sequence[str]]) -> list[str]:
    """The providers a merge runs on: the default, or the requested ones if each really runs here."""
    if not requested:
        return default_providers()
    from .errors import InvalidOptionsError

    available = _ort().get_available_providers()
    for name in requested:
        if name not in available or (name == "CUDAExecutionProvider" and not cuda_available()):
            usable = default_providers()
            raise InvalidOptionsError(
                f"option providers: {name} cannot run here (this onnxruntime {_ort().__version__} can use "
                f"{', '.join(usable)}); leave providers unset to use the best one that works")
    return list(requested)


def provider_options(providers: Sequence[str]) -> list[dict]:
    # TF32 off: activations feed Hessians, and GPU results must match the CPU's.
    return [{"use_tf32": "0"} if p == "CUDAExecutionProvider" else {} for p in providers]


def runtime_info() -> dict:
    ort = _ort()
    return {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
            "cuda_usable": cuda_available()}


def make_session(model: onnx.ModelProto | bytes | str, providers: Optional[Sequence[str]] = None,
                 optimize: bool = False):
    """An InferenceSession; graph optimizations stay off when we capture intermediates, so that
    onnxruntime neither fuses them away nor renames them."""
    ort = _ort()
    providers = list(providers or default_providers())
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    threads = os.environ.get("ONNXZIP_ORT_THREADS")
    if threads:  # several merges side by side (service workers) must not each use every core
        options.intra_op_num_threads = int(threads)
    # No spin-waiting after a run: numpy's BLAS (Grams, Cholesky) runs between our many short runs, and
    # onnxruntime's spinning threads would hold the cores it needs (a 145 x 145 Cholesky took 60 ms
    # instead of 0.2 ms behind them on 2 cores) and burn CPU time for nothing.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=providers,
                                provider_options=provider_options(providers))


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def run_batched(session, feeds: dict[str, np.ndarray], outputs: Iterable[str],
                batch_size: int) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Run `session` over the samples of `feeds` (axis 0) in batches, yielding (slice, outputs)."""
    outputs = list(outputs)
    n = len(next(iter(feeds.values())))
    for part in batches(n, batch_size):
        yield part, session.run(outputs, {k: v[part] for k, v in feeds.items()})
