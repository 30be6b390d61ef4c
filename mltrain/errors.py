"""User-facing errors.

Anything raised as an `MltrainError` is a user mistake or bad input: entry points print its
message (which names the file, key or value and says what to do) without a traceback.
"""


class MltrainError(Exception):
    """Base class for errors that are reported to the user as a message."""


class ConfigError(MltrainError):
    """A config file or override is invalid."""


class DataError(MltrainError):
    """The data root, an image or a split is unusable."""


class CheckpointError(MltrainError):
    """A checkpoint is missing, corrupt or unsafe."""


class BundleError(MltrainError):
    """A search bundle is missing, corrupt or inconsistent."""
