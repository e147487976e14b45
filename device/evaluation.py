"""Evaluation with classes matched by name: a test set may hold a subset of the training classes.

A test folder that lacks one of the training classes gets its own, shorter class list, so its label indices
mean other names than the adaptor's. Labels are mapped through the names; a test class the adaptor never saw
cannot be scored and is refused, by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mist.formats import FeatureSet, FormatError

from .lae import LAE
from .layers import softmax_cross_entropy
from .train import evaluate_rows


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


def evaluate_by_name(model: LAE, classes: list[str], fs: FeatureSet, batch_size: int = 128,
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
