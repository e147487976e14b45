"""What ``mist-device`` and ``mist-cloud`` share: click settings, the version string, one-line errors.

It lives on the device side because that is the base install, which the cloud extra builds on. It imports
only click (not NumPy), so ``--threads`` can still set the BLAS thread count before NumPy loads.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import click

CONTEXT = {"auto_envvar_prefix": "MIST", "show_default": True, "help_option_names": ["-h", "--help"]}


def package_version() -> str:
    try:
        return version("mist-tuning")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def os_error_message(e: OSError) -> str:
    """``path: No space left on device``, not a traceback."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def one_line_errors(user_error_message: Callable[[Exception], str | None],
                    interrupted: str | None = None) -> type[click.Group]:
    """A click group class that turns the errors a user can fix into one line on stderr and exit status 1.

    ``user_error_message`` returns that line for such an error, or None for a bug, which keeps its traceback.
    ``interrupted`` is the line for Ctrl-C; without it click's own "Aborted!" is printed.
    """

    class OneLineErrors(click.Group):
        def invoke(self, ctx: click.Context):
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                raise click.ClickException(interrupted) from None
            except Exception as e:
                message = user_error_message(e)
                if message is None:
                    raise
                raise click.ClickException(message) from None

    return OneLineErrors
