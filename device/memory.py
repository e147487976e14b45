"""The one estimate of how much memory a command will need, from sizes alone, before anything is allocated.

``--max-memory`` (default: what the machine has available now) refuses a run or an evaluation whose estimate
is above it, with a number instead of the kernel killing the process. The estimate adds up:

- the interpreter with NumPy, safetensors, click and mist loaded (``INTERPRETER``, measured);
- the batch every member shares (data.py): the staged rows in the storage dtype, the prepared float32 maps
  and their statistics, and float32 features when a member reads them (the training batch, or a
  validation chunk: the training batch is freed before validation);
- each member's own memory, from its kind (device/adaptor.py and device/probe.py: weights, gradients, AdamW
  moments, activations of a step, or a fit's arrays), summed over the members of a search;
- the fitted models' training rows, read once as float32.

tests/test_device_memory.py holds the estimate within 20% of a real run's peak RSS at two shapes.
"""

from __future__ import annotations

from typing import Any

from .kinds import kind_for_config

INTERPRETER = 44 * 1024**2  # Python, NumPy, safetensors, click and mist before any array (measured 43 MB)
# Beyond what the arrays themselves add up to, a run's peak RSS carries a share that grows with the row size
# and not with the batch: per-thread scratch rows, the read-ahead thread's own allocations and what the
# allocator keeps of freed temporaries. Measured at T x d = 49 x 192 to 197 x 768: about 28 rows of float32.
_SLACK_ROWS = 28
_PER_PREDICTION = 1024  # a prediction record (dicts, strings) before it is written out


def batch_bytes(row_shape: tuple[int, int, int], batch: int, storage_bytes: int, features: bool) -> int:
    """The shared batch: the staged rows, the float32 maps with mean and variance, float32 features if read."""
    k, T, d = row_shape
    staged = batch * k * T * d * storage_bytes
    maps = 4 * batch * k * T * (d + 2)
    return staged + maps + (4 * batch * k * T * d if features else 0)


def training_bytes(member_cfgs: list[Any], fitted_cfgs: list[Any], batch: int, rows: int, val_rows: int,
                   row_shape: tuple[int, int, int], storage_bytes: int, search: bool) -> int:
    """Peak bytes of a run, the largest of its three phases. Members hold their weights and reused buffers
    side by side, and step one at a time, so a phase holds every member's share plus the largest step:
    - fitting: the ``rows`` training and validation rows read once as float32, and the largest fit (freed
      before the epochs);
    - training: the shared batch, and the largest member step;
    - validation: an evaluation chunk, and each member's evaluation buffers."""
    from .evaluation import eval_chunk_rows

    k, T, d = row_shape
    kinds = [(kind_for_config(c), c) for c in member_cfgs]
    shares = [kind.memory_bytes(c, batch, search) for kind, c in kinds]
    held, largest_step = sum(h for h, _ in shares), max((s for _, s in shares), default=0)
    features = any(kind.reads(c) == "features" for kind, c in kinds)
    training = batch_bytes(row_shape, batch, storage_bytes, features) + largest_step if kinds else 0
    chunk = min(eval_chunk_rows(member_cfgs[0], 128), val_rows) if kinds else 0
    validation = (batch_bytes(row_shape, chunk, storage_bytes, features)
                  + sum(kind.inference_bytes(c, chunk) for kind, c in kinds)) if kinds else 0
    fits = [kind_for_config(c).memory_bytes(c, rows, False)[1] for c in fitted_cfgs]
    fitting = 4 * rows * k * T * d + max(fits) if fits else 0
    return INTERPRETER + _SLACK_ROWS * 4 * k * T * d + held + max(training, validation, fitting)


def confusion_bytes(num_classes: int) -> int:
    """A C x C confusion matrix as evaluate and report hold it: the int64 array, and its Python list (an int
    object and a list slot per cell, ~40 bytes) for the JSON and the table. 50,000 classes (the most a set may
    name, formats/SPEC.md §2) would need ~100 GiB, which the memory check refuses before allocating."""
    return num_classes * num_classes * 48 + num_classes * 256


def inference_bytes(model: Any, batch: int, rows: int) -> int:
    """Running ``model`` over ``rows`` rows in chunks of ``batch``: its kind's figure, the chunk's staged and
    prepared features, and a record per predicted row."""
    k, T, d = model.cfg.groups, model.cfg.tokens, model.cfg.dim
    chunk = batch_bytes((k, T, d), batch, 4, model.reads == "features")
    outputs = rows * (2 * model.cfg.num_classes * 8 + _PER_PREDICTION)
    return INTERPRETER + kind_for_config(model.cfg).inference_bytes(model.cfg, batch) + chunk + outputs
