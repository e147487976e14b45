"""The one progress renderer both CLIs use: a bar that redraws one terminal line, or whole lines for a log.

- ``resolve_mode``: ``auto`` becomes ``bar`` on a terminal and the caller's choice elsewhere (a log file, CI,
  a pipe); ``bar``, ``lines`` and ``none`` stand as given.
- ``TerminalBar``: each frame returns to the line start and erases it (``\\r\\x1b[K``), at most every
  ``REDRAW_S`` seconds unless forced, and ``clear`` leaves the line empty for what is printed next.
- ``LineLog``: the line mode, whole lines through a ``log`` function, at most every ``every_s`` seconds.
- ``gauge``: the ``[####------]`` part of a bar.

What a frame or a line says belongs to the caller (training, evaluation, extraction, shipping); how it is
drawn lives here. Standard library only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

MODES = ("auto", "bar", "lines", "none")  # the choices of every --progress flag
BAR_WIDTH = 24
REDRAW_S = 0.1  # a bar redrawn more often only costs terminal time
ERASE_LINE = "\r\x1b[K"


def resolve_mode(mode: str, stream: TextIO, off_terminal: str = "lines") -> str:
    """``auto``: a bar on a terminal, ``off_terminal`` otherwise (a log file, CI, a pipe)."""
    if mode == "auto":
        return "bar" if stream.isatty() else off_terminal
    return mode


def gauge(done: float, total: float, width: int = BAR_WIDTH) -> str:
    """``[###-----]``: ``done`` of ``total`` as ``width`` cells, rounded down."""
    filled = min(max(int(width * done / max(total, 1)), 0), width)
    return f"[{'#' * filled}{'-' * (width - filled)}]"


def _text(text: str | Callable[[], str]) -> str:
    return text() if callable(text) else text


class TerminalBar:
    """One line on a terminal, redrawn in place; ``clear`` erases it so the next output starts clean."""

    def __init__(self, stream: TextIO, every_s: float = REDRAW_S):
        self.stream, self.every_s = stream, every_s
        self._last: float | None = None  # when the last frame was drawn; None: nothing on the line

    def draw(self, text: str | Callable[[], str], force: bool = False) -> None:
        """Show ``text`` as the line's new frame, unless the last frame is younger than ``every_s`` (and not
        ``force``, which the last frame of a pass uses so it always shows). A callable is called only when
        its frame is drawn."""
        now = time.perf_counter()
        if not force and self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        self.stream.write(ERASE_LINE + _text(text))
        self.stream.flush()

    def clear(self) -> None:
        if self._last is not None:
            self.stream.write(ERASE_LINE)
            self.stream.flush()
            self._last = None


class LineLog:
    """The line mode: whole lines through ``log``, at most every ``every_s`` seconds (0: every call)."""

    def __init__(self, log: Callable[[str], None], every_s: float = 0.0):
        self.log, self.every_s = log, every_s
        self._last = time.perf_counter()  # the first line waits ``every_s`` from the start

    def write(self, text: str | Callable[[], str], force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        self.log(_text(text))
