"""Training dense models on a segmentation set, and scoring them: mean IoU, pixel accuracy, per-class IoU.

``mist-device train`` hands a segmentation set here (device/cli_train.py). ``--model lae`` trains the dense
LAE (at ``--lr``), ``--model probe`` the dense probe at each of ``PROBE_LRS`` (a single linear layer's best
step size is not the adaptor's, and the baseline deserves its own), ``--model auto`` all of them; each keeps
its best epoch by validation mIoU, and the candidate with the best validation mIoU is kept (ties: the one
trained first, a probe). Nothing is chosen on a test set.

A step is the one in device/step.py with the pixel loss: forward, pixel cross-entropy (255 ignored),
backward, refuse a non-finite loss, clip, warm-up + cosine schedule, AdamW. The run directory holds
``best.safetensors`` (the chosen model, a ``dense-lae`` or ``dense-probe`` checkpoint), ``metrics.jsonl``
(one line per candidate and epoch) and ``dense.json`` (the candidates and the choice).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import FeatureSet, check_compatible, save_checkpoint
from mist.formats.atomic import atomic_write_json
from mist.formats.checkpoint import Checkpoint, feature_set_record

from .data import read_rows
from .dense import DENSE_LAE, DENSE_PROBE, DenseConfig, build, describe, init_dense, parameter_count, trainable
from .dense_layers import IGNORE_INDEX, pixel_cross_entropy
from .errors import TrainingError
from .optim import AdamW
from .step import NonFiniteLoss, Recipe, train_step

SUMMARY_NAME = "dense.json"
CANDIDATES = "candidates"  # RUN/candidates/NAME.safetensors: each candidate's kept epoch
BEST_NAME = "best.safetensors"
PROBE_LRS = (1e-2, 3e-2, 1e-1)  # on standardised inputs; chosen on validation like every candidate
CHOICES = {"lae": (DENSE_LAE,), "probe": (DENSE_PROBE,), "auto": (DENSE_PROBE, DENSE_LAE)}


@dataclass(frozen=True)
class DenseOptions:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_split: float = 0.2
    val_seed: int | None = None


# ---- scores -----------------------------------------------------------------------------------------------


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts of labelled pixels, row = true class, column = predicted; 255 pixels are not counted."""
    valid = labels != IGNORE_INDEX
    pairs = labels[valid].astype(np.int64) * num_classes + predicted[valid].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """mIoU (the mean over classes present in the labels or the predictions), pixel accuracy, per-class IoU.

    IoU_c = TP / (TP + FP + FN); a class neither labelled nor predicted anywhere has no IoU (null) and is left
    out of the mean, as the usual segmentation benchmarks do."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = int(matrix.sum())
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0, "pixels": total,
            "per_class": [{"class": name, "iou": None if math.isnan(v) else float(v), "pixels": int(n)}
                          for name, v, n in zip(classes, iou, matrix.sum(axis=1))]}


def predict_rows(model, fs: FeatureSet, rows: np.ndarray, batch_size: int,
                 each: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """The confusion matrix of ``model`` over ``rows``; ``each(rows, predicted maps)`` sees every batch."""
    C = model.cfg.num_classes
    matrix = np.zeros((C, C), np.int64)
    for begin in range(0, len(rows), batch_size):
        part = rows[begin:begin + batch_size]
        predicted = model.forward(read_rows(fs, part), keep_cache=False).argmax(axis=-1).astype(np.uint8)
        matrix += confusion(fs.read_masks(part), predicted, C)
        if each is not None:
            each(part, predicted)
    return matrix


# ---- training ---------------------------------------------------------------------------------------------


def split_images(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a seeded fraction of the images held out (a row's targets are a whole
    label map, so there is no class to stratify by)."""
    if val_split <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    order = np.random.default_rng([seed, 7919]).permutation(n)
    take = int(round(n * val_split))
    return np.sort(order[take:]), np.sort(order[:take])


