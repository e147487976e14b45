"""The small layers of the LAE adaptor, as paired forward/backward functions.

Each `*_forward` returns its output and a cache holding exactly what the matching `*_backward` needs; the
backward sits directly below and reads like the derivative written on paper. Everything works in the
dtype of its inputs (float32 when training, float64 in the gradient checks): Python-float constants keep
the array dtype under NumPy's promotion rules, so nothing is silently upcast.

The attention layer lives in `attention.py`; the model that strings these together lives in `lae.py`.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * weight + bias


def layernorm_forward(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, tuple]:
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance, as torch.nn.LayerNorm
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    y = xhat * weight + bias
    # xhat and rstd are all the backward needs: the mean only shifts, and xhat already encodes it.
    return y, (xhat, rstd, weight)


def layernorm_backward(
    dy: np.ndarray, cache: tuple, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    xhat, rstd, weight = cache
    lead = tuple(range(dy.ndim - 1))  # weight and bias are shared by every leading position
    dweight = (dy * xhat).sum(axis=lead)
    dbias = dy.sum(axis=lead)
    if not need_dx:  # the first block's input is the frozen features: its gradient goes nowhere
        return None, dweight, dbias
    dxhat = dy * weight
    # xhat = (x - mean) * rstd couples every element of a row through mean and rstd. Differentiating:
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    # the first mean comes from d(mean)/dx = 1/d, the second from d(rstd)/dx = -rstd^3 (x - mean) / d.
    dx = rstd * (
        dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------------------
# Linear: y = x @ weight + bias, weight stored as (in, out) so the forward is one matmul with no transpose.


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, tuple]:
    y = x @ weight + bias  # matmul broadcasts over any leading dims of x
    return y, (x, weight)


def linear_backward(
    dy: np.ndarray, cache: tuple, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    x, weight = cache
    # Fold the leading dims into one so the weight gradient is a single (in, N) @ (N, out) matmul.
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dweight = x2.T @ dy2
    dbias = dy2.sum(axis=0)
    dx = dy @ weight.T if need_dx else None
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------------------
# Pooling tokens (B, T, d) -> (B, d): "mean" averages all tokens, "cls" takes token 0.

POOL_MODES = ("mean", "cls")


def pool_forward(x: np.ndarray, mode: str) -> tuple[np.ndarray, tuple]:
    if mode == "mean":
        y = x.mean(axis=1)
    elif mode == "cls":
        y = x[:, 0]
    else:
        raise ValueError(f"unknown pool mode {mode!r}; expected one of {POOL_MODES}")
    return y, (x.shape, mode)


def pool_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    shape, mode = cache
    T = shape[1]
    if mode == "mean":
        # every token contributed 1/T of the mean, so each gets 1/T of the gradient
        return np.repeat(dy[:, None, :] / T, T, axis=1)
    dx = np.zeros(shape, dtype=dy.dtype)
    dx[:, 0] = dy  # only token 0 was read
    return dx


# ---------------------------------------------------------------------------------------------------------
# Softmax cross-entropy with label smoothing, as torch.nn.CrossEntropyLoss(label_smoothing=eps):
# target = (1 - eps) * onehot + eps / C, loss = mean over the batch of -sum(target * log_softmax(logits)).


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0
) -> tuple[float, np.ndarray]:
    """Return (mean loss, dloss/dlogits). Loss and gradient are fused: the gradient is just p - target."""
    B, C = logits.shape
    labels = np.asarray(labels)
    if labels.shape != (B,) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers of shape ({B},), got {labels.dtype} {labels.shape}")
    if B and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"labels must lie in [0, {C}), got range [{labels.min()}, {labels.max()}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    z = logits - logits.max(axis=1, keepdims=True)  # exp never overflows; softmax is shift-invariant
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full((B, C), label_smoothing / C, dtype=logits.dtype)
    target[np.arange(B), labels] += 1.0 - label_smoothing
    loss = -(target * logp).sum() / B
    # d/dlogits of -sum(target * log_softmax) is softmax - target (target sums to 1); 1/B for the mean.
    dlogits = (np.exp(logp) - target) / B
    return float(loss), dlogits
