"""A run directory's files, its one state checkpoint, and the one rule for resuming and refusing.

A plain run writes ``last.safetensors`` (the state), ``best.safetensors`` (the state at its best epoch) and
``metrics.jsonl`` (a line per epoch); a search writes ``grid-last.safetensors`` (the state of every member),
``metrics.jsonl`` (a line per member still training and epoch, tagged ``"member"``), then ``members/``,
``best.safetensors`` and ``grid.json`` when it chooses (device/grid.py). Both states are
written by ``save`` from ``checkpoint``: every member's weights and AdamW moments (a search prefixes them
``m<i>.`` and keeps each member's best weights as ``m<i>.best.``), the fitted models (``p<i>.``) and a
``train_state`` with the run's counters, its options and each member's. A plain run's state is an ordinary
adaptor checkpoint of its model's kind, so ``evaluate`` reads ``last`` and ``best`` as they are.

Order at an epoch end: the metrics line, then ``best`` (when the epoch improved), then the state. A kill
between ``best`` and the state leaves the state at the previous epoch, so the resumed run replays the epoch
and writes ``best`` again; the other order would lose this epoch's best for good.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FormatError, load_checkpoint, save_checkpoint
from mist.formats.atomic import atomic_write_bytes
from mist.formats.checkpoint import feature_set_record

from .errors import TrainingError
from .kinds import kind_named
from .optim import AdamW
from .step import Recipe

LAST, BEST, METRICS = "last.safetensors", "best.safetensors", "metrics.jsonl"
GRID_STATE, GRID_TABLE, MEMBERS = "grid-last.safetensors", "grid.json", "members"
_RUN_FILES = (LAST, BEST, GRID_STATE, GRID_TABLE)
_ONLY_PLAIN, _ONLY_SEARCH = (LAST, METRICS), (GRID_STATE, GRID_TABLE, MEMBERS)


def new_member_state() -> dict[str, Any]:
    return {"best_val": None, "best_loss": None, "best_epoch": 0, "bad_epochs": 0, "stopped": False,
            "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "epochs_trained": 0}


@dataclass
class Member:
    """One model trained by steps: its own optimizer, options (a search varies lr, wd, ls) and counters."""

    name: str
    cfg: Any
    opts: Any  # train.TrainOptions
    model: Any
    optimizer: AdamW
    recipe: Recipe
    best: dict[str, np.ndarray] | None  # the best epoch's weights (a search); a plain run writes best.safetensors
    state: dict[str, Any] = field(default_factory=new_member_state)


@dataclass
class Fitted:
    """One model fitted in one go (a probe), with its fit report (val_acc, val_loss, seconds, ...)."""

    name: str
    model: Any
    result: dict[str, Any]


def holds_run(run_dir: Path) -> bool:
    """Any checkpoint or search table of an earlier run, finished or not (a metrics file alone is a run killed
    before its first checkpoint, which a new run may replace)."""
    return any((run_dir / name).exists() for name in _RUN_FILES)


def refuse_other_run(run_dir: Path, search: bool) -> None:
    """``--resume`` where the directory holds the other kind of run: resuming would start this one over it."""
    other = LAST if search else GRID_STATE
    if (run_dir / other).exists():
        what = "a plain training run" if search else "a search (--grid or --model probe|auto)"
        raise TrainingError(f"{run_dir} holds {what} ({other}); resume it with the options that started it, "
                            "or pass --overwrite to start this one instead")


def stale_files(run_dir: Path, search: bool) -> list[Path]:
    """Files of an earlier run that this kind of run never writes: removed once it has written its state."""
    return [run_dir / name for name in (_ONLY_PLAIN if search else _ONLY_SEARCH)]


class MetricsLog:
    """A run's metrics.jsonl. After ``replace_on_next_epoch`` (a new run or --overwrite) the old lines
    stay whole until the first epoch's checkpoints are written, then one atomic rename swaps in the new
    ones; a kill in between leaves lines tagged with the old run, which a resume drops."""

    def __init__(self, path: Path):
        self.path, self.pending, self.replacing = path, [], False

    def replace_on_next_epoch(self) -> None:
        self.replacing = True

    def add_step(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.replacing:
            self.pending.append(line)
        else:
            self._append(line)

    def add_epoch(self, records: list[dict[str, Any]]) -> None:
        line = "".join(json.dumps(record) + "\n" for record in records)
        if self.replacing:
            atomic_write_bytes(self.path, ("".join(self.pending) + line).encode())
            self.pending, self.replacing = [], False
        else:
            self._append(line)

    def _append(self, line: str) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:  # a full disk fails in write() or close(), with no file name of its own
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None

    def drop_after(self, epoch: int, run: str | None = None) -> None:
        """A kill between the metrics line and the checkpoint leaves a line the resumed run will write again,
        and a kill mid-line leaves half a line: keep only whole lines of epochs the checkpoint has finished,
        and (when the checkpoint names its run) only lines of that run."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or (run and record.get("run", run) != run):
                continue
            if record.get("epoch", 0) <= epoch:
                kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())


# ---- the one state checkpoint --------------------------------------------------------------------------


def _prefix(trainer: Any, i: int) -> str:
    return f"m{i}." if trainer.search else ""


