"""Every exception the package raises on purpose, in one hierarchy (the ground floor: it imports
nothing of the package, so any layer may raise these).

Each class also keeps the builtin base it always had (``ValueError``, ``RuntimeError``), so code
that caught ``ValueError`` before still does; ``ScalingAttnError`` catches them all.
"""


class ScalingAttnError(Exception):
    """Base of the package's own errors."""


# -- the plan (plan/) --------------------------------------------------------------------------


class PlanError(ScalingAttnError, ValueError):
    """A plan that cannot be used: bad file, wrong version, wrong model, bad arguments."""


class PlanFileError(PlanError):
    """The file is not a readable plan (truncated, corrupted, not a plan)."""


class PlanVersionError(PlanError):
    """The file's format version is not the one this package reads."""


class PlanModelMismatch(PlanError):
    """The plan was calibrated for another model (config or weights)."""


class SchemaError(ScalingAttnError, ValueError):
    """The metadata breaks the schema; the message names the field."""


# -- the model adapters (models/) --------------------------------------------------------------


class UnsupportedModelError(ScalingAttnError, TypeError):
    """The transformer's class is not one an adapter in ``models/`` knows."""


# -- the compile pass (compile/) ---------------------------------------------------------------


class PlanMismatchError(ScalingAttnError, ValueError):
    """The plan does not fit the compiled model (layers, heads, head_dim, grid or dtype)."""


class DynamicShapeError(ScalingAttnError, RuntimeError):
    """A self-attention sequence length is symbolic; masks exist per static resolution."""


class TokenOrderError(ScalingAttnError, ValueError):
    """The graph cannot be run in the plan's token order (missing sites, unknown per-token input)."""


# -- the command line (cli.py) -----------------------------------------------------------------


class CliError(ScalingAttnError):
    """A user error found by a command (bad combination of arguments, unusable output path):
    printed as one line, exit status 2."""
