"""Low-rank multi-head self-attention, forward and backward. The derivation is in docs/attention-backward.md.

Shapes: B images, T tokens, d feature width, r rank (r << d), h heads of hs = r / h channels each.

    qkv = x @ W_qkv + b_qkv                 (B,T,d) -> (B,T,3r)   down-projection into the rank-r space
    q, k, v = split(qkv), each into h heads  (B,h,T,hs)
    s = q @ k^T * scale,  scale = 1/sqrt(hs) (B,h,T,T)
    a = softmax(s) over the last axis        (B,h,T,T)
    o = a @ v, heads merged back             (B,T,r)
    out = o @ W_o + b_o                      (B,T,d)              up-projection back to width d

The residual add and the LayerNorm before it belong to the model (lae.py), not to this layer.

Each reference function (what lae.LAE runs, derived in docs/attention-backward.md) is followed by its fast
version (what fast_lae.FastLAE runs): the same attention without the two linears, which FastLAE folds into
its GEMMs over the frozen maps, written in place into the caller's buffers and run in batch chunks on the
thread pool of parallel.py. tests/test_fast_lae.py holds the two to 1e-10 in float64.
"""

from __future__ import annotations

import math

import numpy as np

from .layers import linear_backward, linear_forward
from .parallel import run_chunks, scratch

_CHUNK_BYTES = 2 << 20  # attention maps per thread chunk: small enough for cache, big enough to amortise calls


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


def _chunk_rows(maps: np.ndarray) -> int:
    """Images per thread chunk of the fast kernels: about _CHUNK_BYTES of attention maps."""
    per_image = maps[0].nbytes if len(maps) else 1
    return max(1, _CHUNK_BYTES // max(per_image, 1))


def attention_forward_fast(qkv: np.ndarray, maps: np.ndarray, o_out: np.ndarray, heads: int) -> None:
    """attention_forward from the projections on: qkv (B, T, 3r) -> attention maps into ``maps`` (B, h, T, T),
    o = a @ v into ``o_out`` (B, T, r). Differs from the reference in layout and place, not in math: no linears
    (the caller folds them into its GEMMs), the scale folded into q, softmax in place in the caller's maps
    buffer, and batch chunks on the thread pool."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)

    def work(rows: slice) -> None:
        q, k, v = (split_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        s = np.matmul(q * scale, k.swapaxes(-1, -2), out=maps[rows])
        s -= s.max(axis=-1, keepdims=True)  # exp never overflows; softmax is shift-invariant
        np.exp(s, out=s)
        s *= 1.0 / s.sum(axis=-1, keepdims=True)
        o = s @ v
        o_out[rows] = o.transpose(0, 2, 1, 3).reshape(o.shape[0], T, r)

    run_chunks(work, B, _chunk_rows(maps))


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

def attention_backward_fast(do: np.ndarray, qkv: np.ndarray, maps: np.ndarray, o: np.ndarray,
                            heads: int) -> np.ndarray:
    """attention_backward down to the projections: do (B, T, r) -> dqkv (B, T, 3r), given attention_forward_fast's
    qkv, maps and o. Differs from the reference in layout and place, not in math: no linears, softmax's row sum
    sum_j da_j a_j taken as do . o per query (no pass over the maps), da and ds in one per-thread buffer, and
    batch chunks on the thread pool."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)
    dqkv = np.empty_like(qkv)

    def work(rows: slice) -> None:
        q, k, v = (split_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        a, do_h, o_h = maps[rows], split_heads(do[rows], heads), split_heads(o[rows], heads)
        ds = np.matmul(do_h, v.swapaxes(-1, -2), out=scratch("ds", a.shape, a.dtype))  # da first
        dv = a.swapaxes(-1, -2) @ do_h
        # softmax backward: ds = a (da - sum_j da_j a_j), and sum_j da_j a_j = do . o per query and head
        ds -= (do_h * o_h).sum(axis=-1, keepdims=True)
        ds *= a
        dq = (ds @ k) * scale
        dk = ds.swapaxes(-1, -2) @ (q * scale)
        n = a.shape[0]
        for i, grad in enumerate((dq, dk, dv)):
            dqkv[rows, :, i * r:(i + 1) * r] = grad.transpose(0, 2, 1, 3).reshape(n, T, r)

    run_chunks(work, B, _chunk_rows(maps))
    return dqkv
