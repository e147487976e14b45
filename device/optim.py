"""AdamW, global-norm gradient clipping, the warm-up + cosine learning-rate schedule and its warm-up length.

All three follow their PyTorch counterparts step for step (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_)
so that a NumPy run and a PyTorch run from the same weights stay together; tests/test_adamw.py checks this.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def default_no_decay(name: str) -> bool:
    """Biases and LayerNorm weights are not decayed: shrinking them toward 0 is not a useful prior."""
    return name.endswith(".bias") or "norm." in name


class AdamW:
    """torch.optim.AdamW (amsgrad=False) over a dict of named arrays, updated in place."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        no_decay: Callable[[str], bool] = default_no_decay,
    ):
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.decay = {name: not no_decay(name) for name in params}
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}
        self.step_count = 0

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        if set(grads) != set(self.params):
            raise ValueError(f"grads keys differ from params keys: {sorted(set(grads) ^ set(self.params))}")
        lr = self.lr if lr is None else lr
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - self.beta1**t
        bias_correction2_sqrt = math.sqrt(1.0 - self.beta2**t)
        step_size = lr / bias_correction1
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.decay[name]:
                p *= 1.0 - lr * self.weight_decay  # decoupled: decay the weight, not the gradient
            m += (1.0 - self.beta1) * (g - m)  # = beta1*m + (1-beta1)*g, written as torch's lerp_ rounds it
            v *= self.beta2
            v += (1.0 - self.beta2) * (g * g)
            # torch divides sqrt(v) by sqrt(bc2) before adding eps (not sqrt(v / bc2) + eps): keep that order
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p -= step_size * (m / denom)

    def state_dict(self) -> dict[str, np.ndarray | int]:
        state: dict[str, np.ndarray | int] = {"step": self.step_count}
        for name in self.params:
            state[f"m.{name}"] = self.m[name].copy()
            state[f"v.{name}"] = self.v[name].copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        for prefix, moments in (("m.", self.m), ("v.", self.v)):
            for name, buf in moments.items():
                src = np.asarray(state[prefix + name])
                if src.shape != buf.shape:
                    want = buf.shape
                    raise ValueError(f"optimizer state {prefix}{name} has shape {src.shape}, expected {want}")
                buf[...] = src
        self.step_count = int(state["step"])  # accepts an int or a 0-d array read back from a file


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all grads in place so their global L2 norm is at most max_norm; return the norm before clipping.

    As torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied only when below 1.
    max_norm <= 0 disables clipping (the norm is still returned, for logging).
    """
    # accumulate in float64: a float32 sum of squares over many weights loses digits for no saving
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads.values():
                g *= coef
    return total


def lr_schedule(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for 0-based `step`.

    Warm-up: lr = base_lr * (step + 1) / warmup_steps for step < warmup_steps, so step 0 already moves and
    step warmup_steps - 1 reaches base_lr. Then cosine decay from base_lr at step warmup_steps to min_lr at
    step total_steps (the last trained step, total_steps - 1, is just above min_lr); min_lr after that.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


MAX_WARMUP_FRACTION = 0.5


def warmup_steps(warmup_epochs: float | None, warmup_fraction: float, steps_per_epoch: int,
                 total_steps: int) -> tuple[int, str | None]:
    """Warm-up length in steps, and a warning when an explicit ``warmup_epochs`` had to be clamped.

    A fixed warm-up in epochs breaks short runs: 3 warm-up epochs of a 3-epoch run never let the cosine decay,
    and of a 2-epoch run never reach the peak. A fraction of the run scales with it; an explicit
    ``--warmup EPOCHS`` longer than half the run is cut to half, with a warning, so the cosine always has room
    to decay.
    """
    if warmup_epochs is None:
        return int(round(warmup_fraction * total_steps)), None
    asked = int(round(warmup_epochs * steps_per_epoch))
    limit = int(MAX_WARMUP_FRACTION * total_steps)
    if asked <= limit:
        return asked, None
    epochs = total_steps / max(steps_per_epoch, 1)
    return limit, (f"--warmup {warmup_epochs:g} epochs is more than half of a {epochs:g}-epoch run, so the learning "
                   f"rate would hardly decay; warming up for {limit} of {total_steps} steps instead "
                   f"(pass --warmup-fraction F to choose a fraction)")
