"""One small exception hierarchy. Every message names the model, node or field, and what to do."""


class OnnxZipError(Exception):
    """Base for every error onnxzip raises on purpose; `code` is stable for machines (CLI, REST)."""

    code = "onnxzip_error"


class InvalidModelError(OnnxZipError):
    """A model file is missing, corrupt, or uses something onnxzip refuses (external data, opset)."""

    code = "invalid_model"


class InvalidCalibrationError(OnnxZipError):
    """The calibration .npz is missing an input, has the wrong shape/dtype, NaNs, or is unsafe."""

    code = "invalid_calibration"


class AlignmentError(OnnxZipError):
    """The models' layers cannot be matched one to one (kind, kernel, stride, or structure differ)."""

    code = "cannot_align"


class UnsupportedGraphError(OnnxZipError):
    """A graph uses a construct onnxzip cannot merge safely; the message names the node."""

    code = "unsupported_graph"


class InvalidOptionsError(OnnxZipError):
    """A merge option is out of range or contradicts another."""

    code = "invalid_options"


class CancelledError(OnnxZipError):
    """The caller asked the merge to stop (between stages)."""

    code = "cancelled"


class NonFiniteError(OnnxZipError):
    """The merge produced NaN or infinite weights or outputs; nothing is written or published."""

    code = "non_finite_result"


class FidelityNotMetError(OnnxZipError):
    """A gate (require_agreement, require_rel_err, require_shared) failed; `report` says by how much."""

    code = "fidelity_not_met"

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
