"""Evaluation: any model over rows of a feature set, and scoring with classes matched by name.

``evaluate_rows`` runs a model's forward over rows in chunks through the data step (device/data.py), with
its memory bounded by the set's row shape whatever ``batch_size`` says. ``evaluate_by_name`` scores it when
a test set holds a subset of the training classes:

A test folder that lacks one of the training classes gets its own, shorter class list, so its label indices
mean other names than the adaptor's. Labels are mapped through the names; a test class the adaptor never saw
cannot be scored and is refused, by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mist.formats import FeatureSet, FormatError

from .data import batches
from .layers import softmax_cross_entropy

# Evaluation reads at most this many bytes of float32 features per forward, whatever --batch-size says:
# its memory is then bounded by the set's row shape alone (see eval_chunk_rows).
EVAL_CHUNK_BYTES = 16 << 20


def eval_chunk_rows(cfg: Any, batch_size: int) -> int:
    """Rows per evaluation forward: batch_size, capped so the float32 maps stay under EVAL_CHUNK_BYTES."""
    return max(1, min(batch_size, EVAL_CHUNK_BYTES // (4 * cfg.groups * cfg.tokens * cfg.dim)))


def evaluate_rows(model: Any, fs: FeatureSet, rows: np.ndarray, batch_size: int = 128,
                  label_smoothing: float = 0.0, progress: Callable | None = None) -> dict[str, Any]:
    """Forward over ``rows`` in chunks of at most eval_chunk_rows; return loss, accuracy, predictions and
    logits. ``progress(starts, chunk)`` wraps the chunk start offsets (a bar, see progress.py); chunks are
    read one ahead of the forward."""
    logits_all, loss_sum = [], 0.0
    step = eval_chunk_rows(model.cfg, batch_size)
    starts = range(0, len(rows), step)
    starts = progress(starts, step) if progress else starts
    scale = getattr(model.cfg, "input_scale", 1.0)
    for batch in batches(fs, (rows[b:b + step] for b in starts), {model.reads}, scale, model.dtype):
        logits = model.forward(batch.input_for(model), keep_cache=False)
        if np.all(batch.labels >= 0):
            loss, _ = softmax_cross_entropy(logits, batch.labels, label_smoothing)
            loss_sum += float(loss) * len(batch)
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


def labels_by_name(fs: FeatureSet, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of ``fs`` and their labels as indices into ``classes`` (the adaptor's)."""
    rows = np.nonzero(fs.labels >= 0)[0]
    if len(rows) == 0:
        raise FormatError(f"{fs.directory}: no labelled rows to evaluate on")
    own = fs.manifest.classes
    present = np.unique(fs.labels[rows])
    unknown = [own[i] for i in present if own[i] not in classes]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        if len(unknown) > 10:
            shown += f" and {len(unknown) - 10} more"
        raise FormatError(f"{fs.directory}: holds classes the adaptor was not trained on: {shown}; "
                          "evaluate needs its classes to be a subset of the training classes")
    index = {name: i for i, name in enumerate(classes)}
    mapping = np.array([index.get(name, -1) for name in own], dtype=np.int64)
    return rows, mapping[fs.labels[rows]]


def evaluate_by_name(model: Any, classes: list[str], fs: FeatureSet, batch_size: int = 128,
                     progress: Callable | None = None, keep_arrays: bool = False) -> dict[str, Any]:
    """Accuracy, loss, per-class accuracy (None for a class with no test rows) and the confusion matrix
    over the adaptor's ``classes``; with ``keep_arrays``, also the labels and predictions."""
    rows, labels = labels_by_name(fs, classes)
    logits = evaluate_rows(model, fs, rows, batch_size=batch_size, progress=progress)["logits"]
    predictions = logits.argmax(axis=1)
    loss, _ = softmax_cross_entropy(logits, labels)
    C = len(classes)
    confusion = np.zeros((C, C), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(C)]
    result = {"rows": int(len(rows)), "accuracy": float(np.mean(predictions == labels)), "loss": float(loss),
              "classes": list(classes), "test_classes": [c for c, n in zip(classes, support) if n],
              "per_class_accuracy": dict(zip(classes, per_class)), "confusion": confusion.tolist()}
    if keep_arrays:
        result.update(labels=labels, predictions=predictions)
    return result
