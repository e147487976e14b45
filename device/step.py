"""One training step, the only place in mist where weights change by gradient.

    logits = model.forward(inputs)                       inputs: what the model reads from a data.Batch
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing)
    grads = model.backward(dlogits)
    refuse a non-finite loss (nothing has been updated yet)
    clip the gradients to a global L2 norm of grad_clip
    lr = warm-up + cosine schedule at this step
    AdamW update, in place

``mist-device train`` (one adaptor or a whole search, device/train.py) and every benchmark call
``train_step``; a model is anything with ``forward(inputs, keep_cache)``, ``backward(dlogits)`` and
``params`` (the LAE, its fast path). A dense model (device/dense_train.py) takes the same step with the
pixel loss in place of the cross-entropy: ``loss(logits, labels) -> (loss, dlogits)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TrainingError
from .layers import softmax_cross_entropy
from .optim import AdamW, clip_grad_norm, lr_schedule


class NonFiniteLoss(TrainingError):
    """The loss came out NaN or infinite; the weights were not touched."""


@dataclass(frozen=True)
class Recipe:
    """Everything a step needs besides the model and the batch: the schedule and the loss settings."""

    lr: float
    total_steps: int
    warmup_steps: int
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        return lr_schedule(step, self.total_steps, self.lr, self.warmup_steps, self.min_lr)


@dataclass
class StepResult:
    loss: float
    logits: np.ndarray
    lr: float


LossFn = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]


def loss_and_grads(model: Any, inputs: Any, labels: np.ndarray, label_smoothing: float = 0.0,
                   loss_fn: LossFn | None = None) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """Forward, mean loss (cross-entropy unless ``loss_fn``) and backward: (loss, grads keyed like
    model.params, logits)."""
    logits = model.forward(inputs)
    if loss_fn is None:
        loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing)
    else:
        loss, dlogits = loss_fn(logits, labels)
    return loss, model.backward(dlogits), logits


def train_step(model: Any, optimizer: AdamW, inputs: Any, labels: np.ndarray, step: int,
               recipe: Recipe, loss_fn: LossFn | None = None) -> StepResult:
    """One step at 0-based ``step`` of the schedule. Raises NonFiniteLoss before any weight changes."""
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught just below
        loss, grads, logits = loss_and_grads(model, inputs, labels, recipe.label_smoothing, loss_fn)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss at step {step}")
    clip_grad_norm(grads, recipe.grad_clip)
    lr = recipe.lr_at(step)
    optimizer.step(grads, lr=lr)
    return StepResult(float(loss), logits, lr)
