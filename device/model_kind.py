"""What a model kind declares, so that nothing else in mist branches on kinds.

A kind is one module (device/adaptor.py for the LAE, device/probe.py for the linear probe) that fills in a
``ModelKind`` and is registered in device/kinds.py. Its models offer ``cfg``, ``params``, ``dtype``,
``kind`` (the registered name), ``reads`` ("maps" or "features": which field of a data.Batch their forward
takes) and ``forward(inputs, keep_cache)``; a kind trained by steps also offers ``backward(dlogits)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mist.formats import Checkpoint

TRAINS = ("steps", "fit")


@dataclass(frozen=True)
class ModelKind:
    name: str  # as recorded in a checkpoint's model_kind
    trains: str  # "steps": minibatch AdamW through device/step.py; "fit": one full-batch fit before the epochs
    config: type  # a dataclass with validate(), to_dict() and from_dict()
    build: Callable[[Any, dict[str, np.ndarray]], Any]  # (config, float32 params) -> the model that computes
    from_checkpoint: Callable[[Checkpoint, str], Any]  # the model, once config, weights and record agree
    # (config, batch rows or fit rows, keeps a best copy) -> (bytes held for the whole run, bytes its own step
    # or fit adds while it runs): members hold theirs side by side, and step one at a time
    memory_bytes: Callable[[Any, int, bool], tuple[int, int]]
    inference_bytes: Callable[[Any, int], int]  # bytes to run it over batches of this many rows
    shipped_values: Callable[[Any], int]  # values per image that must reach the device for it
    describe: Callable[[Any], str]  # one line for tables and logs
    parameter_count: Callable[[Any], int]
    reads: Callable[[Any], str]  # config -> "maps" or "features": what its models' forward takes from a Batch
    # (base adaptor config carrying the set's sizes, the CLI's search options) -> [(name, config, changes to
    # the training options)]: what ``--model NAME`` (or auto) trains and compares
    candidates: Callable[[Any, dict[str, Any]], list[tuple[str, Any, dict[str, Any]]]]
    init: Callable[[Any, int], dict[str, np.ndarray]] | None = None  # steps: (config, seed) -> params
    takes_grid: bool = False  # whether --grid varies its candidates
    # fit: (configs, train features, train labels, val features or None, val labels) -> [(name, model, report)]
    # for a batch of configs sharing one read of the rows (float32 (n, k, T, d) features)
    fit: Callable[..., list[tuple[str, Any, dict[str, Any]]]] | None = None

    def __post_init__(self) -> None:
        if self.trains not in TRAINS:
            raise ValueError(f"ModelKind {self.name}: trains must be one of {TRAINS}, got {self.trains!r}")
        if (self.trains == "steps") != (self.init is not None) or (self.trains == "fit") != (self.fit is not None):
            raise ValueError(f"ModelKind {self.name}: a kind trained by steps declares init, one fitted declares fit")
