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

_CHUNK_BYTES = 1 << 20  # attention maps per thread chunk: e and ds together fit a 2 MB L2, big enough to amortise calls


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


def _chunk_rows(T: int, heads: int, dtype: np.dtype) -> int:
    """Images per thread chunk of the fast kernels: about _CHUNK_BYTES of attention maps."""
    return max(1, _CHUNK_BYTES // (heads * T * T * np.dtype(dtype).itemsize))


def _augmented(q: np.ndarray, k: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """[q scale, 0] and [k, 1], (n, h, T, hs + 1): the caller puts -shift in qa's last column, and then
    qa @ ka^T = s - shift, the shifted scores, in one matmul with no pass of its own."""
    n, h, T, hs = q.shape
    qa, ka = np.empty((n, h, T, hs + 1), q.dtype), np.empty((n, h, T, hs + 1), q.dtype)
    np.multiply(q, scale, out=qa[..., :hs])
    ka[..., :hs], ka[..., hs] = k, 1.0
    return qa, ka


def _numerators(qa: np.ndarray, ka: np.ndarray, chunk: int) -> np.ndarray:
    """e = exp(qa @ ka^T), the softmax numerators of a chunk, in a per-thread buffer that stays in cache."""
    n, h, T, _ = qa.shape
    e = scratch("e", (chunk, h, T, T), qa.dtype)[:n]
    np.matmul(qa, ka.swapaxes(-1, -2), out=e)
    return np.exp(e, out=e)


def attention_forward_fast(qkv: np.ndarray, o_out: np.ndarray, heads: int, shifts: np.ndarray,
                           inv_sums: np.ndarray) -> None:
    """attention_forward from the projections on: qkv (B, T, 3r) -> o = a @ v into ``o_out`` (B, T, r), with
    what the backward needs to rebuild the maps: each row's shift into ``shifts`` and the reciprocal of its
    softmax sum into ``inv_sums`` (B, h, T), a = exp(s - shift) * inv_sum. Differs from the reference in layout
    and place, not in math:

    - no linears (the caller folds them into its GEMMs);
    - the maps (B, h, T, T) are never stored: each chunk's live in a per-thread buffer, in cache, and the
      backward computes them again from q, k and the shifts (one matmul and one exp per chunk): a ViT-B
      batch of 32 then holds 20 MB less, and neither pass streams the maps through memory;
    - the maps are never normalised: o = (e @ v) / sum, the backward scales its (T, hs) operands instead, and
      the sums come from the same matmul, e @ [v, 1];
    - the shift that keeps exp from overflowing is not the row maximum (a pass of its own) but an upper bound
      of the row by Cauchy-Schwarz, c_i = |q_i| max_j |k_j| scale, folded into the scores' matmul as one
      more column, [q scale, -c] @ [k, 1]^T = s - c <= 0. A row whose bound lies so far above its maximum
      that its sum nears underflow is computed again with the exact maximum as its shift (_exact_rows);
    - batch chunks on the thread pool."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)
    floor = math.sqrt(np.finfo(qkv.dtype).tiny)  # a row sum below this: its largest term is near denormal
    chunk = _chunk_rows(T, heads, qkv.dtype)

    def work(rows: slice) -> None:
        q, k, v = (split_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        n, h, _, hs = q.shape
        qa, ka = _augmented(q, k, scale)
        k_norm = np.sqrt(np.einsum("nhtc,nhtc->nht", k, k).max(axis=-1))
        qa[..., hs] = -np.sqrt(np.einsum("nhtc,nhtc->nht", qa[..., :hs], qa[..., :hs])) * k_norm[..., None]
        e = _numerators(qa, ka, chunk)
        va = np.empty((n, h, T, hs + 1), qkv.dtype)
        va[..., :hs], va[..., hs] = v, 1.0
        ev = e @ va  # [e @ v | the row sums]: the ones column sums the rows in the same matmul
        low = np.nonzero(ev[..., hs] < floor)
        if len(low[0]):
            ev[low], qa[..., hs][low] = _exact_rows(qa[..., :hs], k, va, low)
        shifts[rows] = -qa[..., hs]
        inv = np.divide(1.0, ev[..., hs], out=inv_sums[rows])
        o = ev[..., :hs] * inv[..., None]
        o_out[rows] = o.transpose(0, 2, 1, 3).reshape(n, T, r)

    run_chunks(work, B, chunk)


def _exact_rows(q_scaled: np.ndarray, k: np.ndarray, va: np.ndarray, where: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``where`` (index arrays over (n, h, T)) shifted by their exact maximum: their [e @ v | sum] and
    the negated shift, for qa's last column."""
    img, head, row = where
    s = np.einsum("mc,mtc->mt", q_scaled[img, head, row], k[img, head])
    top = s.max(axis=-1)
    e = np.exp(s - top[:, None])
    return np.einsum("mt,mtc->mc", e, va[img, head]), -top


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

def attention_backward_fast(do: np.ndarray, qkv: np.ndarray, o: np.ndarray, heads: int, shifts: np.ndarray,
                            inv_sums: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """attention_backward down to the projections: do (B, T, r) -> dqkv (B, T, 3r), into ``out`` when given (a
    view into the caller's GEMM operand), given attention_forward_fast's qkv, o, shifts and inv_sums. Differs
    from the reference in layout and place, not in math:

    - no linears;
    - the maps are computed again per chunk, e = exp([q scale, -shift] @ [k, 1]^T), the forward's numerators;
    - softmax's row term sum_j da_j a_j is do . o per query (no pass over the maps), and it is folded into
      da's matmul as one more column: [do, -do . o] @ [v, 1]^T = da - do . o;
    - a = e / sum is never formed: ds = e (da - do . o) / sum, and the division by the row sum scales the
      (T, hs) operands and results of the three matmuls that read ds or a (dq, dk, dv);
    - da and ds share one per-thread buffer, and batch chunks run on the thread pool."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)
    chunk = _chunk_rows(T, heads, qkv.dtype)
    dqkv = np.empty_like(qkv) if out is None else out

    def work(rows: slice) -> None:
        q, k, v = (split_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        n, h, _, hs = q.shape
        qa, ka = _augmented(q, k, scale)
        qa[..., hs] = -shifts[rows]
        e = _numerators(qa, ka, chunk)
        inv = inv_sums[rows][..., None]
        do_h, o_h = split_heads(do[rows], heads), split_heads(o[rows], heads)
        da, va = np.empty((n, h, T, hs + 1), qkv.dtype), np.empty((n, h, T, hs + 1), qkv.dtype)
        da[..., :hs], va[..., :hs], va[..., hs] = do_h, v, 1.0
        da[..., hs] = -np.einsum("nhtc,nhtc->nht", do_h, o_h)
        ds = np.matmul(da, va.swapaxes(-1, -2), out=scratch("ds", (chunk, h, T, T), e.dtype)[:n])  # da - do . o
        ds *= e  # ds * sum, the true ds once divided by the row sum
        grads = np.empty((3, n, h, T, hs), qkv.dtype)  # dq, dk, dv, merged into dqkv by one copy
        np.matmul(ds, k, out=grads[0])
        grads[0] *= inv * scale
        np.matmul(ds.swapaxes(-1, -2), q * (inv * scale), out=grads[1])
        np.matmul(e.swapaxes(-1, -2), do_h * inv, out=grads[2])
        dqkv[rows] = grads.transpose(1, 3, 0, 2, 4).reshape(n, T, 3 * r)

    run_chunks(work, B, chunk)
    return dqkv
