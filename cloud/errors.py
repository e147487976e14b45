"""The one error type the cloud side raises for bad input; the CLI prints its message as a single line."""


class CloudError(ValueError):
    """Bad flags, an unknown model, weights that do not fit, groups whose shapes differ, ...

    The message is one line and says what to do instead, so ``mist-cloud`` can print it as-is.
    """
