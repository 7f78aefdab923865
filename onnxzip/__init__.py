"""onnxzip: merge several trained networks into one multi-output ONNX model (Multi-Task Zipping)."""

__version__ = "0.1.0"

from .errors import (AlignmentError, CancelledError, InvalidCalibrationError, InvalidModelError,  # noqa: E402
                     InvalidOptionsError, OnnxZipError, UnsupportedGraphError)

__all__ = ["merge", "prepare", "MergeOptions", "OnnxZipError", "InvalidModelError", "InvalidCalibrationError",
           "AlignmentError", "UnsupportedGraphError", "InvalidOptionsError", "CancelledError", "__version__"]

# The engine (onnx, onnxruntime, numpy, pydantic) loads on first use, so `onnxzip --help`, `--version` and
# the service's CLI answer at once.
_LAZY = {"merge": ("zipper", "merge"), "prepare": ("zipper", "prepare"), "MergeOptions": ("options", "MergeOptions")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxzip' has no attribute {name!r}")
