"""A checkpoint's classes and training-set record, checked against the sizes its model config claims.

Every model kind calls ``check_record`` from its ``from_checkpoint``: whatever the kind, a checkpoint whose
class list, head and recorded training layout disagree with its config is refused with one line.
"""

from __future__ import annotations

import numpy as np

from mist.formats import Checkpoint, FormatError, Manifest
from mist.formats.checkpoint import training_layout


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