def checkpoint(trainer: Any) -> Checkpoint:
    params, optimizer = {}, {}
    for i, m in enumerate(trainer.members):
        pre = _prefix(trainer, i)
        params.update({pre + k: v for k, v in m.model.params.items()})
        if m.best is not None:
            params.update({f"{pre}best.{k}": v for k, v in m.best.items()})
        # AdamW's step count goes into train_state (adam_step), beside the member it belongs to.
        optimizer.update({pre + k: v for k, v in m.optimizer.state_dict().items() if k != "step"})
    for i, f in enumerate(trainer.fitted):
        params.update({f"p{i}.{k}": v for k, v in f.model.params.items()})
    opts, state = trainer.opts, trainer.state
    train_state = {**state, "options": asdict(opts), "patience": trainer.patience,
                   "shuffle": {"seed": opts.seed, "epoch": state["epoch"], "batch": state["batch"]},
                   "members": [{"name": m.name, "config": m.cfg.to_dict(), "options": asdict(m.opts),
                                "state": m.state, "adam_step": m.optimizer.step_count} for m in trainer.members],
                   "fitted": [{"name": f.name, "kind": f.model.kind, "config": f.model.cfg.to_dict(),
                               "result": f.result} for f in trainer.fitted]}
    classes, record = trainer.train_set.manifest.classes, feature_set_record(trainer.train_set)
    if not trainer.search:
        m = trainer.members[0]
        return Checkpoint(params=params, config=m.cfg.to_dict(), classes=classes, feature_set=record,
                          optimizer=optimizer, train_state=train_state, kind=m.model.kind)
    return Checkpoint(params=params, config={"members": len(trainer.members), "fitted": len(trainer.fitted)},
                      classes=classes, feature_set=record, optimizer=optimizer, train_state=train_state, kind="grid")


def save(trainer: Any, records: list[dict[str, Any]] = (), improved: bool = False) -> None:
    """The one writer of a run's state: at every epoch end (with the epoch's metrics ``records``: the plain
    run's line, or one per search member), every ``--save-every`` steps and once the fitted models are fitted."""
    ckpt = checkpoint(trainer)
    plain = not trainer.search
    if records and not trainer.metrics.replacing:
        trainer.metrics.add_epoch(records)
    if plain and improved:
        save_checkpoint(trainer.run_dir / BEST, ckpt)
    save_checkpoint(trainer.state_path, ckpt)
    for stale in trainer.stale:  # an --overwrite run's first state is written: the old run's other files go
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    trainer.stale = []
    if records and trainer.metrics.replacing:
        trainer.metrics.add_epoch(records)


def resume(trainer: Any, path: Path) -> None:
    """Load ``path`` into ``trainer`` after checking it is this run: the same set, options, members and
    fitted models. Anything else is a one-line FormatError."""
    try:
        _resume(trainer, path)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path}: not a usable resumable checkpoint ({e.__class__.__name__}: {e})") from None


def _resume(trainer: Any, path: Path) -> None:
    ckpt = load_checkpoint(path)
    want = "grid" if trainer.search else trainer.members[0].model.kind
    if ckpt.kind != want or not ckpt.resumable:
        raise FormatError(f"{path}: not a resumable {'grid' if trainer.search else want} checkpoint")
    if not trainer.search:
        kind_named(want).from_checkpoint(ckpt, path)  # metadata and weights agree before any weight is copied in
    if ckpt.feature_set.get("fingerprint") != trainer.train_set.fingerprint:
        raise FormatError(f"{path}: was trained on a different feature set than {trainer.train_set.directory}")
    ts = ckpt.train_state
    defaults = asdict(type(trainer.opts)())  # an option added since the checkpoint was written had its default
    saved = ts.get("options", {})
    for key, value in asdict(trainer.opts).items():
        if key != "save_every" and saved.get(key, defaults[key]) != value:
            raise FormatError(f"{path}: was started with {key}={saved.get(key)!r}, now {value!r}; "
                              "resume with the same options")
    members, fitted = ts["members"], ts["fitted"]
    same = ([s["name"] for s in members] == [m.name for m in trainer.members]
            and ts.get("patience", 0) == trainer.patience and len(fitted) in (0, len(trainer.fitted_cfgs))
            and all(type(m.cfg).from_dict(s["config"]) == m.cfg and _same_options(s["options"], m.opts, defaults)
                    for s, m in zip(members, trainer.members)))
    if not same:
        names = ", ".join([s["name"] for s in members] + [f["name"] for f in fitted])
        raise FormatError(f"{path}: holds another run ({names}); resume with the same --grid, --model and "
                          "adaptor options")
    for i, (m, s) in enumerate(zip(trainer.members, members)):
        pre = _prefix(trainer, i)
        for k in m.model.params:
            m.model.params[k][...] = ckpt.params[pre + k]
            if m.best is not None:
                m.best[k][...] = ckpt.params[f"{pre}best.{k}"]
        moments = {k[len(pre):]: v for k, v in ckpt.optimizer.items() if k.startswith(pre)}
        m.optimizer.load_state_dict({**moments, "step": s["adam_step"]})
        m.state = s["state"]
    trainer.fitted = []
    for i, f in enumerate(fitted):
        kind = kind_named(f["kind"], str(path))
        params = {k[len(f"p{i}."):]: v for k, v in ckpt.params.items() if k.startswith(f"p{i}.")}
        trainer.fitted.append(Fitted(f["name"], kind.build(kind.config.from_dict(f["config"]), params), f["result"]))
    trainer.state = {k: ts[k] for k in ("epoch", "batch", "step", "elapsed", "run")}


def _same_options(saved: dict[str, Any], opts: Any, defaults: dict[str, Any]) -> bool:
    return all(saved.get(k, defaults[k]) == v for k, v in asdict(opts).items() if k != "save_every")
