"""Every model kind the device trains, behind one small surface: build, checkpoint, load, bytes shipped.

Kinds: ``lae`` (the adaptor, lae.py) and ``probe`` (standardised logistic regression, probe.py). Both offer
``cfg``, ``params``, ``dtype`` and ``forward(x, keep_cache)``, which is all evaluation and prediction need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FormatError

from .fast_lae import build_model
from .lae import LAE, LAEConfig, init_params
from .probe import Probe, ProbeConfig


def make_lae(cfg: LAEConfig, seed: int) -> LAE:
    """The one place the grid trainer builds an adaptor: the fast path where it applies (fast_lae.build_model)."""
    return build_model(cfg, init_params(cfg, seed))


def model_kind(model: Any) -> str:
    return "probe" if isinstance(model, Probe) else "lae"


def shipped_bytes_per_image(model: Any, storage_bytes: int = 2) -> int:
    """Bytes per image that must reach the device for this model, as shipped (fp16 by default): a pooled
    probe needs only the k pooled vectors, everything else the k full T x d maps."""
    cfg = model.cfg
    if isinstance(model, Probe):
        return cfg.shipped_values() * storage_bytes
    return cfg.groups * cfg.tokens * cfg.dim * storage_bytes


def describe(model: Any) -> str:
    cfg = model.cfg
    if isinstance(model, Probe):
        return f"probe ({cfg.features}, l2={cfg.l2:g})"
    return (f"LAE (blocks/group={cfg.blocks_per_group}, rank={cfg.rank}, heads={cfg.heads}"
            f"{', pos_embed' if cfg.pos_embed else ''})")


def model_checkpoint(model: Any, classes: list[str], feature_set: dict[str, Any],
                     train_state: dict[str, Any] | None = None) -> Checkpoint:
    return Checkpoint(params=model.params, config=model.cfg.to_dict(), classes=classes, feature_set=feature_set,
                      train_state=train_state, kind=model_kind(model))


def model_from_checkpoint(ckpt: Checkpoint, path: str | Path) -> LAE | Probe:
    """Rebuild the model a checkpoint holds (any kind), in float32; a one-line FormatError if it cannot."""
    try:
        params = {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()}
        if ckpt.kind == "probe":
            return Probe(ProbeConfig.from_dict(ckpt.config), params)
        if ckpt.kind == "lae":
            from .checkpoint_check import adaptor_config  # metadata checked against the weights first

            return build_model(adaptor_config(ckpt, path), params)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: checkpoint config or weights do not form a {ckpt.kind} ({e})") from None
    raise FormatError(f"{path}: a {ckpt.kind!r} checkpoint holds no single model; use its run's best.safetensors")
