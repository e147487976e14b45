"""How a copy or a verification shows itself on stderr: a bar on a terminal, one line per shard otherwise.

Both CLIs go through here (``commands.py``), so ``mist-cloud push`` and ``mist-device pull`` read the same.
The drawing is ``mist.kit.progress``, the renderer training and extraction use too.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mist.kit.progress import LineLog, TerminalBar, gauge, resolve_mode
from mist.kit.text import counted, format_bytes, format_duration

from .copy import Progress, Report


class BarProgress(Progress):
    """One self-rewriting line: a bar, bytes done of total, rate, ETA and the shard in flight."""

    def __init__(self, stream: TextIO, label: str):
        self.bar, self.label = TerminalBar(stream), label
        self.total = self.done = 0
        self.current = ""
        self.start = 0.0

    def begin(self, shards: int, total_bytes: int) -> None:
        self.total, self.start = total_bytes, time.perf_counter()

    def shard_begin(self, name: str, size: int) -> None:
        self.current = name
        self.bar.draw(self._text, force=True)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.bar.draw(self._text)

    def _text(self) -> str:
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.label} {gauge(self.done, self.total)} {format_bytes(self.done)}/{format_bytes(self.total)}  "
                f"{format_bytes(rate)}/s  ETA {format_duration(eta)}  {self.current}")

    def end(self) -> None:
        self.bar.clear()  # the summary line on stdout says how it went


class LineProgress(Progress):
    """One line per shard when it is done: what happened to it, its size, the time and the rate."""

    def __init__(self, stream: TextIO):
        def write_line(text: str) -> None:
            stream.write(text + "\n")
            stream.flush()

        self.lines = LineLog(write_line)
        self.shards, self.index = 0, 0

    def begin(self, shards: int, total_bytes: int) -> None:
        self.shards = shards

    def shard_end(self, name: str, status: str, nbytes: int, seconds: float) -> None:
        self.index += 1
        what = {"skipped": "skipped (already there, checksum matches)", "copied": "copied, checksum matches",
                "verified": "checksum matches"}[status]
        self.lines.write(f"[{self.index}/{self.shards}] {name}  {nbytes:,} bytes  {seconds:.2f}s  "
                         f"{format_bytes(nbytes / max(seconds, 1e-9))}/s  {what}")


def choose_progress(mode: str, label: str, stream: TextIO | None = None) -> Progress:
    """``auto``: a bar on a terminal, lines otherwise; also ``bar``, ``lines``, ``none``."""
    stream = stream or sys.stderr
    mode = resolve_mode(mode, stream)
    if mode == "bar":
        return BarProgress(stream, label)
    if mode == "lines":
        return LineProgress(stream)
    return Progress()


def summary_line(verb: str, report: Report) -> str:
    copied, skipped = report.count("copied"), report.count("skipped")
    rate = format_bytes(report.bytes_total / report.seconds) + "/s" if report.seconds > 0 else "-"
    return (f"{verb} {report.source} -> {report.destination}: {counted(report.rows, 'row')} in "
            f"{counted(len(report.shards), 'shard')} "
            f"({copied} copied, {skipped} already there), {report.bytes_total:,} bytes in {report.seconds:.2f}s "
            f"({rate}); every checksum matches")
