"""Flag types and the one memory flag, shared by ``mist-device`` and ``mist-cloud``: finite numbers in range,
seeds, sizes (one syntax, binary units: ``512M``, ``2G``), and ``--max-memory``.

Everything a command will compute from a flag is checked when click parses it, before any file is opened
or any array allocated, so a bad value costs nothing and gets one line naming the flag. Pure Python plus
click (no NumPy): ``--threads`` must still be able to set the BLAS thread count before NumPy loads.

Use it like this::

    @click.option("--lr", type=finite_float(0, min_open=True), default=1e-3)
    @click.option("--seed", type=SEED, default=0)
    @memory_option
    def train(...):
        require_memory(estimate_in_bytes, "training with --batch-size 32")

Only ``memory_flag`` and ``require_memory`` read the running click command; a library function takes the
bound as an argument (``memory_limit(max_memory)``, ``memory_problem(..., max_memory)``), which the CLI reads
with ``memory_flag()`` and passes in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import click

from .machine import available_memory
from .text import format_bytes


class Seed(click.IntRange):
    """A random seed: numpy.random.default_rng takes any non-negative integer, torch.manual_seed one below
    2**64; the common ground is the signed 64-bit range without its negative half, shown as ``0<=x<2^63``
    rather than as its last value's 19 digits."""

    name = "seed"

    def __init__(self) -> None:
        super().__init__(0, 2**63 - 1)

    def _describe_range(self) -> str:
        return "0<=x<2^63"


SEED = Seed()


class LazyChoice(click.Choice):
    """A choice whose values come from a registry that imports NumPy (model kinds, storage dtypes): read when
    a value is checked or the help is shown, after ``--threads`` has been applied, never at import."""

    def __init__(self, values: Callable[[], Sequence[str]]) -> None:
        self._values = values
        super().__init__([])

    @property
    def choices(self) -> list[str]:
        return list(self._values())

    @choices.setter
    def choices(self, _value: object) -> None:
        pass


class FiniteFloat(click.FloatRange):
    """A float range that also refuses ``nan``, ``inf`` and ``-inf``.

    click's FloatRange lets ``nan`` through (every comparison with nan is false), and then a schedule or a
    cast to int deep inside training fails with a traceback.
    """

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def finite_float(minimum: float | None = None, maximum: float | None = None, min_open: bool = False,
                 max_open: bool = False) -> FiniteFloat:
    """``type=`` for a float flag: finite, and inside [minimum, maximum] (open ends when asked)."""
    return FiniteFloat(minimum, maximum, min_open=min_open, max_open=max_open)


# ---- sizes ------------------------------------------------------------------------------------------------

# One size syntax wherever a command takes a size: a number and a binary unit. K, M, G and T are 1024-based,
# and so are KiB/MiB/... and KB/MB/... (the same unit spelt three ways, never 1000-based); a bare number is
# bytes. Sizes print back in the same units (``text.format_bytes``): 512M is shown as "512.0 MiB".
_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", 1):
    _UNITS.update(dict.fromkeys((_letter, _letter + "b", _letter + "ib"), 1024**_power))
SIZE_EXAMPLES = "512M, 2G, 1.5G, 64K; binary units: 1M = 1024K = 1,048,576 bytes; a bare number is bytes"


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"512MiB"``, ``"1.5gb"`` or ``"1000000"`` -> bytes, every unit binary (1K = 1024).
    Raises ValueError on anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. {SIZE_EXAMPLES})")
    number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(number) or number < 1:
        raise ValueError(f"{text!r} must be a finite size of at least one byte")
    return int(number)


class Size(click.ParamType):
    """``type=`` for a size flag (``--max-memory 2G``, ``--part-size 64M``): bytes, within [minimum, maximum]."""

    name = "size"

    def __init__(self, minimum: int = 1, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value, param, ctx):
        try:
            number = value if isinstance(value, int) else parse_bytes(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if number < self.minimum or (self.maximum is not None and number > self.maximum):
            bounds = f"at least {format_bytes(self.minimum)}" + (
                f" and at most {format_bytes(self.maximum)}" if self.maximum is not None else "")
            self.fail(f"{value!r} is {format_bytes(number)}; it must be {bounds} (sizes take a unit: "
                      f"{SIZE_EXAMPLES})", param, ctx)
        return number


_MEMORY_KEY = "mist.max_memory"


def _store_memory(ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
    ctx.meta[_MEMORY_KEY] = value


memory_option = click.option(
    "--max-memory", type=Size(), default=None, callback=_store_memory, expose_value=False,
    help="Refuse a configuration whose estimated memory exceeds this size (e.g. 2G, 512M). "
         "Default: the memory this machine has available now.")


def memory_flag() -> int | None:
    """The ``--max-memory`` of the running command, in bytes; None when it was not given (or outside a command)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_MEMORY_KEY) if ctx is not None else None


def memory_limit(max_memory: int | None) -> tuple[int | None, str]:
    """(bytes, where that figure comes from): ``max_memory`` (the --max-memory flag), else what the machine has
    available now (None when even that is unknown)."""
    if max_memory is not None:
        return max_memory, "--max-memory"
    return available_memory(), "the memory available on this machine"


def memory_problem(estimate: int, what: str, max_memory: int | None) -> str | None:
    """The one-line refusal when ``estimate`` bytes exceed the limit of ``memory_limit``, else None."""
    limit, source = memory_limit(max_memory)
    if limit is not None and estimate > limit:
        return (f"{what} needs about {format_bytes(estimate)}, more than {source} ({format_bytes(limit)}); "
                "lower the sizes or raise --max-memory")
    return None


def require_memory(estimate: int, what: str) -> None:
    """Refuse ``what`` with a usage error when ``estimate`` bytes exceed --max-memory (or the available memory).

    Call it inside a command that carries ``@memory_option``, before the big allocation.
    """
    problem = memory_problem(estimate, what, memory_flag())
    if problem:
        raise click.UsageError(problem)
