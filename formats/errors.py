"""The one error type that bad feature files and checkpoints raise."""


class FormatError(ValueError):
    """A feature set, shard or checkpoint is malformed, corrupt, incomplete or incompatible.

    The message is one line and names the file and the problem, so a CLI can print it as-is.
    """
