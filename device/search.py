"""The default search of ``--model auto``: successive halving over adaptors, beside the probes, in a time budget.

Without ``--grid``, ``--model auto`` trains the adaptors of ``DEFAULT_SPACE`` side by side in train.py's one
loop (every member alive shares each prepared batch) and halves them as they go:

    rungs      after E/4 and E/2 of the E epochs, the alive adaptors are ranked by their score and the
               better half (rounded up) trains on; the others stop where they are. Not earlier: during the
               warm-up (a tenth of the run) the lower learning rates have barely moved, and a rung there
               would only rank learning rates
    score      the mean validation accuracy of a member's last ``WINDOW`` epochs (fewer at the start): one
               lucky epoch on a hundred validation rows does not win a rung, and the same score later
               compares an adaptor with a probe (device/grid.py)
    budget     ``--budget`` bounds the seconds the adaptors train. "3x" means three times what one plain run
               (the first adaptor, mist's defaults, for E epochs) takes, measured on its first epoch; "90s"
               is absolute. At each rung the search projects what its plan still costs (alive members at
               their own measured seconds per epoch, the future rungs applied to today's ranking); while
               that overshoots, the worst alive adaptor stops too ("skipped for the budget"), down to one.
               Between rungs nobody is cut: the ranking is only read where the plan reads it.

Everything the halving decides lives in each member's state (``stopped``, ``stopped_by``, ``val_history``),
which the run's state checkpoint holds, so a search resumed after kill -9 continues the same plan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from mist.kit.progress import gauge

from .progress import TrainProgress
from .run_state import Member

DEFAULT_SPACE = "lr=1e-3,3e-3 blocks=1,2,4"
DEFAULT_BUDGET = "4x"
WINDOW = 3


def parse_budget(text: str) -> tuple[float, str]:
    """'3x' -> (3.0, 'x'): a multiple of one plain run; '90s' -> (90.0, 's'): seconds. ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([xs])\s*", text.lower())
    if not match or float(match.group(1)) <= 0 or not math.isfinite(float(match.group(1))):
        raise ValueError(f"--budget: {text!r} is not a positive multiple of one plain run ('3x') or seconds ('90s')")
    return float(match.group(1)), match.group(2)


def rungs(epochs: int) -> list[int]:
    """The epoch ends after which the alive adaptors are halved: E/4, E/2 (distinct, before the last)."""
    return sorted({e for e in (epochs // 4, epochs // 2) if 1 <= e < epochs})


def score(state: dict[str, Any]) -> float | None:
    """The mean validation accuracy of the member's last WINDOW epochs; None before its first validation."""
    history = state.get("val_history") or []
    if not history:
        return None
    recent = history[-WINDOW:]
    return sum(recent) / len(recent)


def _ranked(members: list[Member], order: list[str]) -> list[Member]:
    """Best score first; ties: the earlier member (grid order: cheaper, mist's defaults first)."""
    return sorted(members, key=lambda m: (-(score(m.state) if score(m.state) is not None else -1.0),
                                          order.index(m.name)))


class Halving:
    """The hook train.py calls at every epoch end of a search (``Trainer(after_epoch=...)``)."""

    def __init__(self, epochs: int, budget: tuple[float, str], log: Callable[[str], None] = print):
        self.epochs, self.budget, self.log = epochs, budget, log
        self.rungs = rungs(epochs)

    def limit_seconds(self, members: list[Member]) -> float:
        amount, unit = self.budget
        if unit == "s":
            return amount
        ref = members[0].state  # the first member: mist's defaults (blocks 1, lr 1e-3), trained every epoch once
        per_epoch = ref["seconds"] / max(ref["epochs_trained"], 1)
        return amount * per_epoch * self.epochs

    def projected_seconds(self, ranked: list[Member], done: int) -> float:
        """What the plan still costs from epoch ``done`` on, if today's ranking held at every future rung."""
        total = 0.0
        for i, m in enumerate(ranked):
            stop, alive = self.epochs, len(ranked)
            for r in self.rungs:
                if r > done:
                    alive = math.ceil(alive / 2)
                    if i >= alive:
                        stop = r
                        break
            total += m.state["seconds"] / max(m.state["epochs_trained"], 1) * (stop - done)
        return total

    def __call__(self, trainer: Any, done: int) -> None:
        order = [m.name for m in trainer.members]
        alive = _ranked([m for m in trainer.members if not m.state["stopped"]], order)
        if done not in self.rungs or len(alive) < 2:
            return
        keep = math.ceil(len(alive) / 2)
        for m in alive[keep:]:
            m.state.update(stopped=True, stopped_by="halving")
        self.log(f"round {self.rungs.index(done) + 1}: after epoch {done}, {keep} of {len(alive)} adaptors "
                 f"go on ({', '.join(m.name for m in alive[:keep])})")
        alive = alive[:keep]
        spent = sum(m.state["seconds"] for m in trainer.members)
        limit = self.limit_seconds(trainer.members)
        while len(alive) > 1 and spent + self.projected_seconds(alive, done) > limit:
            worst = alive.pop()
            worst.state.update(stopped=True, stopped_by="budget")
            self.log(f"budget: {worst.name} skipped after epoch {done} (spent {spent:.1f}s of {limit:.1f}s; "
                     f"the plan would need {self.projected_seconds(alive + [worst], done):.1f}s more)")

    def round_of(self, epoch: int) -> int:
        """The 1-based round that epoch ``epoch`` (1-based) belongs to."""
        return 1 + sum(1 for r in self.rungs if r < epoch)


def skipped(members: list[dict[str, Any]]) -> list[str]:
    """grid.json's account of what the budget cut: 'name (after epoch e)' per member it stopped."""
    return [f"{m['name']} (after epoch {m['epochs_trained']})" for m in members if m.get("stopped_by") == "budget"]


class SearchProgress(TrainProgress):
    """The live progress of a search: its round, the adaptors alive and the best score so far, drawn by the
    same renderer as a plain run's (device/progress.py, kit/progress.py)."""

    def __init__(self, trainer: Any, mode: str, halving: Halving | None, **kwargs: Any):
        super().__init__(trainer, mode, **kwargs)
        self.halving = halving

    def _text(self, info: dict, bar: bool) -> str:
        t = self.trainer
        alive = [m for m in t.members if not m.state["stopped"]]
        where = f"epoch {info['epoch']}/{t.opts.epochs}"
        if self.halving is not None:
            where = f"round {self.halving.round_of(info['epoch'])}/{len(self.halving.rungs) + 1}  " + where
        if bar:
            where += f" {gauge(info['batch'], t.steps_per_epoch)}"
        scored = [(score(m.state), m.name) for m in t.members if score(m.state) is not None]
        scored += [(f.result["val_acc"], f.name) for f in t.fitted if f.result.get("val_acc") is not None]
        best = f", best so far {max(scored)[1]} {max(scored)[0]:.3f}" if scored else ""
        return f"{where}  {len(alive)} adaptor{'' if len(alive) == 1 else 's'} alive{best}"
