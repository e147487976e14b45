"""Training progress: a live bar on a terminal, periodic lines in a log, per-step records in metrics.jsonl.

The trainer wraps each epoch's batch indices with ``progress(batches, epoch)``. This module's generator runs
between two steps, when the previous step is complete, and reads the public counters of the run and of its
member (``Trainer.state``, ``Member.state``): it adds no work to the step and needs no hook inside the loop.
Step records go through the run's ``MetricsLog``. What a frame says is decided here; the drawing (the bar that
redraws one line, the line mode) is ``mist.kit.progress``, shared with the cloud and with shipping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from mist.kit.progress import LineLog, TerminalBar, gauge, resolve_mode


class TrainProgress:
    """``mode``: bar, lines or none. ``log_every`` N > 0 prints a line every N steps (bar and lines modes);
    ``step_records`` appends a ``{"kind": "step", ...}`` record to metrics.jsonl every step (every N with
    ``log_every``)."""

    def __init__(self, trainer, mode: str, log_every: int = 0, step_records: bool = False,
                 stream: TextIO | None = None, log: Callable[[str], None] = print):
        self.trainer, self.log_every, self.step_records = trainer, log_every, step_records
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.log = log
        self._bar = TerminalBar(self.stream)

    def __call__(self, batches: Iterable[int], epoch: int) -> Iterator[int]:
        t = self.trainer
        member = t.members[0]
        start, seen0 = time.perf_counter(), member.state["seen"]
        before_loss, before_seen = member.state["loss_sum"], member.state["seen"]
        for b in batches:
            yield b
            # The step for batch b is done: the member's sums include it.
            s = member.state
            batch_loss = (s["loss_sum"] - before_loss) / max(s["seen"] - before_seen, 1)
            before_loss, before_seen = s["loss_sum"], s["seen"]
            now = time.perf_counter()
            step = t.state["step"]
            info = {"epoch": epoch + 1, "batch": b + 1, "step": step, "loss": batch_loss,
                    "running_loss": s["loss_sum"] / max(s["seen"], 1), "lr": member.recipe.lr_at(step - 1),
                    "images_per_s": (s["seen"] - seen0) / max(now - start, 1e-9)}
            every = self.log_every and step % self.log_every == 0
            if self.step_records and (every or not self.log_every):
                t.metrics.add_step({"kind": "step", **info})
            if every and self.mode != "none":
                self._clear()
                self.log(self._text(info, bar=False))
            if self.mode == "bar":
                self._bar.draw(lambda info=info: self._text(info, bar=True), force=b + 1 == t.steps_per_epoch)
        self._clear()  # the trainer's epoch line takes the bar's place

    def _text(self, info: dict, bar: bool) -> str:
        t = self.trainer
        where = f"epoch {info['epoch']}/{t.opts.epochs}"
        if bar:
            where += f" {gauge(info['batch'], t.steps_per_epoch)} {info['batch']}/{t.steps_per_epoch}"
        else:
            where += f"  batch {info['batch']}/{t.steps_per_epoch}  step {info['step']}/{t.total_steps}"
        return f"{where}  loss {info['running_loss']:.4f}  lr {info['lr']:.2e}  {info['images_per_s']:.0f} img/s"

    def _clear(self) -> None:
        self._bar.clear()


def rows_progress(total: int, mode: str, label: str, stream: TextIO | None = None,
                  log: Callable[[str], None] = print) -> Callable[[Iterable[int], int], Iterator[int]]:
    """For evaluate and predict: wrap the batch start offsets; a bar of rows done, or one line at the end.
    Off a terminal ``auto`` shows nothing: their output is often piped into another program."""
    stream = stream or sys.stderr
    mode = resolve_mode(mode, stream, off_terminal="none")

    bar, lines = TerminalBar(stream), LineLog(log)

    def wrap(starts: Iterable[int], batch_size: int) -> Iterator[int]:
        begin = time.perf_counter()
        for start in starts:
            yield start
            done = min(start + batch_size, total)
            if mode == "bar":
                rate = done / max(time.perf_counter() - begin, 1e-9)
                bar.draw(f"{label} {gauge(done, total)} {done}/{total} rows  {rate:.0f} rows/s", force=done == total)
        bar.clear()
        if mode == "lines":
            seconds = time.perf_counter() - begin
            lines.write(f"{label}: {total} rows in {seconds:.1f}s, {total / max(seconds, 1e-9):.0f} rows/s")

    return wrap
