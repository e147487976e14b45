"""``mist-device report``: training curves and a confusion matrix as PNG files, and a per-class table.

The table (precision, recall, F1, support, as scikit-learn's ``classification_report`` prints it) is NumPy
only, so it works on the base install. The plots need matplotlib, from the optional ``[plots]`` extra;
without it the report says how to get it and still prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import FormatError

PLOTS_HINT = "pip install 'mist-tuning[plots]'"
CURVES, CONFUSION, TABLE = "curves.png", "confusion.png", "report.json"
# Above this many classes a confusion picture is unreadable and its canvas grows with C^2 (1,000 classes: a
# 55,000-pixel square); the table and report.json still hold every class.
MAX_PLOTTED_CLASSES = 100
DPI = 100
CURVES_SIZE = (13.5, 4.0)  # inches: three panels side by side, 1350 x 400 pixels


def read_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of RUN_DIR/metrics.jsonl (per-step records, ``"kind": "step"``, are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FormatError(f"{path}: missing (is {run_dir} a run directory of `mist-device train`?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise FormatError(f"{path}: line {number} is not JSON") from None
        if isinstance(record, dict) and "kind" not in record and "epoch" in record:
            records.append(record)
    if not records:
        raise FormatError(f"{path}: holds no epoch records yet")
    return records


def classification_table(confusion: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows: true, columns: predicted),
    with accuracy and the macro and support-weighted averages. A 0/0 ratio counts as 0."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
    total = support.sum()
    weights = support / total if total else np.zeros_like(support)
    rows = {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)}
    return {
        "classes": rows,
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro avg": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                      "f1": float(f1.mean()), "support": int(total)},
        "weighted avg": {"precision": float(weights @ precision), "recall": float(weights @ recall),
                         "f1": float(weights @ f1), "support": int(total)},
    }


def format_table(table: dict[str, Any]) -> str:
    width = max(12, *(len(c) for c in table["classes"]))
    head = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"
    lines = [head, ""]
    for name, r in table["classes"].items():
        lines.append(f"{name:>{width}}  {r['precision']:9.3f}  {r['recall']:9.3f}  {r['f1']:9.3f}  {r['support']:9d}")
    total = table["macro avg"]["support"]
    lines += ["", f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {table['accuracy']:9.3f}  {total:9d}"]
    for name in ("macro avg", "weighted avg"):
        r = table[name]
        lines.append(f"{name:>{width}}  {r['precision']:9.3f}  {r['recall']:9.3f}  {r['f1']:9.3f}  {r['support']:9d}")
    return "\n".join(lines)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_curves(epochs: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss, accuracy and learning rate against epoch; validation beside training where the run had it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = [r["epoch"] for r in epochs]
    fig, axes = plt.subplots(1, 3, figsize=CURVES_SIZE, dpi=DPI)
    panels = [("loss", "train_loss", "val_loss"), ("accuracy", "train_acc", "val_acc"), ("learning rate", "lr", None)]
    for ax, (name, train_key, val_key) in zip(axes, panels):
        ax.plot(x, [r[train_key] for r in epochs], marker="o", markersize=3, color="C0",
                label="train" if val_key else "lr (end of epoch)")
        if val_key and any(val_key in r for r in epochs):
            vx = [r["epoch"] for r in epochs if val_key in r]
            ax.plot(vx, [r[val_key] for r in epochs if val_key in r], marker="s", markersize=3, color="C1",
                    label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def confusion_size(num_classes: int) -> float:
    """Figure side in inches: room for one readable cell per class, never smaller than 6 in."""
    return max(6.0, 0.55 * num_classes + 3.0)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Counts, coloured by the fraction of each true class (so rare classes show their errors too)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    confusion = np.asarray(confusion)
    support = confusion.sum(axis=1, keepdims=True)
    fraction = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    C = len(classes)
    side = confusion_size(C)
    fig, ax = plt.subplots(figsize=(side, side), dpi=DPI)
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(C), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(C), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if C <= 30:
        for i in range(C):
            for j in range(C):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if fraction[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
