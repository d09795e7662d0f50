"""lmforge: build a language model end to end on Ray."""

__version__ = "0.1.0"


class LmforgeError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A config that cannot be loaded: unknown key, wrong type, missing file."""


class StageFailed(LmforgeError):
    """A stage ran and failed (its checks or its work); exit code 1, not a usage error."""

    exit_code = 1
