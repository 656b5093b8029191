"""User-facing error types.

Every `RptqError` is a mistake the user can fix (bad option, bad file, unsupported model); its
message is one line saying what failed, where, and the fix. The CLI prints it as `error: ...` and
exits 1. Any other exception is a bug in rptq and keeps its traceback.
"""


class RptqError(Exception):
    """Base class of errors caused by user input or the environment, not by rptq bugs."""


class ConfigError(RptqError):
    """An option or combination of options is invalid."""


class ModelError(RptqError):
    """The model cannot be loaded or is not a supported architecture."""


class DataError(RptqError):
    """Calibration or evaluation data is missing, unreadable or too short."""


class PlanError(RptqError):
    """A quantization plan is malformed, corrupt or does not match the model."""


class GraphPatternError(RptqError):
    """An ONNX graph does not have the structure a pass expects."""


class TargetRuleError(RptqError):
    """An ONNX graph breaks a rule of the target runtime."""


class MissingDependencyError(RptqError):
    """An optional dependency (TensorRT, onnxruntime-gpu, datasets) is not installed."""


class ParityError(RptqError):
    """Two backends disagree by more than the stated tolerance."""


class OutputError(RptqError):
    """An output path exists, is not writable, or could not be written."""
