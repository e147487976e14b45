"""A checkpoint's classes and training-set record, checked against the sizes its model config claims.

Every model kind calls ``check_record`` from its ``from_checkpoint``: whatever the kind, a checkpoint whose
class list, head and recorded training layout disagree with its config is refused with one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mist.formats import Checkpoint, FeatureSet, FormatError, Manifest


def feature_set_record(fs: FeatureSet) -> dict[str, Any]:
    """What a checkpoint remembers of its training set: identity plus layout, for compatibility checks."""
    layout = fs.manifest.with_shards([], complete=False).to_json()
    return {"fingerprint": fs.fingerprint, "directory": str(fs.directory), "layout": layout}


def training_layout(record: Any, where: str) -> Manifest:
    """The manifest (without shards) of the set a checkpoint was trained on, read back and checked."""
    if not isinstance(record, dict) or not isinstance(record.get("layout"), dict):
        raise FormatError(f"{where}: checkpoint lacks the feature-set layout")
    fingerprint = record.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise FormatError(f"{where}: checkpoint feature_set fingerprint must be a string")
    return Manifest.from_json(record["layout"], source=f"{where} (feature_set layout)")


def check_record(ckpt: Checkpoint, where: str, num_classes: int, outputs: int | None,
                 sizes: tuple[int, int, int]) -> Manifest:
    """Refuse non-finite weights, a class list that is not ``num_classes`` unique names or differs from the
    training set's, a head with another number of ``outputs``, and a training layout whose (dim, tokens,
    groups) differ from ``sizes``. Returns that layout."""
    for name, value in ckpt.params.items():
        if not np.all(np.isfinite(value)):
            raise FormatError(f"{where}: weights {name!r} hold NaN or infinite values")
    classes = ckpt.classes
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise FormatError(f"{where}: checkpoint classes must be a list of strings")
    if len(set(classes)) != len(classes):
        duplicate = next(c for c in classes if classes.count(c) > 1)
        raise FormatError(f"{where}: checkpoint classes repeat {duplicate!r}")
    if len(classes) != num_classes or outputs != num_classes:
        raise FormatError(f"{where}: checkpoint lists {len(classes)} classes, its config says {num_classes} and its "
                          f"head has {outputs} outputs")
    layout = training_layout(ckpt.feature_set, where)
    recorded = {"dim": layout.dim, "tokens": layout.tokens, "groups": layout.k}
    for (name, have), configured in zip(recorded.items(), sizes):
        if have != configured:
            raise FormatError(f"{where}: checkpoint config has {name}={configured} but was trained on a set "
                              f"with {have}")
    if layout.classes != classes:
        raise FormatError(f"{where}: checkpoint classes differ from those of the set it was trained on")
    return layout


def inference_record(record: dict[str, Any]) -> dict[str, Any]:
    """What an exported adaptor keeps of its training set: the fingerprint and the layout, minus local paths
    (the set's directory and the image source's root on the training machine)."""
    layout = dict(record["layout"])
    if isinstance(layout.get("dataset"), dict):
        layout["dataset"] = {k: v for k, v in layout["dataset"].items() if k != "root"}
    return {k: v for k, v in record.items() if k not in ("directory", "layout")} | {"layout": layout}
