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


def attention_forward_fast(qkv: np.ndarray, maps: np.ndarray, o_out: np.ndarray, heads: int,
                           inv_sums: np.ndarray) -> None:
    """attention_forward from the projections on: qkv (B, T, 3r) -> o = a @ v into ``o_out`` (B, T, r), the
    softmax's numerators e into ``maps`` (B, h, T, T) and the reciprocals of its row sums into ``inv_sums``
    (B, h, T), so that a = e * inv_sums[..., None]. Differs from the reference in layout and place, not in
    math:

    - no linears (the caller folds them into its GEMMs);
    - the maps are never normalised: o = (e @ v) / sum, and the backward scales its (T, hs) operands
      instead, so no pass over the maps divides them; the sums come from the same matmul, e @ [v, 1];
    - the shift that keeps exp from overflowing is not the row maximum (a pass of its own) but an upper bound
      of the row by Cauchy-Schwarz, c_i = |q_i| max_j |k_j| scale, folded into the scores' matmul as one
      more column, [q scale, -c] @ [k, 1]^T = s - c <= 0. A row whose bound lies so far above its maximum
      that its sum nears underflow is computed again with the exact maximum (_exact_rows);
    - batch chunks on the thread pool."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)
    floor = math.sqrt(np.finfo(maps.dtype).tiny)  # a row sum below this: its largest term is near denormal

    def work(rows: slice) -> None:
        q, k, v = (split_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        n, h, _, hs = q.shape
        qa, ka, va = (np.empty((n, h, T, hs + 1), qkv.dtype) for _ in range(3))
        np.multiply(q, scale, out=qa[..., :hs])
        ka[..., :hs], ka[..., hs], va[..., :hs], va[..., hs] = k, 1.0, v, 1.0
        k_norm = np.sqrt(np.einsum("nhtc,nhtc->nht", k, k).max(axis=-1))
        qa[..., hs] = -np.sqrt(np.einsum("nhtc,nhtc->nht", qa[..., :hs], qa[..., :hs])) * k_norm[..., None]
        e = np.matmul(qa, ka.swapaxes(-1, -2), out=maps[rows])
        np.exp(e, out=e)
        ev = e @ va  # [e @ v | the row sums]: the ones column sums the rows in the same matmul
        low = np.nonzero(ev[..., hs] < floor)
        if len(low[0]):
            ev[low] = _exact_rows(e, qa[..., :hs], k, va, low)
        inv = np.divide(1.0, ev[..., hs], out=inv_sums[rows])
        o = ev[..., :hs] * inv[..., None]
        o_out[rows] = o.transpose(0, 2, 1, 3).reshape(n, T, r)

    run_chunks(work, B, _chunk_rows(maps))


def _exact_rows(e: np.ndarray, q_scaled: np.ndarray, k: np.ndarray, va: np.ndarray, where: tuple) -> np.ndarray:
    """Rows ``where`` (index arrays over (n, h, T)) of e again, shifted by their exact maximum; their
    [e @ v | sum]."""
    img, head, row = where
    s = np.einsum("mc,mtc->mt", q_scaled[img, head, row], k[img, head])
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    e[img, head, row] = s
    return np.einsum("mt,mtc->mc", s, va[img, head])


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

def attention_backward_fast(do: np.ndarray, qkv: np.ndarray, maps: np.ndarray, o: np.ndarray, heads: int,
                            inv_sums: np.ndarray) -> np.ndarray:
    """attention_backward down to the projections: do (B, T, r) -> dqkv (B, T, 3r), given attention_forward_fast's
    qkv, maps (the numerators e), inv_sums and o. Differs from the reference in layout and place, not in math:

    - no linears;
    - softmax's row term sum_j da_j a_j is do . o per query (no pass over the maps), and it is folded into
      da's matmul as one more column: [do, -do . o] @ [v, 1]^T = da - do . o;
    - a = e / sum is never formed: ds = e (da - do . o) / sum, and the division by the row sum scales the
      (T, hs) operands and results of the three matmuls that read ds or a (dq, dk, dv);
    - da and ds share one per-thread buffer, and batch chunks run on the thread pool."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)
    dqkv = np.empty_like(qkv)

    def work(rows: slice) -> None:
        q, k, v = (split_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        e, inv = maps[rows], inv_sums[rows][..., None]
        do_h, o_h = split_heads(do[rows], heads), split_heads(o[rows], heads)
        n, h, _, hs = q.shape
        da, va = np.empty((n, h, T, hs + 1), qkv.dtype), np.empty((n, h, T, hs + 1), qkv.dtype)
        da[..., :hs], va[..., :hs], va[..., hs] = do_h, v, 1.0
        da[..., hs] = -np.einsum("nhtc,nhtc->nht", do_h, o_h)
        ds = np.matmul(da, va.swapaxes(-1, -2), out=scratch("ds", e.shape, e.dtype))  # da - do . o
        ds *= e  # ds * sum, the true ds once divided by the row sum
        grads = np.empty((3, n, h, T, hs), qkv.dtype)  # dq, dk, dv, merged into dqkv by one copy
        np.matmul(ds, k, out=grads[0])
        grads[0] *= inv * scale
        np.matmul(ds.swapaxes(-1, -2), q * (inv * scale), out=grads[1])
        np.matmul(e.swapaxes(-1, -2), do_h * inv, out=grads[2])
        dqkv[rows] = grads.transpose(1, 3, 0, 2, 4).reshape(n, T, 3 * r)

    run_chunks(work, B, _chunk_rows(maps))
    return dqkv
