"""The shared kit (kit/) and the transport package (ship/): what they may import, and the kit's small pieces.

The kit is imported by both CLIs before ``--threads`` sets the BLAS thread count, so it may use only the
standard library and click; ship may use the contract (formats) and the kit, never a side.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import pytest

from mist.kit.flags import memory_limit, memory_problem
from mist.kit.progress import TerminalBar, gauge
from mist.kit.text import format_bytes, format_duration

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports, absolute (``from .x`` becomes ``mist.<package>.x``)."""
    found = {}
    for path in sorted((ROOT / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(f"mist.{package}.{node.module or ''}" if node.level else node.module)
        found[path.name] = names
    return found


def test_kit_imports_only_the_standard_library_and_click() -> None:
    for file, names in imported_modules("kit").items():
        outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n != "click"
                   and not n.startswith("mist.kit")}
        assert not outside, f"kit/{file} imports {outside}"


def test_ship_imports_the_contract_and_the_kit_only() -> None:
    for file, names in imported_modules("ship").items():
        mist = {n for n in names if n.startswith("mist.")}
        sides = {n for n in mist if not n.startswith(("mist.formats", "mist.kit", "mist.ship"))}
        assert not sides, f"ship/{file} imports {sides}"


def test_what_the_clis_import_first_leaves_numpy_unloaded() -> None:
    code = ("import sys, mist.kit.cli, mist.kit.flags, mist.kit.text, mist.kit.progress, mist.kit.machine, "
            "mist.ship.commands\nassert 'numpy' not in sys.modules, 'numpy loaded'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"),
                                         (3 << 30, "3.0 GiB"), (2 << 40, "2.0 TiB")])
def test_one_byte_format(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_one_duration_format() -> None:
    assert [format_duration(s) for s in (0, 59.9, 61, 3600 + 62, float("inf"), float("nan"))] == \
        ["0:00", "0:59", "1:01", "1:01:02", "?", "?"]


def test_the_memory_bound_is_passed_in_not_read_from_a_command() -> None:
    assert memory_limit(1000) == (1000, "--max-memory")
    assert memory_problem(999, "x", 1000) is None
    assert "x needs about 1.5 KiB, more than --max-memory (1000 B)" in memory_problem(1536, "x", 1000)


def test_the_bar_redraws_one_line_at_most_every_tenth_of_a_second_and_clears_itself() -> None:
    assert TerminalBar(io.StringIO()).every_s == 0.1
    stream = io.StringIO()
    bar = TerminalBar(stream, every_s=3600)
    bar.draw("a")
    bar.draw("b")  # too soon: dropped
    bar.draw(lambda: "c", force=True)
    bar.clear()
    bar.clear()  # nothing on the line: nothing written
    bar.draw("d")  # a cleared line is drawn again at once
    assert stream.getvalue() == "\r\x1b[Ka\r\x1b[Kc\r\x1b[K\r\x1b[Kd"
    assert gauge(3, 8, width=8) == "[###-----]" and gauge(9, 8, width=4) == "[####]"
    assert gauge(0, 0) == "[" + "-" * 24 + "]"
