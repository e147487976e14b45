"""Predictions as records, CSV and JSON: one writer for ``predict`` on a feature set and ``predict --server``.

A record is ``{<key columns>..., "prediction": class, "top": [{"class": c, "p": probability}, ...]}``; the
key columns are ``id`` and ``label`` for a feature set's rows and ``image`` for files sent to a server. CSV
quoting and JSON escaping are kit's (class names come from users' folders and may hold anything).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mist.kit.text import csv_line, json_text


def top_classes(logits: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """Per row: the most probable class and the ``top_k`` classes with their softmax probabilities."""
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [{"prediction": classes[top[i, 0]],
             "top": [{"class": classes[c], "p": round(float(probs[i, c]), 6)} for c in top[i]]}
            for i in range(len(logits))]


def format_predictions(records: list[dict[str, Any]], keys: list[str], top_k: int, fmt: str) -> str:
    """``fmt`` "json": a list of records; "csv": ``keys``, prediction, then class1, p1, ... classK, pK."""
    if fmt == "json":
        return json_text(records, indent=1) + "\n"
    header = keys + ["prediction"] + [f"{kind}{j + 1}" for j in range(top_k) for kind in ("class", "p")]
    lines = [",".join(header)]
    for r in records:
        cells: list[Any] = [r[k] if r[k] is not None else "" for k in keys] + [r["prediction"]]
        for t in r["top"]:
            cells += [t["class"], f"{t['p']:.6f}"]
        lines.append(csv_line(cells))
    return "\n".join(lines) + "\n"
