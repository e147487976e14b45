"""How many bytes an LAE configuration will need, computed from its sizes alone, before anything is allocated.

The figures are upper-bound-ish estimates (float32 compute, every cache of the forward kept for the backward),
good to within a small factor: enough to refuse ``--blocks-per-group 100000`` with a number instead of letting
the kernel kill the process at 22 GB.
"""

from __future__ import annotations

from .lae import LAEConfig

_FLOAT = 4  # bytes: compute is float32 whatever the storage dtype
_PER_ARRAY = 256  # bytes of Python and NumPy bookkeeping per parameter array (6 per block)
_PER_PREDICTION = 1024  # a prediction record (dicts, strings) before it is written out
_INTERPRETER = 64 * 1024**2  # Python, NumPy and the CLI before any array: measured ~48 MB


def parameter_count(cfg: LAEConfig) -> int:
    """The same number as ``count_params(init_params(cfg))``, without building the arrays."""
    d, r, C = cfg.dim, cfg.rank, cfg.num_classes
    per_block = 2 * d + d * 3 * r + 3 * r + r * d + d
    return cfg.num_blocks * per_block + 2 * d + d * C + C


def _block_activations(cfg: LAEConfig, batch: int) -> int:
    """Floats one block keeps for its backward: LN input and output, qkv, scores and softmax, o, out."""
    T, d, r, h = cfg.tokens, cfg.dim, cfg.rank, cfg.heads
    return batch * (T * (4 * d + 5 * r) + 2 * h * T * T)


def training_bytes(cfg: LAEConfig, batch: int) -> int:
    """Weights, gradients, two AdamW moments and a checkpoint's copies, plus one batch's caches."""
    P = parameter_count(cfg)
    weights = 6 * P  # params, grads, m, v, and the copies written to a checkpoint
    # x1.5: the backward's temporaries beside the caches (measured: 242 KB per block where the caches alone
    # are 172 KB, d=16 T=8 r=8 batch 32).
    caches = max(cfg.num_blocks, 1) * _block_activations(cfg, batch) * 3 // 2
    inputs = 2 * batch * cfg.groups * cfg.tokens * cfg.dim  # the batch read from disk, and its float32 copy
    bookkeeping = 6 * cfg.num_blocks * _PER_ARRAY * 4
    return _INTERPRETER + _FLOAT * (weights + caches + inputs) + bookkeeping


def inference_bytes(cfg: LAEConfig, batch: int, rows: int) -> int:
    """Weights once, one block's activations at a time, one batch of input, and a record per predicted row."""
    P = parameter_count(cfg)
    caches = 2 * _block_activations(cfg, batch)
    inputs = 2 * batch * cfg.groups * cfg.tokens * cfg.dim
    outputs = rows * (2 * cfg.num_classes * 8 + _PER_PREDICTION)
    return _INTERPRETER + _FLOAT * (2 * P + caches + inputs) + outputs + 6 * cfg.num_blocks * _PER_ARRAY
