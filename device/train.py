"""The training loop: stream minibatches from a feature set, step the LAE with AdamW, keep checkpoints.

One readable loop (nanoGPT style). Everything resume needs lives in the checkpoint: weights, AdamW moments,
step, position in the epoch, the running epoch metrics and the best validation score. The shuffle order is
a pure function of (seed, epoch), so (seed, epoch, batch) *is* the RNG state, and a run resumed after a
kill -9 replays exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FeatureSet, FormatError, load_checkpoint, save_checkpoint
from mist.formats.atomic import atomic_write_bytes
from mist.formats.checkpoint import feature_set_record

from .checkpoint_check import adaptor_config
from .fast_lae import FastLAE, build_model
from .lae import LAE, LAEConfig, flops_per_image, init_params, loss_and_grads
from .optim import AdamW, clip_grad_norm, lr_schedule
from .readahead import read_batches
from .schedule import warmup_steps

LAST, BEST, METRICS = "last.safetensors", "best.safetensors", "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (bad data, non-finite loss); the message is one line for the CLI."""


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


def split_rows(fs: FeatureSet, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded, per-class fraction of labelled rows for validation."""
    labelled = np.nonzero(fs.labels >= 0)[0]
    if val_split <= 0 or len(labelled) == 0:
        return labelled, np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 7919])
    val = []
    for c in np.unique(fs.labels[labelled]):
        rows = labelled[fs.labels[labelled] == c]
        take = int(round(len(rows) * val_split))
        val.append(rng.permutation(rows)[:take])
    val_rows = np.sort(np.concatenate(val))
    return np.setdiff1d(labelled, val_rows), val_rows


def read_finite(fs: FeatureSet, rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Features of ``rows``, refusing NaN or inf: a corrupt map would otherwise become silent garbage."""
    x = fs.read(rows, dtype=dtype)
    finite = np.isfinite(x).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
        raise TrainingError(f"{fs.directory}: non-finite values in the features of rows {rows[~finite][:5].tolist()}")
    return x


def _raise_nonfinite(fs: FeatureSet) -> Callable[[np.ndarray], None]:
    def fail(rows: np.ndarray) -> None:
        raise TrainingError(f"{fs.directory}: non-finite values in the features of rows {rows[:5].tolist()}")

    return fail


# Evaluation reads at most this many bytes of float32 features per forward, whatever --batch-size says:
# its memory is then bounded by the set's row shape alone (see eval_chunk_rows).
EVAL_CHUNK_BYTES = 16 << 20


def eval_chunk_rows(cfg: LAEConfig, batch_size: int) -> int:
    """Rows per evaluation forward: batch_size, capped so the float32 maps stay under EVAL_CHUNK_BYTES."""
    return max(1, min(batch_size, EVAL_CHUNK_BYTES // (4 * cfg.groups * cfg.tokens * cfg.dim)))


def evaluate_rows(model: LAE, fs: FeatureSet, rows: np.ndarray, batch_size: int = 128,
                  label_smoothing: float = 0.0, progress: Callable | None = None) -> dict[str, Any]:
    """Forward over ``rows`` in batches; return loss, accuracy, predictions and logits.

    ``progress(starts, batch_size)`` wraps the batch start offsets (a bar, see ``progress.py``). A FastLAE
    reads ahead and reuses its buffers, in chunks of at most eval_chunk_rows rows (the bar counts chunks
    as they are read, one ahead of the forward)."""
    from .layers import softmax_cross_entropy

    logits_all, loss_sum = [], 0.0
    step = eval_chunk_rows(model.cfg, batch_size) if isinstance(model, FastLAE) else batch_size
    starts = range(0, len(rows), step)
    starts = progress(starts, step) if progress else starts
    if isinstance(model, FastLAE):
        batches = read_batches(model, fs, (rows[b:b + step] for b in starts), _raise_nonfinite(fs))
    else:
        batches = ((rows[b:b + step], read_finite(fs, rows[b:b + step], model.dtype)) for b in starts)
    for pick, x in batches:
        logits = model.forward(x, keep_cache=False)
        labels = fs.labels[pick]
        if np.all(labels >= 0):
            loss, _ = softmax_cross_entropy(logits, labels, label_smoothing)
            loss_sum += float(loss) * len(pick)
        logits_all.append(logits)
    logits = np.concatenate(logits_all) if logits_all else np.zeros((0, model.cfg.num_classes))
    labels = fs.labels[rows]
    preds = logits.argmax(axis=1) if len(logits) else np.zeros(0, np.int64)
    return {
        "loss": loss_sum / max(len(rows), 1),
        "accuracy": float(np.mean(preds == labels)) if len(rows) else float("nan"),
        "predictions": preds,
        "logits": logits,
        "labels": labels,
    }


def build_config(fs: FeatureSet, **overrides: Any) -> LAEConfig:
    m = fs.manifest
    cfg = LAEConfig(dim=m.dim, tokens=m.tokens, groups=m.k, num_classes=len(m.classes), **overrides)
    if cfg.pool == "cls" and m.prefix_tokens < 1:
        raise ValueError("--pool cls needs a class token, but these features have no prefix tokens")
    cfg.validate()
    return cfg


class Trainer:
    def __init__(self, run_dir: str | Path, train_set: FeatureSet, val_set: FeatureSet | None,
                 cfg: LAEConfig, opts: TrainOptions, log: Callable[[str], None] = print):
        self.run_dir, self.train_set, self.val_set = Path(run_dir), train_set, val_set
        self.cfg, self.opts, self.log = cfg, opts, log
        if len(train_set) == 0:
            raise TrainingError(f"{train_set.directory}: the training set is empty")
        split_seed = opts.seed if opts.val_seed is None else opts.val_seed
        self.train_rows, self.val_rows = split_rows(train_set, opts.val_split, split_seed)
        if len(self.train_rows) == 0:
            raise TrainingError(f"{train_set.directory}: no labelled rows to train on")
        if val_set is not None:
            self.val_rows = np.nonzero(val_set.labels >= 0)[0]
        self.steps_per_epoch = math.ceil(len(self.train_rows) / opts.batch_size)
        self.total_steps = self.steps_per_epoch * opts.epochs
        self.warmup_steps, self.warmup_warning = warmup_steps(opts.warmup_epochs, opts.warmup_fraction,
                                                              self.steps_per_epoch, self.total_steps)
        self.model = build_model(cfg, init_params(cfg, opts.seed))
        self.optimizer = AdamW(self.model.params, lr=opts.lr, weight_decay=opts.weight_decay)
        self._truncate_metrics = False
        self._pending_metrics: list[str] = []  # step records of an --overwrite run's first epoch (progress.py)
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_val": None,
                                      "loss_sum": 0.0, "correct": 0, "seen": 0, "elapsed": 0.0,
                                      # Tags this run's metrics lines, so a resume never keeps another run's.
                                      "run": secrets.token_hex(8)}

    # ---- checkpoints ----

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            params=self.model.params, config=self.cfg.to_dict(), classes=self.train_set.manifest.classes,
            feature_set=feature_set_record(self.train_set), optimizer=self._optimizer_tensors(),
            train_state={**self.state, "options": asdict(self.opts), "shuffle": {
                "seed": self.opts.seed, "epoch": self.state["epoch"], "batch": self.state["batch"]}},
        )

    def _optimizer_tensors(self) -> dict[str, np.ndarray]:
        # AdamW's step count equals the trainer's step, which train_state already holds.
        return {k: v for k, v in self.optimizer.state_dict().items() if k != "step"}

    def resume(self, path: Path) -> None:
        try:
            self._resume(path)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{path}: not a usable resumable checkpoint ({e.__class__.__name__}: {e})") from None

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        adaptor_config(ckpt, path)  # metadata and weights agree before any weight is copied in
        if not ckpt.resumable:
            raise FormatError(f"{path}: not a resumable checkpoint (no train_state)")
        if ckpt.feature_set.get("fingerprint") != self.train_set.fingerprint:
            raise FormatError(f"{path}: was trained on a different feature set than {self.train_set.directory}")
        saved = ckpt.train_state.get("options", {})
        defaults = asdict(TrainOptions())  # an option added since the checkpoint was written had its default
        for key, value in asdict(self.opts).items():
            if key != "save_every" and saved.get(key, defaults[key]) != value:
                raise FormatError(f"{path}: was started with {key}={saved.get(key)!r}, now {value!r}; "
                                  "resume with the same options")
        if LAEConfig.from_dict(ckpt.config) != self.cfg:
            raise FormatError(f"{path}: adaptor config differs from the one asked for; resume with the same options")
        for name, value in ckpt.params.items():
            self.model.params[name][...] = value
        self.optimizer.load_state_dict({**ckpt.optimizer, "step": ckpt.train_state["step"]})
        self.state = {k: v for k, v in ckpt.train_state.items() if k not in ("options", "shuffle")}

    # ---- the loop ----

    def fit(self, resume: bool = False, overwrite: bool = False,
            progress: Callable | None = None) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last = self.run_dir / LAST
        if resume and last.exists():
            self.resume(last)
            _drop_metrics_after(self.run_dir / METRICS, self.state["epoch"], self.state.get("run"))
            self.log(f"resumed from {last} at epoch {self.state['epoch'] + 1}, step {self.state['step']}")
        elif resume:  # killed before the first checkpoint: nothing to resume, start clean
            _drop_metrics_after(self.run_dir / METRICS, 0)
            self.log(f"no checkpoint in {self.run_dir} yet; starting from the beginning")
        elif last.exists() and not overwrite:
            raise TrainingError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                "or --overwrite to start again")
        else:
            # Old checkpoints stay until this run's first epoch replaces them; old metrics likewise.
            self._truncate_metrics = True
        opts, flops = self.opts, flops_per_image(self.cfg)
        while self.state["epoch"] < opts.epochs:
            epoch, start_batch = self.state["epoch"], self.state["batch"]
            order = self.train_rows[np.random.default_rng([opts.seed, epoch]).permutation(len(self.train_rows))]
            batches = range(start_batch, self.steps_per_epoch)
            t0 = time.perf_counter()
            images = 0
            # The next batch is read and cast in a background thread while this one trains.
            ahead = read_batches(self.model, self.train_set,
                                 (order[b * opts.batch_size:(b + 1) * opts.batch_size] for b in batches),
                                 _raise_nonfinite(self.train_set))
            for b in progress(batches, epoch) if progress else batches:
                rows, x = next(ahead)
                y = self.train_set.labels[rows]
                with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are caught just below
                    loss, grads, logits = loss_and_grads(self.model, x, y, opts.label_smoothing)
                if not math.isfinite(loss):
                    raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {self.state['step']} "
                                        f"(try a lower --lr); checkpoints in {self.run_dir} were kept")
                clip_grad_norm(grads, opts.grad_clip)
                lr = lr_schedule(self.state["step"], self.total_steps, opts.lr, self.warmup_steps, opts.min_lr)
                self.optimizer.step(grads, lr=lr)
                self.state["step"] += 1
                self.state["batch"] = b + 1
                self.state["loss_sum"] += float(loss) * len(rows)
                self.state["correct"] += int(np.sum(logits.argmax(1) == y))
                self.state["seen"] += len(rows)
                images += len(rows)
                if opts.save_every and self.state["step"] % opts.save_every == 0 and b + 1 < self.steps_per_epoch:
                    self.state["elapsed"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_checkpoint(last, self.checkpoint())
            ahead.close()
            seconds = time.perf_counter() - t0
            self.state["elapsed"] += seconds
            record = self._end_epoch(epoch, lr, images / max(seconds, 1e-9), flops)
            self.log(_epoch_line(record, opts.epochs))
        return self._summary()

    def _end_epoch(self, epoch: int, lr: float, images_per_s: float, flops: float) -> dict[str, Any]:
        s = self.state
        record = {"epoch": epoch + 1, "step": s["step"], "lr": lr,
                  "train_loss": s["loss_sum"] / max(s["seen"], 1), "train_acc": s["correct"] / max(s["seen"], 1),
                  "images_per_s": images_per_s, "gflops": images_per_s * flops / 1e9,
                  "elapsed_s": s["elapsed"]}
        if len(self.val_rows):
            val = evaluate_rows(self.model, self.val_set or self.train_set, self.val_rows)
            record.update(val_loss=val["loss"], val_acc=val["accuracy"])
            score = val["accuracy"]
        else:
            score = -record["train_loss"]  # without validation, "best" is the lowest training loss
        improved = s["best_val"] is None or score > s["best_val"]
        s.update(epoch=epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0)
        if improved:
            s["best_val"] = score
        if s.get("run"):
            record["run"] = s["run"]
        ckpt = self.checkpoint()
        line = json.dumps(record) + "\n"
        if self._truncate_metrics:
            # --overwrite: the old run's metrics stay whole until this run's checkpoints have replaced the old
            # ones, then one atomic rename swaps them; a kill in between leaves lines tagged with the old
            # run, which a resume drops.
            if improved:
                save_checkpoint(self.run_dir / BEST, ckpt)
            save_checkpoint(self.run_dir / LAST, ckpt)
            atomic_write_bytes(self.run_dir / METRICS, ("".join(self._pending_metrics) + line).encode())
            self._pending_metrics = []
            self._truncate_metrics = False
            return record
        try:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(line)
        except OSError as e:  # a full disk fails in write() or close(), with no file name of its own
            raise OSError(e.errno, e.strerror or str(e), str(self.run_dir / METRICS)) from None
        # best before last: a kill between the two leaves `last` at the previous epoch, so the resumed run
        # replays this epoch and writes `best` again; the other order would lose this epoch's best for good.
        if improved:
            save_checkpoint(self.run_dir / BEST, ckpt)
        save_checkpoint(self.run_dir / LAST, ckpt)
        return record

    def _summary(self) -> dict[str, Any]:
        return {"epochs": self.state["epoch"], "steps": self.state["step"], "best_val": self.state["best_val"],
                "elapsed_s": self.state["elapsed"], "run_dir": str(self.run_dir)}


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    line = (f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  acc {r['train_acc']:.3f}  "
            f"lr {r['lr']:.2e}  {r['images_per_s']:.0f} img/s")
    if "val_acc" in r:
        line += f"  val_loss {r['val_loss']:.4f}  val_acc {r['val_acc']:.3f}"
    return line


def _drop_metrics_after(path: Path, epoch: int, run: str | None = None) -> None:
    """A kill between the metrics line and the checkpoint leaves a line the resumed run will write again,
    and a kill mid-line leaves half a line: keep only whole lines of epochs the checkpoint has finished,
    and (when the checkpoint names its run) only lines of that run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or (run and record.get("run", run) != run):
            continue
        if record.get("epoch", 0) <= epoch:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())
