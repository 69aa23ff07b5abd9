"""User-facing errors.

Anything a user can cause (a bad file, a bad config, an unknown task name) raises a
:class:`HermesError` subclass whose message names the file or key and the problem; the CLI
prints it without a traceback. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class HermesError(Exception):
    """Base class of errors caused by input, configuration or environment."""


class ConfigError(HermesError):
    """A YAML config or catalog is invalid."""


class DataError(HermesError):
    """An image, label or dataset folder is unreadable or inconsistent."""


class ModelError(HermesError):
    """A saved model directory is missing, incomplete or incompatible."""
