"""``mist-device report``: what a run did, as PNG files and a per-class table, for every kind of run.

A plain run (one adaptor) has its per-epoch records in ``metrics.jsonl``. A search (``--model auto|probe``,
``--grid``) has its table in ``grid.json`` and, for each member trained by epochs, lines in ``metrics.jsonl``
tagged with the member's name. ``read_run`` reads either into one ``RunRecord``; the report then draws:

- ``curves.png``: loss, accuracy and learning rate per epoch of the chosen model, the kept epoch marked;
- ``search.png`` (a search): validation accuracy of every configuration, probes beside adaptors, the chosen
  one marked;
- ``confusion.png`` (with a test set): the chosen model's confusion matrix;

and prints a precision/recall/F1 table (as scikit-learn's ``classification_report`` does), NumPy only, so it
works on the base install. The plots need matplotlib, from the optional ``[plots]`` extra.

The training loss is the mean over an epoch's steps of the loss that was minimised (with label smoothing);
the validation loss is measured at the epoch's end. Runs record the validation loss with the same smoothing
(``val_loss_smoothed``), and the curves plot that one, so the two lines mean the same thing; for a run
written before that field existed the figure says what differs.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import FormatError
from mist.formats.atomic import atomic_write_bytes

PLOTS_HINT = "pip install 'mist-tuning[plots]'"
CURVES, SEARCH, CONFUSION, TABLE = "curves.png", "search.png", "confusion.png", "report.json"
OUTPUTS = (CURVES, SEARCH, CONFUSION, TABLE)
# Above this many classes a confusion picture is unreadable and its canvas grows with C^2 (1,000 classes: a
# 55,000-pixel square); the table and report.json still hold every class.
MAX_PLOTTED_CLASSES = 100
DPI = 100
CURVES_SIZE = (13.5, 4.4)  # inches: three panels side by side and a footnote, 1350 x 440 pixels
KIND_COLOURS = {"probe": "C0", "lae": "C1"}  # any other kind takes the next colour of the cycle


@dataclass
class RunRecord:
    """What a run directory says about itself: its kind, the chosen model, the curves to draw."""

    kind: str  # "plain" or "search"
    chosen: str  # the model that best.safetensors holds
    epochs: list[dict[str, Any]] = field(default_factory=list)  # per-epoch records of the curves' model
    curves_of: str | None = None  # whose curves those are (the chosen model, or the best one trained by epochs)
    kept_epoch: int | None = None  # the epoch whose weights were kept
    kept_rule: str = "best validation accuracy"
    search: dict[str, Any] | None = None  # grid.json


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Every epoch record of metrics.jsonl (per-step records, ``"kind": "step"``, are skipped)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise FormatError(f"{path}: line {number} is not JSON") from None
        if isinstance(record, dict) and "kind" not in record and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def kept_epoch(epochs: list[dict[str, Any]]) -> tuple[int, str]:
    """The epoch train keeps as best.safetensors: the first with the highest validation accuracy, or without
    validation the first with the lowest training loss (device/train.py's rule)."""
    if all("val_acc" in r for r in epochs):
        best = max(epochs, key=lambda r: (r["val_acc"], -r["epoch"]))
        return best["epoch"], "best validation accuracy"
    best = min(epochs, key=lambda r: (r["train_loss"], r["epoch"]))
    return best["epoch"], "lowest training loss (no validation rows)"


def read_run(run_dir: Path) -> RunRecord:
    """A plain run (metrics.jsonl) or a finished search (grid.json); anything else is a one-line FormatError."""
    metrics, grid = run_dir / "metrics.jsonl", run_dir / "grid.json"
    if grid.exists():
        return _read_search(run_dir, grid, metrics)
    if (run_dir / "grid-last.safetensors").exists():
        raise FormatError(f"{run_dir}: the search has not finished (no grid.json yet); rerun its `mist-device "
                          "train` command with --resume, then report")
    if not metrics.exists():
        raise FormatError(f"{run_dir}: not a run of `mist-device train` (no metrics.jsonl, no grid.json)")
    epochs = [r for r in _read_lines(metrics) if "member" not in r]
    if not epochs:
        raise FormatError(f"{metrics}: holds no epoch records yet")
    epoch, rule = kept_epoch(epochs)
    return RunRecord("plain", "the adaptor", epochs, "the adaptor", epoch, rule)


def _read_search(run_dir: Path, grid: Path, metrics: Path) -> RunRecord:
    try:
        search = json.loads(grid.read_text())
        members = [m for m in search["members"] if isinstance(m, dict) and isinstance(m.get("name"), str)]
        chosen = str(search["chosen"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{grid}: not a search table of `mist-device train` ({type(e).__name__}: {e})") from None
    if not members:
        raise FormatError(f"{grid}: lists no members")
    lines = _read_lines(metrics) if metrics.exists() else []
    by_member: dict[str, list[dict[str, Any]]] = {}
    for r in lines:
        by_member.setdefault(str(r.get("member")), []).append(r)
    record = RunRecord("search", chosen, search={**search, "members": members})
    # The chosen model's curves; when it was fitted once (a probe), the best model trained by epochs instead.
    curves_of = chosen if chosen in by_member else next((m["name"] for m in members if m["name"] in by_member), None)
    if curves_of is not None:
        row = next(m for m in members if m["name"] == curves_of)
        record.epochs, record.curves_of = by_member[curves_of], curves_of
        if isinstance(row.get("best_epoch"), int) and row["best_epoch"] > 0:
            record.kept_epoch = row["best_epoch"]
        else:
            record.kept_epoch, record.kept_rule = kept_epoch(record.epochs)
    return record


# ---- the per-class table ------------------------------------------------------------------------------------


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


# ---- the figures --------------------------------------------------------------------------------------------


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Written whole or not at all: a report killed mid-write never leaves half a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def loss_footing(epochs: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(the validation loss key to plot, a note on what differs from the training loss, or None)."""
    validated = [r for r in epochs if "val_loss" in r]
    if not validated or all("val_loss_smoothed" in r for r in validated):
        return "val_loss_smoothed", None
    return "val_loss", ("validation loss without label smoothing, training loss with it: "
                        "validation sits lower by the smoothing term")


def plot_curves(record: RunRecord, path: Path, title: str) -> Path:
    """Loss, accuracy and learning rate against epoch, validation beside training, the kept epoch marked."""
    plt = _pyplot()
    epochs = record.epochs
    x = [r["epoch"] for r in epochs]
    val_loss_key, note = loss_footing(epochs)
    fig, axes = plt.subplots(1, 3, figsize=CURVES_SIZE, dpi=DPI)
    panels = [("loss", "cross-entropy (with label smoothing, as trained)" if note is None else "cross-entropy",
               "train_loss", val_loss_key),
              ("accuracy", "accuracy", "train_acc", "val_acc"),
              ("learning rate", "learning rate (end of epoch)", "lr", None)]
    for ax, (name, ylabel, train_key, val_key) in zip(axes, panels):
        ax.plot(x, [r[train_key] for r in epochs], marker="o", markersize=3, color="C0",
                label="training (mean over the epoch)" if val_key else "lr")
        if val_key and any(val_key in r for r in epochs):
            vx = [r["epoch"] for r in epochs if val_key in r]
            ax.plot(vx, [r[val_key] for r in epochs if val_key in r], marker="s", markersize=3, color="C1",
                    label="validation (end of epoch)")
        if record.kept_epoch is not None:
            ax.axvline(record.kept_epoch, color="C2", linestyle="--", linewidth=2,
                       label=f"kept: epoch {record.kept_epoch}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(title, fontsize=10)
    footnote = f"kept epoch: {record.kept_rule}" + (f"; {note}" if note else "")
    fig.text(0.5, 0.01, footnote, ha="center", va="bottom", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def search_size(members: int) -> tuple[float, float]:
    """Figure size in inches: a row per configuration, never shorter than 3 in."""
    return 9.0, max(3.0, 0.32 * members + 1.6)


def plot_search(search: dict[str, Any], path: Path, title: str) -> Path:
    """Validation accuracy of every configuration, best first, coloured by kind, the chosen one starred."""
    plt = _pyplot()
    rows = [m for m in search["members"] if isinstance(m.get("val_acc"), (int, float))]
    rows.sort(key=lambda m: -m["val_acc"])
    kinds = list(dict.fromkeys(str(m.get("kind")) for m in rows))
    spare = iter(f"C{i}" for i in range(2, 10))
    colours = {k: KIND_COLOURS.get(k) or next(spare, "0.4") for k in kinds}
    fig, ax = plt.subplots(figsize=search_size(len(rows)), dpi=DPI)
    y = np.arange(len(rows))[::-1]  # best at the top
    accs = [m["val_acc"] for m in rows]
    for yi, m in zip(y, rows):
        colour = colours[str(m.get("kind"))]
        ax.hlines(yi, 0, m["val_acc"], color=colour, alpha=0.25, linewidth=1)
        chosen = m["name"] == search.get("chosen")
        ax.plot(m["val_acc"], yi, marker="*" if chosen else "o", markersize=15 if chosen else 7, color=colour,
                markeredgecolor="black" if chosen else colour, linestyle="none")
        ax.annotate(f"{m['val_acc']:.3f}" + ("  chosen" if chosen else ""), (m["val_acc"], yi),
                    xytext=(9, 0), textcoords="offset points", va="center", fontsize=8,
                    fontweight="bold" if chosen else "normal")
    ax.set_yticks(y, labels=[m["name"] for m in rows], fontsize=8)
    for label, m in zip(ax.get_yticklabels(), rows):
        if m["name"] == search.get("chosen"):
            label.set_fontweight("bold")
    low = min(accs) if accs else 0.0
    ax.set_xlim(max(0.0, low - 0.1), min(1.0, max(accs, default=1.0) + 0.08) if accs else 1.0)
    ax.set_xlabel(f"validation accuracy ({search.get('val_rows', '?')} rows)")
    ax.set_ylabel("configuration")
    for kind, colour in colours.items():
        ax.plot([], [], marker="o", linestyle="none", color=colour, label=kind)
    ax.legend(loc="lower right", fontsize=8, title="kind", title_fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def confusion_size(num_classes: int) -> float:
    """Figure side in inches: room for one readable cell per class, never smaller than 6 in."""
    return max(6.0, 0.55 * num_classes + 3.0)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Counts, coloured by the fraction of each true class (so rare classes show their errors too)."""
    plt = _pyplot()
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
    return _save(fig, path)
