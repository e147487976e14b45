"""The click conventions ``mist-device`` and ``mist-cloud`` share: settings, the version string, one-line
errors, options grouped under headings in ``--help``, and help that teaches.

It imports only click and the standard library (not NumPy), so ``--threads`` can still set the BLAS thread
count before NumPy loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import click

from .text import terminal_text

# The exit status of a process killed by SIGPIPE in a shell (128 + 13): `mist-device predict ... | head -1`
# stops early, quietly, the way `yes | head -1` does.
BROKEN_PIPE_EXIT = 141

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


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options under headings, when ``option_sections`` is set:
    ``{"Heading": ["option_name", ...]}``; options in no section come last under "Other options"."""

    option_sections: dict[str, list[str]] | None = None

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if not self.option_sections:
            return super().format_options(ctx, formatter)
        help_option = self.get_help_option(ctx)
        records = {"help" if p is help_option else p.name: p.get_help_record(ctx) for p in self.get_params(ctx)
                   if isinstance(p, click.Option)}
        records = {name: r for name, r in records.items() if r is not None}
        placed = {"help"}  # --help closes the last section rather than opening an "Other options" of its own
        headings = list(self.option_sections.items())
        for number, (heading, names) in enumerate(headings, 1):
            rows = [records[n] for n in names if n in records]
            placed.update(names)
            if number == len(headings) and "help" in records:
                rows.append(records["help"])
            if rows:
                with formatter.section(heading):
                    formatter.write_dl(rows)
        rest = [r for name, r in records.items() if name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)


def envvar_name(command: str, option: str) -> str:
    """The documented rule: ``MIST_<COMMAND>_<OPTION>``, the command's name and the option's long flag in
    capitals, dashes as underscores: ``train --out`` reads ``MIST_TRAIN_OUT``, ``push --part-size``
    ``MIST_PUSH_PART_SIZE``, ``train --json`` ``MIST_TRAIN_JSON`` (never the Python parameter's name)."""
    return f"MIST_{command}_{option.lstrip('-')}".upper().replace("-", "_")


def long_flag(option: click.Option) -> str:
    """An option's long flag (``--out``), the name its environment variable is made from."""
    return next((o for o in option.opts if o.startswith("--")), option.opts[0])


def refuse_to_replace(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Every command that writes a file refuses to replace one unless ``--overwrite`` is given."""
    if not overwrite and os.path.lexists(path):
        raise click.UsageError(f"{path} already exists; pass --overwrite to replace it, or another {flag}")


def teach(group: click.Group, short_help: dict[str, str], epilogs: dict[str, str],
          sections: dict[str, dict[str, list[str]]], metavars: dict[str, str], option_help: dict[str, str]) -> None:
    """Make ``--help`` teach: a summary that fits, examples in each epilog, every option's environment
    variable named by the one rule (``envvar_name``) and shown, one metavar per concept (``metavars``: option
    name -> METAVAR) and help for options that lack it. Kept apart from the option definitions, so adding an
    option stays a one-place change."""
    for name, command in group.commands.items():
        if name in short_help:
            command.short_help = short_help[name]
        if name in epilogs:
            command.epilog = epilogs[name]
        if name in sections and isinstance(command, SectionedCommand):
            command.option_sections = sections[name]
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            # click's automatic name comes from the Python parameter (--out "run_dir" -> MIST_TRAIN_RUN_DIR);
            # the documented rule takes the flag. An option that also reads a shared variable (the S3
            # endpoint) keeps it, after this one.
            wanted = envvar_name(name, long_flag(param))
            shared = [] if param.envvar is None else [param.envvar] if isinstance(param.envvar, str) else param.envvar
            param.envvar = [wanted, *(v for v in shared if v != wanted)] if shared else wanted
            param.allow_from_autoenv = False  # else click falls back to the Python name after the documented one
            param.show_envvar = True
            if param.name in metavars and not param.is_flag:
                param.metavar = metavars[param.name]
            elif param.metavar is None and isinstance(param.type, (click.IntRange, click.FloatRange)):
                # "INTEGER RANGE" says less than the bounds click prints beside it: name the number's kind
                param.metavar = "INTEGER" if isinstance(param.type, click.IntRange) else "FLOAT"
            if not param.help and param.name in option_help:
                param.help = option_help[param.name]


def completion_help(prog: str) -> str:
    """The epilog line that documents click's shell completion for ``prog``."""
    var = "_" + prog.upper().replace("-", "_") + "_COMPLETE"
    return ("\b\nShell completion: add this line to ~/.bashrc (zsh: zsh_source in ~/.zshrc; fish: fish_source)\n"
            f"  eval \"$({var}=bash_source {prog})\"")


def _quiet_broken_pipe() -> click.exceptions.Exit:
    """The reader of stdout went away: point stdout at /dev/null, so the flush at exit cannot complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test runner)
        pass
    return click.exceptions.Exit(BROKEN_PIPE_EXIT)


def one_line_errors(user_error_message: Callable[[Exception], str | None],
                    interrupted: str | None = None) -> type[click.Group]:
    """A click group class that turns the errors a user can fix into one line on stderr and exit status 1.

    ``user_error_message`` returns that line for such an error, or None for a bug, which keeps its traceback.
    ``interrupted`` is the line for Ctrl-C; without it click's own "Aborted!" is printed.
    Every message is passed through ``terminal_text``, so a path or class name holding a newline or an
    escape sequence still makes one harmless line. A closed stdout pipe ends the command quietly with
    status 141, like any Unix tool killed by SIGPIPE.
    """

    class OneLineErrors(click.Group):
        command_class = SectionedCommand  # every subcommand may group its options under headings

        def invoke(self, ctx: click.Context):
            try:
                result = super().invoke(ctx)
                sys.stdout.flush()  # inside the try: a reader that left shows up here, not at exit
                return result
            except BrokenPipeError:
                raise _quiet_broken_pipe() from None
            except click.ClickException as e:
                e.message = terminal_text(e.message, getattr(sys.stderr, "encoding", None))
                raise
            except (click.exceptions.Exit, click.Abort):
                raise
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                raise click.ClickException(interrupted) from None
            except Exception as e:
                message = user_error_message(e)
                if message is None:
                    raise
                raise click.ClickException(terminal_text(message, getattr(sys.stderr, "encoding", None))) from None

    return OneLineErrors
