"""One exception hierarchy for user-caused failures; the CLI turns each into one line and exit code.

`InternalError` is for bugs: the CLI shows its traceback.
"""


class EdgePruneError(Exception):
    """A failure the user can fix; the message says how."""

    exit_code = 2


class ConfigError(EdgePruneError):
    """Bad recipe, flag or budget."""


class ModelLoadError(EdgePruneError):
    """The model directory is missing, incomplete or not a supported architecture."""


class ExportError(EdgePruneError):
    """Tracing or ONNX post-processing failed for a reason the user can act on."""


class BuildError(EdgePruneError):
    """TensorRT engine building failed or TensorRT is unavailable."""


class MissingDependencyError(EdgePruneError):
    """An optional dependency is not installed; the message names the install command."""


class InternalError(Exception):
    """A bug in edgeprune, not the user's input."""
