"""Text both CLIs print: safe whatever it holds (class names and paths come from users' files), and the one
way to write a byte count or a duration.

- ``terminal_text``: control characters (a class name with ESC or a newline, a bidi override) are shown as
  escapes, so they can neither split an error into two lines nor drive the terminal; code points the
  stream's encoding cannot carry (lone surrogates, or anything on an ASCII terminal) become ``\\uXXXX``.
- ``csv_cell`` / ``csv_line``: RFC 4180 quoting, and nothing a UTF-8 encoder would refuse.
- ``json_text``: strict JSON (non-finite floats become null, every non-ASCII code point is escaped).
- ``format_bytes`` / ``format_duration``: ``1.5 GiB``, ``1:02:03``, for messages, bars and progress lines.
- ``counted``: ``1 shard``, ``3 shards``.

Standard library only, no NumPy: the CLI modules import this before ``--threads`` has set the BLAS thread count.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

# Bidirectional embeddings, overrides and isolates: invisible, yet they reorder what a terminal shows.
_BIDI = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _escape_char(c: str) -> str:
    code = ord(c)
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _needs_escape(c: str) -> bool:
    code = ord(c)
    return code < 0x20 or 0x7F <= code < 0xA0 or code in _BIDI or 0xD800 <= code < 0xE000


def terminal_text(text: str, encoding: str | None = None) -> str:
    """``text`` with control characters escaped and nothing ``encoding`` (default: stdout's) cannot write."""
    escaped = "".join(_escape_char(c) if _needs_escape(c) else c for c in str(text))
    encoding = encoding or getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        return escaped.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # an encoding name Python does not know: fall back to ASCII, always writable
        return escaped.encode("ascii", "backslashreplace").decode("ascii")


def utf8_safe(text: str) -> str:
    """``text`` unchanged unless it holds lone surrogates (e.g. from a JSON ``\\ud800``), which become escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) < 0xE000 else c for c in text)


def csv_cell(value: Any) -> str:
    """One CSV field: quoted when it holds a separator, a quote, a line break or edge spaces (RFC 4180)."""
    text = utf8_safe("" if value is None else str(value))
    if any(c in text for c in ',"\n\r') or text != text.strip() or any(_needs_escape(c) for c in text):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_line(cells: list[Any]) -> str:
    return ",".join(csv_cell(c) for c in cells)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {utf8_safe(str(k)): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, str):
        return utf8_safe(value)
    return value


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON any parser accepts: NaN/inf become null, lone surrogates become escapes, output is ASCII."""
    return json.dumps(_strict(obj), indent=indent, ensure_ascii=True, allow_nan=False)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``1,200 rows``: a count and its noun, which agree."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ... ``2.0 TiB`` (one decimal above bytes)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour up; ``?`` for a time that is not finite (an unknown ETA)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
