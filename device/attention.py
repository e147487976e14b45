"""Low-rank multi-head self-attention, forward and backward. The derivation is in docs/attention-backward.md.

Shapes: B images, T tokens, d feature width, r rank (r << d), h heads of hs = r / h channels each.

    qkv = x @ W_qkv + b_qkv                 (B,T,d) -> (B,T,3r)   down-projection into the rank-r space
    q, k, v = split(qkv), each into h heads  (B,h,T,hs)
    s = q @ k^T * scale,  scale = 1/sqrt(hs) (B,h,T,T)
    a = softmax(s) over the last axis        (B,h,T,T)
    o = a @ v, heads merged back             (B,T,r)
    out = o @ W_o + b_o                      (B,T,d)              up-projection back to width d

The residual add and the LayerNorm before it belong to the model (lae.py), not to this layer.
"""

from __future__ import annotations

import math

import numpy as np

from .layers import linear_backward, linear_forward


def split_heads(t: np.ndarray, heads: int) -> np.ndarray:
    """(B,T,r) -> (B,h,T,hs): head j owns channels [j*hs, (j+1)*hs) of the rank-r space."""
    B, T, r = t.shape
    return t.reshape(B, T, heads, r // heads).transpose(0, 2, 1, 3)


def merge_heads(t: np.ndarray) -> np.ndarray:
    """(B,h,T,hs) -> (B,T,r), the inverse of split_heads."""
    B, h, T, hs = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, T, h * hs)


def attention_forward(
    x: np.ndarray,
    w_qkv: np.ndarray,
    b_qkv: np.ndarray,
    w_o: np.ndarray,
    b_o: np.ndarray,
    heads: int,
) -> tuple[np.ndarray, tuple]:
    r = w_o.shape[0]
    scale = 1.0 / math.sqrt(r // heads)  # a Python float, so float32 inputs stay float32
    qkv, qkv_cache = linear_forward(x, w_qkv, b_qkv)
    q = split_heads(qkv[..., :r], heads)
    k = split_heads(qkv[..., r : 2 * r], heads)
    v = split_heads(qkv[..., 2 * r :], heads)
    s = (q @ k.swapaxes(-1, -2)) * scale
    # softmax over keys; subtracting the row max keeps exp from overflowing and changes nothing else
    a = np.exp(s - s.max(axis=-1, keepdims=True))
    a /= a.sum(axis=-1, keepdims=True)
    o = merge_heads(a @ v)
    out, out_cache = linear_forward(o, w_o, b_o)
    # s is not kept: the softmax backward needs only its output a.
    return out, (qkv_cache, out_cache, q, k, v, a, scale, heads)


def attention_backward(
    dout: np.ndarray, cache: tuple, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (dx, dw_qkv, db_qkv, dw_o, db_o); the forward's steps are undone in reverse order."""
    qkv_cache, out_cache, q, k, v, a, scale, heads = cache
    # out = o @ W_o + b_o
    do, dw_o, db_o = linear_backward(dout, out_cache)
    do = split_heads(do, heads)  # merging heads was a pure reshuffle, so its backward is the reverse one
    # o = a @ v
    da = do @ v.swapaxes(-1, -2)
    dv = a.swapaxes(-1, -2) @ do
    # a = softmax(s): per row, ds_i = a_i * (da_i - sum_j da_j a_j)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True))
    # s = q @ k^T * scale
    dq = (ds @ k) * scale
    dk = (ds.swapaxes(-1, -2) @ q) * scale
    # q, k, v were three slices of qkv, so their gradients sit side by side in dqkv
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
    dx, dw_qkv, db_qkv = linear_backward(dqkv, qkv_cache, need_dx=need_dx)
    return dx, dw_qkv, db_qkv, dw_o, db_o
