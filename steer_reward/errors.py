"""The error types that mean "what the user gave is wrong" (as opposed to a bug), gathered for the CLI."""

from __future__ import annotations

from steer_reward.config import ConfigError
from steer_reward.formatting import FormattingError
from steer_reward.modeling import ModelLoadError
from steer_reward.schema import SchemaError

__all__ = ["InputError", "MissingExtraError", "USER_ERRORS", "require_extra"]


class InputError(ValueError):
    """A bad input file or line; the message names the file and line."""


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the pip extra that brings it."""


def require_extra(module: str, extra: str):
    """Import ``module`` or raise ``MissingExtraError`` naming ``pip install 'steer-reward[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{module} is not installed ({err}); install it with: pip install 'steer-reward[{extra}]'"
        ) from None


# File-system refusals (a missing folder, no permission, a folder where a file was meant) say what is wrong in
# one line of their own.
USER_ERRORS = (ConfigError, SchemaError, ModelLoadError, FormattingError, InputError, MissingExtraError,
               FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
