"""How a copy or a verification shows itself: a bar on a terminal, one line per shard otherwise, JSON at the end.

Both CLIs call :func:`run_copy` and :func:`run_verify`, so ``mist-cloud push`` and ``mist-device pull`` read
the same. Plain writes to a stream, no click: the formats layer stays free of either CLI's libraries.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from .ship import Progress, Report, _human, copy_set, open_store, verify_set


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class BarProgress(Progress):
    """One self-rewriting line: a bar, bytes done of total, rate, ETA and the shard in flight."""

    def __init__(self, stream: TextIO, label: str, width: int = 24, every: float = 0.1):
        self.stream, self.label, self.width, self.every = stream, label, width, every
        self.total = self.done = 0
        self.current = ""
        self.start = self.last = 0.0

    def begin(self, shards: int, total_bytes: int) -> None:
        self.total, self.start = total_bytes, time.perf_counter()

    def shard_begin(self, name: str, size: int) -> None:
        self.current = name
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(min(fraction, 1.0) * self.width))
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{_human(self.done)}/{_human(self.total)}  {_human(rate)}/s  ETA {_duration(eta)}  "
                          f"{self.current}\x1b[K")
        self.stream.flush()

    def end(self) -> None:
        self.current = ""
        self._draw(force=True)
        self.stream.write("\n")
        self.stream.flush()


class LineProgress(Progress):
    """One line per shard when it is done: what happened to it, its size, the time and the rate."""

    def __init__(self, stream: TextIO):
        self.stream, self.shards, self.index = stream, 0, 0

    def begin(self, shards: int, total_bytes: int) -> None:
        self.shards = shards

    def shard_end(self, name: str, status: str, nbytes: int, seconds: float) -> None:
        self.index += 1
        what = {"skipped": "skipped (already there, checksum matches)", "copied": "copied, checksum matches",
                "verified": "checksum matches"}[status]
        self.stream.write(f"[{self.index}/{self.shards}] {name}  {nbytes:,} bytes  {seconds:.2f}s  "
                          f"{_human(nbytes / max(seconds, 1e-9))}/s  {what}\n")
        self.stream.flush()


def choose_progress(mode: str, label: str, stream: TextIO | None = None) -> Progress:
    """``auto``: a bar on a terminal, lines otherwise; also ``bar``, ``lines``, ``none``."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "bar" if stream.isatty() else "lines"
    if mode == "bar":
        return BarProgress(stream, label)
    if mode == "lines":
        return LineProgress(stream)
    return Progress()


def summary_line(verb: str, report: Report) -> str:
    copied, skipped = report.count("copied"), report.count("skipped")
    rate = _human(report.bytes_total / report.seconds) + "/s" if report.seconds > 0 else "-"
    return (f"{verb} {report.source} -> {report.destination}: {report.rows:,} rows in {len(report.shards)} shards "
            f"({copied} copied, {skipped} already there), {report.bytes_total:,} bytes in {report.seconds:.2f}s "
            f"({rate}); every checksum matches")


def run_copy(verb: str, source: str, destination: str, endpoint_url: str | None = None, overwrite: bool = False,
             max_rate_mib: float | None = None, part_size_mib: int | None = None, as_json: bool = False,
             progress: str = "auto", out: TextIO | None = None) -> Report:
    """What ``push`` and ``pull`` do: open both ends, copy with progress, print a line or JSON."""
    from .ship import DEFAULT_PART_SIZE

    out = out or sys.stdout
    part_size = part_size_mib << 20 if part_size_mib else DEFAULT_PART_SIZE
    src = open_store(source, endpoint_url)
    dst = open_store(destination, endpoint_url, part_size=part_size)
    shown = choose_progress("none" if as_json and progress == "auto" else progress, verb)
    report = copy_set(src, dst, shown, overwrite=overwrite,
                      max_rate=max_rate_mib * (1 << 20) if max_rate_mib else None)
    out.write((json.dumps(report.to_json(), indent=2) if as_json else summary_line(verb, report)) + "\n")
    out.flush()
    return report


def run_verify(location: str, endpoint_url: str | None = None, as_json: bool = False, progress: str = "auto",
               out: TextIO | None = None) -> Report:
    out = out or sys.stdout
    store = open_store(location, endpoint_url)
    report = verify_set(store, choose_progress("none" if as_json and progress == "auto" else progress, "verify"))
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.write(f"ok: {report.source} ({report.rows:,} rows, {len(report.shards)} shards, checksums match)\n")
    out.flush()
    return report
