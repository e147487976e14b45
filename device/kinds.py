"""The one registry of model kinds. The CLI, the trainer and search, the checkpoint loader and the memory
estimate ask it instead of branching on kinds.

Adding a kind: write its module (see device/model_kind.py for what it declares; device/probe.py is a small
example) and add its ``KIND`` to ``KINDS`` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mist.formats import Checkpoint, FormatError

from . import adaptor, probe
from .model_kind import ModelKind

KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (adaptor.KIND, probe.KIND)}


def kind_named(name: str, where: str = "") -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise FormatError(f"{prefix}unknown model kind {name!r}; expected one of {tuple(KINDS)}") from None


def kind_for_config(cfg: Any) -> ModelKind:
    return next(kind for kind in KINDS.values() if isinstance(cfg, kind.config))


def kind_of(model: Any) -> ModelKind:
    return KINDS[model.kind]


def model_from_checkpoint(ckpt: Checkpoint, path: str | Path) -> Any:
    """Rebuild the model a checkpoint holds (any registered kind), in float32; a one-line FormatError if the
    checkpoint's config, weights and record do not agree."""
    if ckpt.kind not in KINDS:
        raise FormatError(f"{path}: a {ckpt.kind!r} checkpoint holds no single model; use its run's best.safetensors")
    return KINDS[ckpt.kind].from_checkpoint(ckpt, path)


def model_checkpoint(model: Any, classes: list[str], feature_set: dict[str, Any],
                     train_state: dict[str, Any] | None = None) -> Checkpoint:
    return Checkpoint(params=model.params, config=model.cfg.to_dict(), classes=classes, feature_set=feature_set,
                      train_state=train_state, kind=model.kind)


def shipped_bytes_per_image(model: Any, storage_bytes: int = 2) -> int:
    """Bytes per image that must reach the device for this model, as shipped (fp16 by default)."""
    return kind_of(model).shipped_values(model.cfg) * storage_bytes


def describe(model: Any) -> str:
    return kind_of(model).describe(model.cfg)

