"""One error hierarchy for everything a user can get wrong.

Every message is one sentence that names the file, stage, op or module at fault, says what went wrong, and
ends with what to do about it. The CLI prints these without a traceback; anything else is a bug.
"""

from __future__ import annotations


class DyncError(Exception):
    """Base of every user-facing failure."""


class ModelLoadError(DyncError):
    """The model file cannot be read as a PyTorch model."""


class CaptureError(DyncError):
    """The model's forward cannot be captured as a graph (data-dependent control flow, bad input, ...)."""


class PartitionError(DyncError):
    """The captured graph cannot be split into per-exit stages."""


class ExportError(DyncError):
    """The package cannot be written where asked (the output exists and is not a dync package, ...)."""


class PackageError(DyncError):
    """A package directory is missing, corrupt or of an unsupported format version."""


class ProfileError(PackageError):
    """A package's latency profile is missing, malformed, or measured for a different package."""


class InstallError(DyncError):
    """dync is installed without something a command needs (an extra, the repository's examples/)."""


class InputError(DyncError):
    """Input data or run options do not match what the package expects."""


class QuantizationError(DyncError):
    """A package's stages cannot be quantized as asked; the message names the stage and op."""


class VerificationError(DyncError):
    """The package's outputs disagree with the eager model."""


class LintError(DyncError):
    """A deployment lint cannot run: unknown target or unreadable operator facts."""


class PluginError(DyncError):
    """A plugin op is unknown, registered twice, or lacks the face a caller needs."""


class SpatialLoweringError(DyncError):
    """The model cannot go through the spatial lowering pass at all (not a per-block ineligibility)."""


class SpatialLoweringWarning(UserWarning):
    """A masked block the spatial pass found but left dense; the message names the node and the reason."""


class TokenLoweringWarning(SpatialLoweringWarning):
    """A gated token MLP the token-dispatch pass found but left as it is; the message names the node and why."""


class SparseAttentionWarning(UserWarning):
    """A softmax attention that `--sparse-attention` leaves dense, and why."""


class PassUndoneWarning(UserWarning):
    """An exporter pass changed a stage's outputs, so export took its rewrite of that stage back; the message
    names the pass, the stage and the error."""


class ExitOrderWarning(UserWarning):
    """The exits look out of compute order: an earlier one alone costs more than a later one."""
