"""The device's one user-facing error besides the contract's FormatError."""


class TrainingError(RuntimeError):
    """Training or evaluation cannot go on (bad data, a non-finite loss, a run directory in the way); the
    message is one line for the CLI."""