def train_dense(run_dir: str | Path, train_fs: FeatureSet, val_fs: FeatureSet | None, choice: str,
                opts: DenseOptions, settings: dict[str, Any], overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the candidates ``choice`` names, keep the best by validation mIoU; returns dense.json's content."""
    run = Path(run_dir)
    if (run / BEST_NAME).exists() and not overwrite:
        raise TrainingError(f"{run}: already holds a run ({BEST_NAME}); pass --overwrite to start again")
    if val_fs is not None:
        check_compatible(train_fs.manifest, val_fs.manifest)
        if val_fs.manifest.label_size != train_fs.manifest.label_size:
            raise TrainingError(f"{val_fs.directory}: label maps of another size than the training set's")
        train_rows, val_rows, val_source = np.arange(len(train_fs)), np.arange(len(val_fs)), val_fs
    else:
        seed = opts.seed if opts.val_seed is None else opts.val_seed
        train_rows, val_rows = split_images(len(train_fs), opts.val_split, seed)
        val_source = train_fs
    plan = [(kind, lr) for kind in CHOICES[choice] for lr in (PROBE_LRS if kind == DENSE_PROBE else (opts.lr,))]
    if len(plan) > 1 and not len(val_rows):
        raise TrainingError(f"--model {choice} chooses among {len(plan)} candidates on validation: pass "
                            "--val-split or --val")
    if not len(train_rows):
        raise TrainingError(f"{train_fs.directory}: no rows left to train on")
    (run / CANDIDATES).mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("")
    cfg = DenseConfig.for_set(train_fs.manifest, **settings)
    x = read_rows(train_fs, train_rows)  # float32 (n, k, T, d), refusing NaN or inf
    masks = train_fs.read_masks(train_rows)
    candidates, best = [], None
    for kind, lr in plan:
        start = time.perf_counter()
        model, record = _train_one(kind, lr, cfg, x, masks, val_source, val_rows, opts, run, log)
        record.update(kind=kind, name=f"{kind}-lr-{lr:g}", lr=lr, describe=describe(model),
                      parameters=parameter_count(model), seconds=round(time.perf_counter() - start, 2))
        candidates.append(record)
        # every candidate's kept weights, so a study can score the baseline beside the choice
        save_checkpoint(run / CANDIDATES / f"{record['name']}.safetensors", _checkpoint(model, train_fs))
        if best is None or (record["val_miou"] or 0.0) > (best[1]["val_miou"] or 0.0):
            best = (model, record)
    model, record = best
    save_checkpoint(run / BEST_NAME, _checkpoint(model, train_fs))
    summary = {"task": "segmentation", "chosen": record["kind"], "chosen_name": record["name"],
               "candidates": candidates,
               "train_rows": int(len(train_rows)), "val_rows": int(len(val_rows)),
               "options": {**opts.__dict__, **settings, "model": choice}}
    atomic_write_json(run / SUMMARY_NAME, summary)
    why = (f"highest validation mIoU ({record['val_miou']:.4f} on {len(val_rows)} images)" if len(val_rows)
           else "the only candidate, no validation")
    log(f"chose {record['name']}: {why}; checkpoint {run / BEST_NAME}")
    return summary


def _checkpoint(model, train_fs: FeatureSet) -> Checkpoint:
    return Checkpoint(params=model.params, config=model.cfg.to_dict(), classes=list(train_fs.manifest.classes),
                      feature_set=feature_set_record(train_fs), kind=model.kind)


def _train_one(kind: str, lr: float, cfg: DenseConfig, x: np.ndarray, masks: np.ndarray, val_fs: FeatureSet,
               val_rows: np.ndarray, opts: DenseOptions, run: Path, log: Callable[[str], None]):
    model = build(kind, cfg, init_dense(kind, cfg, opts.seed, x))
    optimizer = AdamW(trainable(model), lr=lr, weight_decay=opts.weight_decay)
    batch = min(opts.batch_size, len(x))
    per_epoch = -(-len(x) // batch)
    total = per_epoch * opts.epochs
    recipe = Recipe(lr=lr, total_steps=total, warmup_steps=int(round(opts.warmup_fraction * total)),
                    min_lr=opts.min_lr, grad_clip=opts.grad_clip)
    best_params, best_record, step = None, None, 0
    for epoch in range(opts.epochs):
        order = np.random.default_rng([opts.seed, epoch]).permutation(len(x))
        losses = []
        for begin in range(0, len(x), batch):
            rows = order[begin:begin + batch]
            try:
                result = train_step(model, optimizer, x[rows], masks[rows], step, recipe, pixel_cross_entropy)
            except NonFiniteLoss:
                raise TrainingError(f"{kind}: non-finite loss at step {step}; lower --lr") from None
            losses.append(result.loss)
            step += 1
        record = {"model": f"{kind}-lr-{lr:g}", "epoch": epoch + 1, "loss": float(np.mean(losses))}
        if len(val_rows):
            val = scores(predict_rows(model, val_fs, val_rows, 64), list(val_fs.manifest.classes))
            record.update(val_miou=val["miou"], val_pixel_accuracy=val["pixel_accuracy"])
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"{record['model']} epoch {epoch + 1}/{opts.epochs}: loss {record['loss']:.4f}"
            + (f", val mIoU {record['val_miou']:.4f}, pixel acc {record['val_pixel_accuracy']:.4f}"
               if len(val_rows) else ""))
        better = best_record is None or not len(val_rows) or record["val_miou"] > best_record["val_miou"]
        if better:
            best_params = {name: p.copy() for name, p in model.params.items()}
            best_record = record
    model = build(kind, cfg, best_params)
    return model, {"best_epoch": best_record["epoch"], "val_miou": best_record.get("val_miou"),
                   "val_pixel_accuracy": best_record.get("val_pixel_accuracy"), "loss": best_record["loss"]}


