"""The one training loop, for one adaptor (``mist-device train``) and for a search (``--grid``,
``--model probe|auto``) alike.

A run trains its members side by side (one member for a plain run) through ``step.train_step``, on batches
that device/data.py prepares once for all of them; models that are fitted instead (the probe) are fitted
once, before the first epoch, on rows read once. Each epoch ends with one pass over the validation rows,
shared by every member, and one state checkpoint (run_state.py) that holds everything resume needs. The
shuffle order of epoch e is a pure function of (seed, e), so (seed, epoch, batch) *is* the random state and
a run resumed after kill -9 replays exactly the batches it would have seen.

Each member keeps its best epoch on validation (without validation rows: its lowest training loss);
``patience`` stops a member that has not improved for that many epochs.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import FeatureSet
from mist.kit.text import counted

from . import run_state
from .data import batches, needs_of, read_rows, split_rows
from .errors import TrainingError
from .evaluation import eval_chunk_rows
from .kinds import KINDS, kind_for_config
from .lae import LAEConfig
from .layers import softmax_cross_entropy
from .optim import AdamW, warmup_steps
from .run_state import Fitted, Member
from .step import NonFiniteLoss, Recipe, train_step

__all__ = ["Trainer", "TrainOptions", "TrainingError", "Member", "build_config"]


@dataclass
class TrainOptions:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None  # None: warmup_fraction of the run; more than half a run is clamped
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_split: float = 0.0
    save_every: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    val_seed: int | None = None  # seeds the --val-split draw; None: the same as seed


def build_config(fs: FeatureSet, **overrides: Any) -> LAEConfig:
    m = fs.manifest
    cfg = LAEConfig(dim=m.dim, tokens=m.tokens, groups=m.k, num_classes=len(m.classes), **overrides)
    if cfg.pool == "cls" and m.prefix_tokens < 1:
        raise ValueError("--pool cls needs a class token, but these features have no prefix tokens")
    cfg.validate()
    return cfg


class Trainer:
    """Train ``members`` (name -> (config, options) of models trained by steps) and fit ``fitted`` (configs of
    fitted kinds) on ``train_set``. ``search`` names the run's files: a plain run keeps last/best/metrics, a
    search grid-last, members/ and grid.json (device/grid.py chooses its winner)."""

    def __init__(self, run_dir: str | Path, train_set: FeatureSet, val_set: FeatureSet | None,
                 cfg: Any, opts: TrainOptions, log: Callable[[str], None] = print,
                 members: dict[str, tuple[Any, TrainOptions]] | None = None, fitted: list[Any] = (),
                 search: bool = False, patience: int = 0,
                 after_epoch: Callable[[Trainer, int], None] | None = None):
        self.run_dir, self.train_set, self.val_set = Path(run_dir), train_set, val_set
        self.opts, self.log, self.search, self.patience = opts, log, search, patience
        self.after_epoch = after_epoch  # a search's halving (device/search.py): may stop members
        if len(train_set) == 0:
            raise TrainingError(f"{train_set.directory}: the training set is empty")
        split_seed = opts.seed if opts.val_seed is None else opts.val_seed
        self.train_rows, self.val_rows = split_rows(train_set.labels, opts.val_split, split_seed)
        if val_set is not None:
            self.val_rows = np.nonzero(val_set.labels >= 0)[0]
        if len(self.train_rows) == 0:
            raise TrainingError(f"{train_set.directory}: no labelled rows to train on")
        specs = {"lae-defaults": (cfg, opts)} if members is None else members
        if len(self.val_rows) == 0 and len(specs) + len(fitted) > 1:
            raise TrainingError("choosing among several models needs validation rows: "
                                + (_empty_split(train_set.labels, opts.val_split) if opts.val_split > 0 and
                                   val_set is None else "pass --val-split or --val"))
        if len(self.val_rows) == 0 and opts.val_split > 0 and val_set is None:
            log(f"warning: {_empty_split(train_set.labels, opts.val_split)}; without validation the kept "
                "epoch is the one with the lowest training loss")
        self.steps_per_epoch = math.ceil(len(self.train_rows) / opts.batch_size)
        self.total_steps = self.steps_per_epoch * opts.epochs
        self.warmup_steps, self.warmup_warning = warmup_steps(opts.warmup_epochs, opts.warmup_fraction,
                                                              self.steps_per_epoch, self.total_steps)
        self.members = [self._member(name, c, o) for name, (c, o) in specs.items()]
        self.fitted_cfgs, self.fitted = list(fitted), []
        self.input_scale = cfg.input_scale  # baked into the prepared maps every member shares
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "elapsed": 0.0,
                                      # Tags this run's metrics lines, so a resume never keeps another run's.
                                      "run": secrets.token_hex(8)}
        self.metrics = run_state.MetricsLog(self.run_dir / run_state.METRICS)
        self.stale: list[Path] = []  # an earlier run's files this run removes once its first state is written
        self.state_path = self.run_dir / (run_state.GRID_STATE if search else run_state.LAST)

    def _member(self, name: str, cfg: Any, opts: TrainOptions) -> Member:
        kind = kind_for_config(cfg)
        model = kind.build(cfg, kind.init(cfg, opts.seed))
        recipe = Recipe(lr=opts.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                        min_lr=opts.min_lr, label_smoothing=opts.label_smoothing, grad_clip=opts.grad_clip)
        best = {k: v.copy() for k, v in model.params.items()} if self.search else None
        return Member(name, cfg, opts, model, AdamW(model.params, lr=opts.lr, weight_decay=opts.weight_decay),
                      recipe, best)

    @property
    def model(self) -> Any:
        """The model of a plain run (its one member)."""
        return self.members[0].model

    # ---- the loop ----

    def fit(self, resume: bool = False, overwrite: bool = False, progress: Callable | None = None,
            until: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule, or stop after epoch ``until`` of it (a refit replays the epochs
        its search chose, on the same cosine)."""
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.state_path.exists():
            run_state.resume(self, self.state_path)
            self.metrics.drop_after(self.state["epoch"], self.state.get("run"))
            self.log(f"resumed {'the grid ' if self.search else ''}from {self.state_path} at epoch "
                     f"{self.state['epoch'] + 1}, step {self.state['step']}")
        elif resume:
            run_state.refuse_other_run(self.run_dir, self.search)
            self.metrics.drop_after(0)
            self.log(f"no checkpoint in {self.run_dir} yet; starting from the beginning")
        elif run_state.holds_run(self.run_dir) and not overwrite:
            raise TrainingError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                "or --overwrite to start again")
        else:
            # Old files stay until this run's first checkpoint replaces them; old metrics likewise.
            self.metrics.replace_on_next_epoch()
            self.stale = run_state.stale_files(self.run_dir, self.search)
        if len(self.fitted) < len(self.fitted_cfgs):
            self._fit_models()
            run_state.save(self)
        last = self.opts.epochs if until is None else min(until, self.opts.epochs)
        while self.state["epoch"] < last and any(not m.state["stopped"] for m in self.members):
            self._epoch(progress)
        return {"epochs": self.state["epoch"], "steps": self.state["step"], "elapsed_s": self.state["elapsed"],
                "best_val": self.members[0].state["best_val"] if self.members else None,
                "run_dir": str(self.run_dir)}

    def _fit_models(self) -> None:
        t0 = time.perf_counter()
        x_train = read_rows(self.train_set, self.train_rows)
        val_fs = self.val_set or self.train_set
        x_val = read_rows(val_fs, self.val_rows) if len(self.val_rows) else None
        y_train, y_val = self.train_set.labels[self.train_rows], val_fs.labels[self.val_rows]
        self.fitted = []
        for kind in KINDS.values():
            cfgs = [c for c in self.fitted_cfgs if isinstance(c, kind.config)]
            if cfgs:
                self.fitted += [Fitted(*f) for f in kind.fit(cfgs, x_train, y_train, x_val, y_val, log=self.log)]
        self.state["elapsed"] += time.perf_counter() - t0

    def _epoch(self, progress: Callable | None) -> None:
        opts, epoch = self.opts, self.state["epoch"]
        order = self.train_rows[np.random.default_rng([opts.seed, epoch]).permutation(len(self.train_rows))]
        active = [m for m in self.members if not m.state["stopped"]]
        steps = range(self.state["batch"], self.steps_per_epoch)
        t0, images, lr = time.perf_counter(), 0, 0.0
        # Read and prepared once, in a background thread while the previous batch trains, for every member.
        ahead = batches(self.train_set, (order[b * opts.batch_size:(b + 1) * opts.batch_size] for b in steps),
                        needs_of(m.model for m in active), self.input_scale)
        for b in progress(steps, epoch) if progress else steps:
            batch = next(ahead)
            for m in active:
                start = time.perf_counter()
                try:
                    result = train_step(m.model, m.optimizer, batch.input_for(m.model), batch.labels,
                                        self.state["step"], m.recipe)
                except NonFiniteLoss:
                    who = f"{m.name}: " if self.search else ""
                    hint = "a lower lr in --grid" if self.search else "a lower --lr"
                    raise TrainingError(f"{who}non-finite loss at epoch {epoch + 1}, step {self.state['step']} "
                                        f"(try {hint}); checkpoints in {self.run_dir} were kept") from None
                lr = result.lr
                m.state["loss_sum"] += result.loss * len(batch)
                m.state["correct"] += int(np.sum(result.logits.argmax(1) == batch.labels))
                m.state["seen"] += len(batch)
                m.state["seconds"] += time.perf_counter() - start
            self.state["step"] += 1
            self.state["batch"] = b + 1
            images += len(batch)
            if opts.save_every and self.state["step"] % opts.save_every == 0 and b + 1 < self.steps_per_epoch:
                self.state["elapsed"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                run_state.save(self)
        ahead.close()
        batch = None  # the last batch's buffers go before validation allocates its own
        seconds = time.perf_counter() - t0
        improved = self._validate(active, epoch)
        self.state.update(epoch=epoch + 1, batch=0)
        if self.after_epoch is not None:
            self.after_epoch(self, epoch + 1)
        self.state["elapsed"] += time.perf_counter() - t0
        if self.search:  # one line per member still training: report draws the chosen one's curves
            records = [self._member_record(m, epoch) for m in active]
        else:
            records = [self._record(epoch, lr, images / max(seconds, 1e-9))]
        run_state.save(self, records=records, improved=bool(improved))
        self.log(_search_line(active, epoch, opts.epochs) if self.search else _epoch_line(records[0], opts.epochs))

    def _validate(self, active: list[Member], epoch: int) -> list[Member]:
        """Every active member on the validation rows (read once), then its best epoch and patience."""
        fs = self.val_set or self.train_set
        loss_sum = {m.name: 0.0 for m in active}
        smoothed_sum = {m.name: 0.0 for m in active}
        correct = {m.name: 0 for m in active}
        if len(self.val_rows):
            chunk = eval_chunk_rows(active[0].cfg, 128)
            for batch in batches(fs, (self.val_rows[b:b + chunk] for b in range(0, len(self.val_rows), chunk)),
                                 needs_of(m.model for m in active), self.input_scale):
                for m in active:
                    logits = m.model.forward(batch.input_for(m.model), keep_cache=False)
                    loss, _ = softmax_cross_entropy(logits, batch.labels)
                    loss_sum[m.name] += float(loss) * len(batch)
                    # The training loss carries label smoothing; the same loss here lets curves compare them.
                    smoothed, _ = softmax_cross_entropy(logits, batch.labels, m.opts.label_smoothing)
                    smoothed_sum[m.name] += float(smoothed) * len(batch)
                    correct[m.name] += int(np.sum(logits.argmax(1) == batch.labels))
        improved = []
        n = max(len(self.val_rows), 1)
        for m in active:
            s = m.state
            s["epochs_trained"] = epoch + 1
            s["last_train_loss"] = s["loss_sum"] / max(s["seen"], 1)
            s["last_train_acc"] = s["correct"] / max(s["seen"], 1)
            if len(self.val_rows):
                s["last_val_acc"], s["last_val_loss"] = correct[m.name] / n, loss_sum[m.name] / n
                s["last_val_loss_smoothed"] = smoothed_sum[m.name] / n
                acc, loss = s["last_val_acc"], s["last_val_loss"]
            else:  # without validation, "best" is the lowest training loss
                acc, loss = -s["last_train_loss"], s["last_train_loss"]
            s.update(loss_sum=0.0, correct=0, seen=0)
            s["val_history"] = [*s.get("val_history", []), acc]  # a search scores its recent epochs (search.py)
            if s["best_val"] is None or acc > s["best_val"]:
                s.update(best_val=acc, best_loss=loss, best_epoch=epoch + 1, bad_epochs=0)
                if m.best is not None:
                    for k, v in m.model.params.items():
                        m.best[k][...] = v
                improved.append(m)
            else:
                s["bad_epochs"] += 1
                if self.patience and s["bad_epochs"] >= self.patience:
                    s["stopped"] = True
                    self.log(f"{m.name}: no better on validation for {self.patience} epochs; stopped "
                             f"after epoch {epoch + 1}")
        return improved

    def _record(self, epoch: int, lr: float, images_per_s: float) -> dict[str, Any]:
        """A plain run's metrics.jsonl line for this epoch."""
        from .lae import flops_per_image

        m = self.members[0]
        s = m.state
        record = {"epoch": epoch + 1, "step": self.state["step"], "lr": lr, "train_loss": s["last_train_loss"],
                  "train_acc": s["last_train_acc"], "images_per_s": images_per_s,
                  "gflops": images_per_s * flops_per_image(m.cfg) / 1e9, "elapsed_s": self.state["elapsed"]}
        if len(self.val_rows):
            record.update(val_loss=s["last_val_loss"], val_acc=s["last_val_acc"],
                          val_loss_smoothed=s["last_val_loss_smoothed"])
        record["run"] = self.state["run"]
        return record

    def _member_record(self, m: Member, epoch: int) -> dict[str, Any]:
        """A search's metrics.jsonl line for one member at this epoch (tagged with its name)."""
        s = m.state
        record = {"epoch": epoch + 1, "member": m.name, "step": self.state["step"],
                  "lr": m.recipe.lr_at(self.state["step"] - 1), "train_loss": s["last_train_loss"],
                  "train_acc": s["last_train_acc"], "elapsed_s": self.state["elapsed"]}
        if len(self.val_rows):
            record.update(val_loss=s["last_val_loss"], val_acc=s["last_val_acc"],
                          val_loss_smoothed=s["last_val_loss_smoothed"])
        record["run"] = self.state["run"]
        return record

def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    line = (f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  acc {r['train_acc']:.3f}  "
            f"lr {r['lr']:.2e}  {r['images_per_s']:.0f} img/s")
    if "val_acc" in r:
        line += f"  val_loss {r['val_loss']:.4f}  val_acc {r['val_acc']:.3f}"
    return line


def _search_line(active: list[Member], epoch: int, epochs: int) -> str:
    if not active:
        return f"epoch {epoch + 1}/{epochs}"
    leader = max(active, key=lambda m: (m.state["best_val"] or -1.0, -(m.state["best_loss"] or 0.0)))
    if leader.state["best_val"] is None:
        return f"epoch {epoch + 1}/{epochs}: {counted(len(active), 'adaptor')} trained"
    return (f"epoch {epoch + 1}/{epochs}: {counted(len(active), 'adaptor')} trained, best so far {leader.name} "
            f"val_acc {leader.state['best_val']:.3f}")


def _empty_split(labels: np.ndarray, val_split: float) -> str:
    """Why --val-split held out nothing: every class is too small for the fraction to round to one row."""
    largest = int(np.bincount(labels[labels >= 0]).max()) if np.any(labels >= 0) else 0
    return (f"--val-split {val_split:g} holds out no rows: the largest class has {largest} labelled "
            f"row{'' if largest == 1 else 's'}, and {val_split:g} of {largest} rounds to 0 rows per class; "
            f"pass a --val-split above {0.5 / max(largest, 1):.2g}, or --val FEATURE_SET")
