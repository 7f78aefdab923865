"""Label-free distillation: after the closed-form merge, train the merged weights to match the
original models on unlabelled calibration inputs. It is the zippering paper's calibration stage
(Sec. 3.2: fine-tune the fused model on the tasks' losses plus a per-layer output loss) with the
original models as teachers instead of labels.

Needs PyTorch (the `distill` extra); everything else in onnxzip works without it.
"""

from __future__ import annotations

from ..errors import InvalidOptionsError

INSTALL_HINT = ('install the distillation extra: pip install "onnxzip[distill]" (PyTorch; on a CPU-only '
                "machine install the CPU build first: pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def require_torch() -> None:
    """Fail early, in one line, when distillation is asked for and PyTorch is missing."""
    try:
        import torch  # noqa: F401
    except ImportError as err:
        raise InvalidOptionsError(f"option distill needs PyTorch, which is not installed: {INSTALL_HINT}") from err


def distill(prepared, state, emitted, options, progress, cancel):
    """Train `state`'s layer weights toward the originals; see train.py. Returns (state, report section)."""
    from .train import distill as run

    return run(prepared, state, emitted, options, progress, cancel)
