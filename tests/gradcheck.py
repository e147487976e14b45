"""Finite-difference gradient checking, shared by the layer and model tests.

The idiom: make the function scalar by contracting its output with a fixed random upstream gradient g
(f = sum(g * out)), so one analytic backward pass with dout = g is compared against central differences
(f(x+h) - f(x-h)) / 2h in float64. The error is max|a - b| / max(1e-8, max(|a| + |b|)): relative to the
scale of the whole gradient, so entries that are legitimately ~0 do not turn rounding noise into failures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-8, float(np.max(np.abs(a) + np.abs(b)))))


def sample_indices(shape: tuple[int, ...], max_checks: int | None, rng: np.random.Generator) -> list[tuple]:
    """Every index of a small tensor, a random sample of `max_checks` indices of a large one."""
    size = int(np.prod(shape))
    if max_checks is None or size <= max_checks:
        flat = np.arange(size)
    else:
        flat = rng.choice(size, max_checks, replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def numerical_grad(
    f: Callable[[], float], x: np.ndarray, indices: list[tuple], h: float = 1e-6
) -> np.ndarray:
    """Central differences of f() w.r.t. x[idx] for each idx; f must read x, which is perturbed in place."""
    assert x.dtype == np.float64, "finite differences need float64"
    out = np.empty(len(indices))
    for n, idx in enumerate(indices):
        orig = x[idx]
        x[idx] = orig + h
        fp = f()
        x[idx] = orig - h
        fm = f()
        x[idx] = orig
        out[n] = (fp - fm) / (2 * h)
    return out


def check_grad(
    f: Callable[[], float],
    x: np.ndarray,
    analytic: np.ndarray,
    max_checks: int | None = 60,
    seed: int = 0,
    h: float = 1e-6,
) -> float:
    """Relative error between `analytic` (df/dx, shaped like x) and central differences on sampled indices."""
    assert analytic.shape == x.shape, (analytic.shape, x.shape)
    indices = sample_indices(x.shape, max_checks, np.random.default_rng(seed))
    num = numerical_grad(f, x, indices, h)
    ana = np.array([analytic[idx] for idx in indices])
    return rel_error(ana, num)


def contract(g: np.ndarray, forward: Callable[[], np.ndarray]) -> Callable[[], float]:
    """f() = sum(g * forward()): the scalar whose gradient w.r.t. anything is the backward of dout = g."""
    return lambda: float(np.sum(g * forward()))
