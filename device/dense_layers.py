"""The layers of a dense (per-pixel) head, as paired forward/backward functions, like device/layers.py.

    tokens (B, T, d) ──drop prefix tokens, lay out on the grid──► (B, gh, gw, d)
                     ──per-token linear (layers.linear_forward)─► token logits (B, gh, gw, C)
                     ──bilinear upsampling─────────────────────► pixel logits (B, H, W, C)
                     ──pixel cross-entropy, 255 ignored─────────► loss

Bilinear upsampling follows torch's ``F.interpolate(mode="bilinear", align_corners=False)``: output pixel y
samples the input at s = (y + 0.5) * gh / H - 0.5 (clamped at 0), blending rows floor(s) and floor(s) + 1
(clamped at the last) by the fraction of s. It is linear in its input and separable, so it is two small
matrices, ``U_rows`` (H, gh) and ``U_cols`` (W, gw): out = U_rows · L · U_colsᵀ per class, and the backward
is the transpose, dL = U_rowsᵀ · dout · U_cols. ``upsample_reference`` computes the same sum pixel by pixel
from its four neighbours (the textbook formula), and the tests hold the fast path to it.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255  # the label-map value that names no class (formats/SPEC.md §14)


# ---------------------------------------------------------------------------------------------------------
# Tokens onto their grid: (B, T, d) -> (B, gh, gw, d), the prefix (class, register) tokens dropped.


def grid_forward(tokens: np.ndarray, prefix: int, grid: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    B, T, d = tokens.shape
    return tokens[:, prefix:].reshape(B, grid[0], grid[1], d), (T, prefix)


def grid_backward(dgrid: np.ndarray, cache: tuple) -> np.ndarray:
    T, prefix = cache
    B, gh, gw, d = dgrid.shape
    dtokens = np.zeros((B, T, d), dgrid.dtype)  # the prefix tokens reach no pixel: their gradient is 0
    dtokens[:, prefix:] = dgrid.reshape(B, gh * gw, d)
    return dtokens


# ---------------------------------------------------------------------------------------------------------
# Bilinear upsampling (B, gh, gw, C) -> (B, H, W, C)


def interpolation_matrix(out_size: int, in_size: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """U (out_size, in_size): row y holds the two weights output position y gives its input neighbours."""
    s = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
    lo = np.minimum(np.floor(s).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = s - lo
    u = np.zeros((out_size, in_size))
    np.add.at(u, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(u, (np.arange(out_size), hi), frac)  # at the last row lo == hi: the weights add back to 1
    return u.astype(dtype)


def upsample_forward(x: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """x (B, gh, gw, C) -> (B, H, W, C): two matmuls, rows then columns."""
    B, gh, gw, C = x.shape
    H, W = size
    u_rows, u_cols = interpolation_matrix(H, gh, x.dtype), interpolation_matrix(W, gw, x.dtype)
    rows = (u_rows @ x.reshape(B, gh, gw * C)).reshape(B * H, gw, C)  # blend rows: (B, H, gw, C)
    out = (u_cols @ rows).reshape(B, H, W, C)  # then columns, each of the B*H rows at once
    return out, (u_rows, u_cols, x.shape)


def upsample_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    """The transpose of the forward: dx = U_rowsᵀ · dout · U_cols, columns first (the forward's last step)."""
    u_rows, u_cols, (B, gh, gw, C) = cache
    H, W = u_rows.shape[0], u_cols.shape[0]
    drows = (u_cols.T @ dout.reshape(B * H, W, C)).reshape(B, H, gw * C)
    return (u_rows.T @ drows).reshape(B, gh, gw, C)


def upsample_reference(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The same upsampling, pixel by pixel from its four neighbours: the readable definition."""
    B, gh, gw, C = x.shape
    H, W = size
    out = np.empty((B, H, W, C), x.dtype)
    for y in range(H):
        sy = max((y + 0.5) * gh / H - 0.5, 0.0)
        y0 = min(int(sy), gh - 1)
        y1, fy = min(y0 + 1, gh - 1), sy - y0
        for x_ in range(W):
            sx = max((x_ + 0.5) * gw / W - 0.5, 0.0)
            x0 = min(int(sx), gw - 1)
            x1, fx = min(x0 + 1, gw - 1), sx - x0
            out[:, y, x_] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                             + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


# ---------------------------------------------------------------------------------------------------------
# Pixel cross-entropy: the mean over labelled pixels of -log softmax(logits)[label]; 255 pixels are skipped.


def pixel_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """logits (B, H, W, C), labels (B, H, W) uint8 -> (mean loss over labelled pixels, dloss/dlogits).

    Like softmax_cross_entropy in device/layers.py, the gradient is softmax - onehot, here divided by the
    number of labelled pixels N (the mean is over them) and zero at ignored pixels. No labelled pixel at all
    gives loss 0 and a zero gradient.
    """
    B, H, W, C = logits.shape
    labels = np.asarray(labels)
    if labels.shape != (B, H, W):
        raise ValueError(f"label maps must have shape {(B, H, W)}, got {labels.shape}")
    valid = labels != IGNORE_INDEX
    if (labels[valid] >= C).any():
        raise ValueError(f"labels must lie in [0, {C}) or be {IGNORE_INDEX}")
    count = int(valid.sum())
    z = logits - logits.max(axis=-1, keepdims=True)  # exp never overflows; softmax is shift-invariant
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    target = np.where(valid, labels, 0).astype(np.int64)
    picked = np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    loss = -float(picked[valid].sum()) / max(count, 1)
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, target[..., None], np.take_along_axis(dlogits, target[..., None], -1) - 1.0, -1)
    dlogits *= (valid / max(count, 1))[..., None].astype(logits.dtype)
    return loss, dlogits
