"""Errors for user mistakes: one line that names the file, key or tensor and what is wrong.

The CLI catches `JaxloraError` (and `ValueError` raised on user input), prints
``jaxlora: error: <message>`` and exits non-zero without a traceback. A `JaxloraWarning` (a
fallback that worked, e.g. past a damaged checkpoint) is printed as one ``jaxlora: warning:``
line, without Python's source line.
"""

__all__ = [
    "JaxloraError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "CheckpointError",
    "JaxloraWarning",
]


class JaxloraError(ValueError):
    """Base class of errors caused by bad input rather than a bug."""


class ConfigError(JaxloraError):
    """A config file, key or value is wrong (CLI exit status 2)."""


class DataError(JaxloraError):
    """A dataset file or record is unusable."""


class ModelLoadError(JaxloraError):
    """A model file or folder cannot be loaded."""


class CheckpointError(JaxloraError):
    """A checkpoint or adapter file is missing, corrupt or does not fit the base."""


class JaxloraWarning(UserWarning):
    """Something was wrong and was worked around (the message says what and where)."""
