"""The LAE as a model kind: how it is built, read back from a checkpoint, what memory it needs, and the
points of a ``--grid`` search over it.

The math lives in device/lae.py (the readable model, the reference) and device/fast_lae.py (the same model
without any (B, T, d) activation, which trains and predicts); this module declares the kind (``KIND``) that
device/kinds.py registers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FormatError

from .errors import TrainingError
from .fast_lae import FastLAE
from .lae import LAE, LAEConfig, init_params
from .model_kind import ModelKind
from .record import check_record

_INT_FIELDS = ("dim", "tokens", "groups", "num_classes", "rank", "heads", "blocks_per_group")
_FLOAT_FIELDS = ("input_scale", "init_std")
_ARRAYS_PER_BLOCK, _ARRAYS_OUTSIDE_BLOCKS = 6, 4  # norm, qkv, out (weight and bias each); final norm, head
_FLOAT = 4  # bytes: compute is float32 whatever the storage dtype


def build(cfg: LAEConfig, params: dict[str, np.ndarray]) -> LAE | FastLAE:
    """The model training, evaluation and prediction use: the fast path, checked against lae.LAE in tests
    (a learned position table included: docs/performance.md (20), (21))."""
    return FastLAE(cfg, params)


def config_from_checkpoint(ckpt: Checkpoint, path: str | Path) -> LAEConfig:
    """The checkpoint's LAEConfig, once it is shown to agree with its weights, classes and training layout.

    ``load_checkpoint`` (formats) checks the file and each field's JSON type; this checks what only the
    device knows, so a forged or mismatched checkpoint is refused with one line, never used silently."""
    where = str(path)
    config = ckpt.config
    if not isinstance(config, dict):
        raise FormatError(f"{where}: checkpoint config is not an object")
    for name in _INT_FIELDS:
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, int)):
            raise FormatError(f"{where}: checkpoint config '{name}' must be an integer, got {value!r}")
    for name in _FLOAT_FIELDS:
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, (int, float))
                               or not math.isfinite(value)):
            raise FormatError(f"{where}: checkpoint config '{name}' must be a finite number, got {value!r}")
    if "pos_embed" in config and not isinstance(config["pos_embed"], bool):
        raise FormatError(f"{where}: checkpoint config 'pos_embed' must be true or false, got {config['pos_embed']!r}")
    if "pool" in config and not isinstance(config["pool"], str):
        raise FormatError(f"{where}: checkpoint config 'pool' must be a string, got {config['pool']!r}")
    try:
        cfg = LAEConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: checkpoint config does not form an LAE ({e})") from None

    # Count before building the expected shapes: a config claiming 10**9 blocks must not make us try.
    expected = cfg.num_blocks * _ARRAYS_PER_BLOCK + _ARRAYS_OUTSIDE_BLOCKS + int(cfg.pos_embed)
    if len(ckpt.params) != expected:
        raise FormatError(f"{where}: checkpoint config implies {expected} weight arrays ({cfg.num_blocks} blocks), "
                          f"the file holds {len(ckpt.params)}")
    head = ckpt.params.get("head.weight")
    outputs = head.shape[-1] if head is not None and head.ndim == 2 else None
    layout = check_record(ckpt, where, cfg.num_classes, outputs, (cfg.dim, cfg.tokens, cfg.groups))
    if cfg.pool == "cls" and layout.prefix_tokens < 1:
        raise FormatError(f"{where}: checkpoint pools the class token, but its training set has none")
    return cfg


def from_checkpoint(ckpt: Checkpoint, path: str | Path) -> LAE | FastLAE:
    cfg = config_from_checkpoint(ckpt, path)
    try:
        return build(cfg, {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: checkpoint config or weights do not form an LAE ({e})") from None


def parameter_count(cfg: LAEConfig) -> int:
    """The same number as ``count_params(init_params(cfg))``, without building the arrays."""
    d, r, C = cfg.dim, cfg.rank, cfg.num_classes
    per_block = 2 * d + d * 3 * r + 3 * r + r * d + d
    return cfg.num_blocks * per_block + 2 * d + d * C + C + (cfg.tokens * d if cfg.pos_embed else 0)


# ---- memory: what the fast path really keeps (fast_lae.py), in float32 -----------------------------------
# Measured against peak RSS by tests/test_device_memory.py at two shapes.


def _fast_step_floats(cfg: LAEConfig, batch: int) -> tuple[int, int]:
    """Floats FastLAE holds between steps (its reused buffers: O and each block's softmax shifts and sums; the
    attention maps are never stored), and the floats one step adds at its peak (the end of its forward and the
    start of its backward): each group's projection GEMM Y (G is a view of it), the backward's dO, a group's
    F^T cols operand (every block's dqkv is written into it), and the temporaries of the dO and var_z
    updates."""
    T, r, h, nb, bpg = cfg.tokens, cfg.rank, cfg.heads, cfg.num_blocks, cfg.blocks_per_group
    NR = nb * (r + 1)
    held = batch * T * (NR + nb * 2 * h)
    step = 0
    for j in range(cfg.groups):
        read = nb if j == cfg.groups - 1 else max(0, (j + 1) * bpg - 1)
        step += bpg * 3 * r + read * (r + 1)  # Y = F [Abar | Wc^T]
    step += NR + bpg * 3 * r + NR + 3 * NR  # dO, cols, temporaries
    if cfg.pos_embed:
        step += 3 * cfg.groups  # each group's mean and variance of F + pos_embed, and their covariance term
    return held, batch * T * step


def memory_bytes(cfg: LAEConfig, batch: int, keeps_best: bool = True) -> tuple[int, int]:
    """(bytes one adaptor holds for the whole run, bytes its step adds while it runs), beyond the batch itself
    (memory.batch_bytes counts that): weights, gradients, two AdamW moments, the best epoch's copy, and the
    activations of a step."""
    weights = _FLOAT * (5 if keeps_best else 4) * parameter_count(cfg)
    held, step = _fast_step_floats(cfg, batch)
    return weights + _FLOAT * held, _FLOAT * step


def inference_bytes(cfg: LAEConfig, batch: int) -> int:
    """Bytes to run the adaptor over chunks of ``batch`` rows: weights once and one chunk's activations
    (the attention maps live in per-thread chunks of about 1 MB, counted in memory.py's slack)."""
    T, r, h, NR = cfg.tokens, cfg.rank, cfg.heads, cfg.num_blocks * (cfg.rank + 1)
    step = batch * (T * (NR + 2 * 3 * r * cfg.blocks_per_group + 2 * NR + 3 * cfg.pos_embed + 2 * h))
    return _FLOAT * (parameter_count(cfg) + step)


def describe(cfg: LAEConfig) -> str:
    return (f"LAE (blocks/group={cfg.blocks_per_group}, rank={cfg.rank}, heads={cfg.heads}"
            f"{', pos_embed' if cfg.pos_embed else ''})")


def shipped_values(cfg: LAEConfig) -> int:
    """The adaptor reads every token of every map."""
    return cfg.groups * cfg.tokens * cfg.dim


# ---- the points of a --grid search --------------------------------------------------------------------

# grid key -> (field, type, which object it sets): the adaptor's config or the member's optimiser options
GRID_KEYS: dict[str, tuple[str, type, str]] = {
    "lr": ("lr", float, "opt"), "wd": ("weight_decay", float, "opt"), "ls": ("label_smoothing", float, "opt"),
    "blocks": ("blocks_per_group", int, "cfg"), "rank": ("rank", int, "cfg"), "heads": ("heads", int, "cfg"),
    "pos": ("pos_embed", bool, "cfg"),
}


def parse_grid(spec: str) -> list[dict[str, Any]]:
    """'lr=1e-3,3e-3 blocks=1,4' -> the cartesian product as a list of {key: value}, in spec order."""
    path = Path(spec)
    if "=" not in spec and path.is_file():
        spec = path.read_text()
    axes: list[tuple[str, list[Any]]] = []
    for part in spec.split():
        key, sep, values = part.partition("=")
        if not sep or key not in GRID_KEYS or not values:
            raise ValueError(f"--grid: {part!r} is not KEY=V1,V2 with a key from {', '.join(GRID_KEYS)}")
        if key in dict(axes):
            raise ValueError(f"--grid: {key} is given twice")
        kind = GRID_KEYS[key][1]
        try:
            parsed = [_parse_value(v, kind) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid: {part!r} has a value that is not a {kind.__name__}") from None
        axes.append((key, parsed))
    if not axes:
        raise ValueError("--grid: empty; give at least one KEY=V1,V2")
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _parse_value(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    value = kind(text)
    if kind is float and not math.isfinite(value):
        raise ValueError(text)
    return value


def member_name(combo: dict[str, Any]) -> str:
    """'lae-lr0.003-blocks4-pos1': the grid point's values in spec order; 'lae-defaults' for none."""
    if not combo:
        return "lae-defaults"
    return "lae-" + "-".join(f"{k}{int(v) if isinstance(v, (bool, int)) else format(v, 'g')}" for k, v in combo.items())


def candidates(base: LAEConfig, options: dict[str, Any]) -> list[tuple[str, LAEConfig, dict[str, Any]]]:
    """A search's adaptors: (name, config, changes to the training options) for every point of
    ``options["grid"]`` (the defaults alone without one). Bad points are one-line TrainingErrors."""
    combos = parse_grid(options["grid"]) if options.get("grid") else [{}]
    found: list[tuple[str, LAEConfig, dict[str, Any]]] = []
    for combo in combos:
        cfg = replace(base, **{GRID_KEYS[k][0]: v for k, v in combo.items() if GRID_KEYS[k][2] == "cfg"})
        try:
            cfg.validate()
        except ValueError as e:
            raise TrainingError(f"--grid point {member_name(combo)}: {e}") from None
        name = member_name(combo)
        if name in [n for n, _, _ in found]:
            raise TrainingError(f"--grid: {name} appears twice")
        found.append((name, cfg, {GRID_KEYS[k][0]: v for k, v in combo.items() if GRID_KEYS[k][2] == "opt"}))
    return found



def reads(cfg: LAEConfig) -> str:
    return "maps"  # as build: the fast path, which reads the prepared maps


KIND = ModelKind(name="lae", trains="steps", config=LAEConfig, build=build, from_checkpoint=from_checkpoint,
                 memory_bytes=memory_bytes, inference_bytes=inference_bytes, shipped_values=shipped_values,
                 describe=describe, parameter_count=parameter_count, reads=reads, candidates=candidates,
                 init=init_params, takes_grid=True)
