"""onnxzip: merge several trained networks into one multi-output ONNX model (Multi-Task Zipping)."""

__version__ = "0.1.0"

from .errors import (AlignmentError, CancelledError, InvalidCalibrationError, InvalidModelError,  # noqa: E402
                     InvalidOptionsError, OnnxZipError, UnsupportedGraphError)
from .options import MergeOptions  # noqa: E402
from .zipper import merge, prepare  # noqa: E402

__all__ = ["merge", "prepare", "MergeOptions", "OnnxZipError", "InvalidModelError", "InvalidCalibrationError",
           "AlignmentError", "UnsupportedGraphError", "InvalidOptionsError", "CancelledError", "__version__"]
