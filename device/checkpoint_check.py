"""Check that a checkpoint's metadata and its weights describe one and the same adaptor, before using either.

``load_checkpoint`` (formats) checks the file and each field's JSON type; this module checks what only the
device knows: the config forms a valid LAE, the weights have exactly the shapes that config implies, the
class list matches the head's outputs, and the recorded training layout matches the config's sizes. A
forged or mismatched checkpoint is refused here with one line, never used to predict with silently.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mist.formats import Checkpoint, FormatError
from mist.formats.checkpoint import training_layout

from .lae import LAE, LAEConfig

_INT_FIELDS = ("dim", "tokens", "groups", "num_classes", "rank", "heads", "blocks_per_group")
_FLOAT_FIELDS = ("input_scale", "init_std")
_ARRAYS_PER_BLOCK, _ARRAYS_OUTSIDE_BLOCKS = 6, 4  # norm, qkv, out (weight and bias each); final norm, head


def adaptor_config(ckpt: Checkpoint, path: str | Path) -> LAEConfig:
    """The checkpoint's LAEConfig, once it is shown to agree with its weights, classes and layout."""
    where = str(path)

    def fail(why: str) -> FormatError:
        return FormatError(f"{where}: {why}")

    config = ckpt.config
    if not isinstance(config, dict):
        raise fail("checkpoint config is not an object")
    for name in _INT_FIELDS:
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, int)):
            raise fail(f"checkpoint config '{name}' must be an integer, got {value!r}")
    for name in _FLOAT_FIELDS:
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, (int, float))
                               or not math.isfinite(value)):
            raise fail(f"checkpoint config '{name}' must be a finite number, got {value!r}")
    if "pos_embed" in config and not isinstance(config["pos_embed"], bool):
        raise fail(f"checkpoint config 'pos_embed' must be true or false, got {config['pos_embed']!r}")
    if "pool" in config and not isinstance(config["pool"], str):
        raise fail(f"checkpoint config 'pool' must be a string, got {config['pool']!r}")
    try:
        cfg = LAEConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise fail(f"checkpoint config does not form an LAE ({e})") from None

    # Count before building the expected shapes: a config claiming 10**9 blocks must not make us try.
    expected = (cfg.num_blocks * _ARRAYS_PER_BLOCK + _ARRAYS_OUTSIDE_BLOCKS
                + int(bool(getattr(cfg, "pos_embed", False))))
    if len(ckpt.params) != expected:
        raise fail(f"checkpoint config implies {expected} weight arrays ({cfg.num_blocks} blocks), "
                   f"the file holds {len(ckpt.params)}")
    for name, value in ckpt.params.items():
        if not np.all(np.isfinite(value)):
            raise fail(f"weights {name!r} hold NaN or infinite values")

    classes = ckpt.classes
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise fail("checkpoint classes must be a list of strings")
    if len(set(classes)) != len(classes):
        duplicate = next(c for c in classes if classes.count(c) > 1)
        raise fail(f"checkpoint classes repeat {duplicate!r}")
    head = ckpt.params.get("head.weight")
    outputs = head.shape[-1] if head is not None and head.ndim == 2 else None
    if len(classes) != cfg.num_classes or outputs != cfg.num_classes:
        raise fail(f"checkpoint lists {len(classes)} classes, its config says {cfg.num_classes} and its head "
                   f"has {outputs} outputs")

    layout = training_layout(ckpt.feature_set, where)
    sizes = {"dim": (layout.dim, cfg.dim), "tokens": (layout.tokens, cfg.tokens), "groups": (layout.k, cfg.groups)}
    for name, (recorded, configured) in sizes.items():
        if recorded != configured:
            raise fail(f"checkpoint config has {name}={configured} but was trained on a set with {recorded}")
    if layout.classes != classes:
        raise fail("checkpoint classes differ from those of the set it was trained on")
    if cfg.pool == "cls" and layout.prefix_tokens < 1:
        raise fail("checkpoint pools the class token, but its training set has none")
    return cfg


def load_adaptor_model(ckpt: Checkpoint, path: str | Path) -> LAE:
    cfg = adaptor_config(ckpt, path)
    try:
        return LAE(cfg, {k: v.astype("float32") for k, v in ckpt.params.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: checkpoint config or weights do not form an LAE ({e})") from None
