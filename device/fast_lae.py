"""FastLAE: the LAE of lae.py computed without ever forming a (B, T, d) activation. Same math, same API.

Why it can: the features are frozen and everything a block adds to the residual stream has rank r. Before
block b of group j the state is

    z = F_j + O W + 1 c,    F_j = s (x_0 + ... + x_j)   frozen, no gradient ever needed
                            O = [o_0 1 | o_1 1 | ...]    the earlier blocks' attention outputs, each with a ones
                                                         column, (B, T, b (r + 1))
                            W = [W_o,0; b_o,0; W_o,1; ...] their output weights and biases stacked

so a LayerNorm of z needs only per-token scalars of F_j (mean, variance: computed once per batch), F_j as a
GEMM operand, and rank-r algebra. With Wc = W minus its row means (centring each added map), F~ = F - mean:

    var(z_t)  = var(F_t) + (2/d) O_t . (F~_t W^T) + (1/d) O_t (Wc Wc^T) O_t^T
    z_t - mean(z_t) = F~_t + O_t Wc
    LN(z) W_qkv = ((F W~ - mean ⊗ colsum(W~)) + O (Wc W~)) / sigma + beta W_qkv,   W~ = diag(gamma) W_qkv

The backward of a LayerNorm whose output is only read through a rank-3r projection (or a pooled vector) is,
per token, `P_t Abar^T - rho_t (F~_t + O_t Wc)`: a low-rank part and a per-token multiple of F~. So every
gradient needs F only through GEMMs: per group, one forward GEMM `F_j [W~ ... | W^T]` and one backward GEMM
`F_j^T [dqkv / sigma ... | rho-weighted O]`; mean pooling adds two batched GEMVs. The derivation, step by
step, is in docs/performance.md; tests/test_fast_lae.py checks every output and gradient against lae.py.

What stays elementwise is the attention maps (B, h, T, T): they run in batch chunks on the thread pool.
Activations kept for the backward: (B, T, r)-sized arrays plus one attention map per block.
"""

from __future__ import annotations

import math

import numpy as np

from .data import FrozenMaps, prepare_maps
from .lae import LAE, LAEConfig
from .parallel import run_chunks, scratch

EPS = 1e-5  # as layers.layernorm_forward and torch.nn.LayerNorm
_CHUNK_BYTES = 2 << 20  # attention maps per thread chunk: small enough for cache, big enough to amortise calls


class FastLAE(LAE):
    """Drop-in for LAE (same constructor, forward, backward, params, cfg, dtype), the low-rank way.

    ``forward`` takes the FrozenMaps of a data.Batch (prepared once per batch, in the read-ahead), or raw
    features, which it prepares itself. The frozen features get no gradient: ``backward(..., input_grad=True)``
    is lae.LAE's job.
    """

    kind = "lae"  # its model kind (device/adaptor.py)
    reads = "maps"

    def __init__(self, cfg: LAEConfig, params: dict[str, np.ndarray]):
        if getattr(cfg, "pos_embed", False):
            raise ValueError("FastLAE does not cover pos_embed (a full-rank table); use adaptor.build or LAE")
        super().__init__(cfg, params)  # validates the config and every parameter's shape and dtype
        self._buffers: dict[str, np.ndarray] = {}

    # ---- buffers reused between batches: fresh large arrays cost page faults every time ----

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A reused buffer of ``shape``; a smaller request (an epoch's last batch) is a view of the larger one,
        so it costs no second allocation next to the first."""
        buf = self._buffers.get(name)
        size = math.prod(shape)
        if buf is None or buf.size < size:
            self._buffers.pop(name, None)  # free the old one before its replacement is allocated
            buf = self._buffers[name] = np.empty(size, self.dtype)
        return buf[:size].reshape(shape)

    def release_buffers(self) -> None:
        """Drop the reused buffers (and the last forward's cache), e.g. before a long pause."""
        self._buffers.clear()
        self._cache = None

    # ---- forward ----

    def _stacked_out(self) -> np.ndarray:
        """W: every block's [out.weight; out.bias], (num_blocks * (r + 1), d)."""
        p, nb = self.params, self.cfg.num_blocks
        if nb == 0:
            return np.zeros((0, self.cfg.dim), self.dtype)
        return np.concatenate([np.vstack([p[f"blocks.{b}.out.weight"], p[f"blocks.{b}.out.bias"][None]])
                               for b in range(nb)])

    def _group_limit(self, j: int) -> int:
        """How many earlier blocks' outputs LayerNorms in group j read: those before the group's last block,
        or all of them in the last group, whose state also feeds the final LayerNorm."""
        cfg = self.cfg
        if j == cfg.groups - 1:
            return cfg.num_blocks
        return max(0, (j + 1) * cfg.blocks_per_group - 1)

    def forward(self, x: np.ndarray | FrozenMaps, keep_cache: bool = True) -> np.ndarray:
        """x (B, k, T, d) or a FrozenMaps -> logits (B, C). keep_cache=False (evaluation) keeps nothing and
        reuses one set of buffers for every block and batch."""
        self._cache = None  # the previous step's activations go now, not after this forward
        fm = x if isinstance(x, FrozenMaps) else self._prepare(x, keep_cache)
        cfg, p = self.cfg, self.params
        k, B, T, d = fm.maps.shape
        r, bpg = cfg.rank, cfg.blocks_per_group
        ra, NR = r + 1, cfg.num_blocks * (r + 1)
        W = self._stacked_out()
        Wc = W - W.mean(axis=1, keepdims=True)
        WcWcT = Wc @ Wc.T
        W_rowsum = W.sum(axis=1)
        tag = "train" if keep_cache else "eval"
        O = self._buffer(f"{tag}.O", (B, T, NR))
        O[..., r::ra] = 1.0  # the ones column that carries each block's out.bias
        blocks, groups = [], []
        for j in range(k):
            F = fm.maps[j].reshape(B * T, d)
            mu, var = fm.mean[j], fm.var[j]
            first, limit = j * bpg, self._group_limit(j)
            A = [p[f"blocks.{b}.norm.weight"][:, None] * p[f"blocks.{b}.qkv.weight"] for b in range(first, first + bpg)]
            # The group's one pass over F_j: its blocks' LN-folded qkv weights and the earlier blocks' W^T.
            Y = (F @ np.concatenate(A + [W[:limit * ra].T], axis=1)).reshape(B, T, -1)
            G = Y[..., bpg * 3 * r:] - mu[..., None] * W_rowsum[:limit * ra]  # F~_j W^T, (B, T, limit (r+1))
            groups.append((mu, G))
            for i, b in enumerate(range(first, first + bpg)):
                pre, R = f"blocks.{b}.", b * ra
                Ob = O[..., :R]
                var_z = var + (2.0 / d) * _rowdot(Ob, G[..., :R]) + (1.0 / d) * _rowdot(Ob @ WcWcT[:R, :R], Ob)
                sigma = np.sqrt(var_z + EPS)
                # qkv = LN(z) W_qkv + b_qkv, built in place in the GEMM's output (no new (B, T, 3r) arrays)
                qkv = Y[..., i * 3 * r:(i + 1) * 3 * r]
                qkv -= mu[..., None] * A[i].sum(axis=0)
                if R:
                    qkv += Ob @ (Wc[:R] @ A[i])
                qkv /= sigma[..., None]  # = LN(z) without its bias, times W~ (q-hat in the module docstring)
                qkv_bias = p[pre + "norm.bias"] @ p[pre + "qkv.weight"] + p[pre + "qkv.bias"]
                qkv += qkv_bias
                maps = self._buffer(f"{tag}.attn.{b if keep_cache else 0}", (B, cfg.heads, T, T))
                _attention_forward(qkv, maps, O[..., R:R + r], cfg.heads)
                blocks.append((sigma, qkv, qkv_bias, maps, A[i]))
        # final LayerNorm, pooled: only the tokens the pool reads (all for mean, token 0 for cls)
        sel = slice(0, 1) if cfg.pool == "cls" else slice(None)
        F, mu, var = fm.maps[k - 1][:, sel], fm.mean[k - 1][:, sel], fm.var[k - 1][:, sel]
        G, Of = groups[-1][1][:, sel], O[:, sel]
        sigma = np.sqrt(var + (2.0 / d) * _rowdot(Of, G) + (1.0 / d) * _rowdot(Of @ WcWcT, Of) + EPS)
        weight = 1.0 / F.shape[1]  # each selected token's share of the pooled vector
        a = weight / sigma  # (B, T'): the pooled LN output is sum_t a_t (F~_t + O_t Wc)
        aO = np.matmul(a[:, None, :], Of)[:, 0]
        pooled_hat = np.matmul(a[:, None, :], F)[:, 0] - (a * mu).sum(axis=1, keepdims=True) + aO @ Wc
        pooled = pooled_hat * p["norm.weight"] + p["norm.bias"]
        logits = pooled @ p["head.weight"] + p["head.bias"]
        if keep_cache:
            self._cache = (fm, O, W, Wc, blocks, groups, (sel, sigma, a, aO, pooled_hat, pooled))
        return logits

    def _prepare(self, x: np.ndarray, keep_cache: bool) -> FrozenMaps:
        """Raw features (B, k, T, d) -> FrozenMaps in reused buffers (a trainer hands in prepared maps instead)."""
        cfg, x = self.cfg, np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (cfg.groups, cfg.tokens, cfg.dim):
            want = ("B", cfg.groups, cfg.tokens, cfg.dim)
            raise ValueError(f"features must have shape {want}, got {x.shape}")
        B, k, T, d = x.shape
        tag = "train" if keep_cache else "eval"
        out = FrozenMaps(self._buffer(f"{tag}.maps", (k, B, T, d)), self._buffer(f"{tag}.mean", (k, B, T)),
                         self._buffer(f"{tag}.var", (k, B, T)))
        return prepare_maps(x, cfg.input_scale, self.dtype, out)

    # ---- backward: the reverse of forward, final LayerNorm first, then groups and blocks in reverse ----

    def backward(self, dlogits: np.ndarray, input_grad: bool = False) -> dict[str, np.ndarray]:
        """Gradients of every parameter (same keys as params) given dloss/dlogits. The cache is released as
        it is read: a second backward needs a new forward."""
        if input_grad:
            raise ValueError("FastLAE never forms the gradient of the frozen features; use lae.LAE for that")
        if self._cache is None:
            raise RuntimeError("backward needs a forward(x, keep_cache=True) first")
        fm, O, W, Wc, blocks, groups, final = self._cache
        self._cache = None
        cfg, p = self.cfg, self.params
        k, B, T, d = fm.maps.shape
        r, bpg, nb = cfg.rank, cfg.blocks_per_group, cfg.num_blocks
        ra, NR = r + 1, nb * (r + 1)
        sel, sigma_f, a, aO, pooled_hat, pooled = final
        g: dict[str, np.ndarray] = {}
        # head and final LN parameters
        g["head.weight"] = pooled.T @ dlogits
        g["head.bias"] = dlogits.sum(axis=0)
        dpooled = dlogits @ p["head.weight"].T
        g["norm.weight"] = (dpooled * pooled_hat).sum(axis=0)
        g["norm.bias"] = dpooled.sum(axis=0)
        # Final LN input gradient: D_t = a_t gt - rho_t (F~_t + O_t Wc), gt the centred upstream gradient.
        gt = dpooled * p["norm.weight"]
        gt -= gt.mean(axis=1, keepdims=True)
        F_f, Of, G_f = fm.maps[k - 1][:, sel], O[:, sel], groups[-1][1][:, sel]
        gt_dot_zhat = (np.matmul(F_f, gt[:, :, None])[..., 0] + np.matmul(Of, (gt @ Wc.T)[:, :, None])[..., 0])
        rho = a * gt_dot_zhat / (d * sigma_f * sigma_f)
        # dO = dstate W^T accumulates every later LayerNorm's share; dW likewise (F parts come per group).
        dO = np.zeros((B, T, NR), self.dtype)
        dW = np.zeros((NR, d), self.dtype)
        if NR:
            dO[:, sel] += a[..., None] * (gt @ W.T)[:, None, :] - rho[..., None] * (G_f + Of @ (Wc @ W.T))
            rhoO = (rho[..., None] * Of).reshape(-1, NR)
            dW += aO.T @ gt - (Of.reshape(-1, NR).T @ rhoO) @ Wc
        rho_run = np.zeros((B, T), self.dtype)  # sum of rho over this group's LayerNorms seen so far
        rho_run[:, sel] = rho
        for j in reversed(range(k)):
            mu, G = groups[j]
            first, limit = j * bpg, self._group_limit(j)
            if j < k - 1:
                rho_run[...] = 0.0
            coef, Q_of, OQ_of = {}, {}, {}
            for b in reversed(range(first, first + bpg)):
                pre, R = f"blocks.{b}.", b * ra
                sigma, qkv, qkv_bias, maps, A = blocks[b]
                coef[b] = rho_run.copy()  # block b's output is read by this group's LayerNorms after it
                dqkv = _attention_backward(dO[..., R:R + r], qkv, maps, O[..., R:R + r], cfg.heads)
                blocks[b] = None  # its attention map is no longer needed (the buffer is reused next step)
                g[pre + "qkv.bias"] = dqkv.sum(axis=(0, 1))
                if b:  # q-hat = qkv - qkv_bias
                    rho_b = (_rowdot(dqkv, qkv) - dqkv @ qkv_bias) / (d * sigma * sigma)
                Q = dqkv
                Q /= sigma[..., None]  # in place: dqkv itself is not needed again
                Q_of[b] = Q
                Ob = O[..., :R]
                OQ_of[b] = Ob.reshape(-1, R).T @ Q.reshape(-1, 3 * r) if R else None
                if b == 0:
                    continue  # block 0 reads the frozen features only: its input gradient goes nowhere
                Abar = A - A.mean(axis=0)
                dO[..., :R] += Q @ (Abar.T @ W[:R].T) - rho_b[..., None] * (G[..., :R] + Ob @ (Wc[:R] @ W[:R].T))
                rhoO = (rho_b[..., None] * Ob).reshape(-1, R)
                dW[:R] += OQ_of[b] @ Abar.T - (Ob.reshape(-1, R).T @ rhoO) @ Wc[:R]
                rho_run += rho_b
            # The group's one backward pass over F_j: its blocks' Q and the rho-weighted earlier outputs.
            columns = [Q_of[b] for b in range(first, first + bpg)]
            columns += [(coef[b] if b >= first else rho_run)[..., None] * O[..., b * ra:(b + 1) * ra]
                        for b in range(limit)]
            if not columns:
                continue
            M = np.concatenate(columns, axis=-1).reshape(B * T, -1)
            FtM = fm.maps[j].reshape(B * T, d).T @ M - (mu.reshape(-1) @ M)[None, :]  # F~_j^T M
            for i, b in enumerate(range(first, first + bpg)):
                pre, R = f"blocks.{b}.", b * ra
                Z = FtM[:, i * 3 * r:(i + 1) * 3 * r]  # sum_t LN-normalised z_t^T dqkv_t
                if R:
                    Z = Z + Wc[:R].T @ OQ_of[b]
                Wq, gamma, beta, dbq = (p[pre + "qkv.weight"], p[pre + "norm.weight"], p[pre + "norm.bias"],
                                        g[pre + "qkv.bias"])
                g[pre + "qkv.weight"] = gamma[:, None] * Z + np.outer(beta, dbq)
                g[pre + "norm.weight"] = (Z * Wq).sum(axis=1)
                g[pre + "norm.bias"] = Wq @ dbq
            dW[:limit * ra] -= FtM[:, bpg * 3 * r:].T
        for b in range(nb):
            g[f"blocks.{b}.out.weight"] = dW[b * ra:b * ra + r].copy()
            g[f"blocks.{b}.out.bias"] = dW[b * ra + r].copy()
        return {name: g[name] for name in self.params}


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token dot product over the last axis: (..., n), (..., n) -> (...)."""
    return (a * b).sum(axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Attention on (B, T, 3r) projections, in batch chunks on the thread pool. Same math as attention.py (whose
# derivation is docs/attention-backward.md) without its two linears, which the model folds into its GEMMs.


def _heads(t: np.ndarray, heads: int) -> np.ndarray:
    """(B, T, r) view -> (B, h, T, hs) view."""
    B, T, r = t.shape
    return t.reshape(B, T, heads, r // heads).transpose(0, 2, 1, 3)


def _chunk_rows(maps: np.ndarray) -> int:
    per_image = maps[0].nbytes if len(maps) else 1
    return max(1, _CHUNK_BYTES // max(per_image, 1))


def _attention_forward(qkv: np.ndarray, maps: np.ndarray, o_out: np.ndarray, heads: int) -> None:
    """qkv (B, T, 3r) -> attention maps into ``maps`` (B, h, T, T), o = maps @ v into ``o_out`` (B, T, r)."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)

    def work(rows: slice) -> None:
        q, k, v = (_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        s = np.matmul(q * scale, k.swapaxes(-1, -2), out=maps[rows])
        s -= s.max(axis=-1, keepdims=True)  # exp never overflows; softmax is shift-invariant
        np.exp(s, out=s)
        s *= 1.0 / s.sum(axis=-1, keepdims=True)
        o = s @ v
        o_out[rows] = o.transpose(0, 2, 1, 3).reshape(o.shape[0], T, r)

    run_chunks(work, B, _chunk_rows(maps))


def _attention_backward(do: np.ndarray, qkv: np.ndarray, maps: np.ndarray, o: np.ndarray, heads: int) -> np.ndarray:
    """Gradient of the (B, T, 3r) projections given do (B, T, r); da and ds live in one per-thread buffer."""
    B, T, r3 = qkv.shape
    r = r3 // 3
    scale = 1.0 / math.sqrt(r // heads)
    dqkv = np.empty_like(qkv)

    def work(rows: slice) -> None:
        q, k, v = (_heads(qkv[rows, :, i * r:(i + 1) * r], heads) for i in range(3))
        a, do_h, o_h = maps[rows], _heads(do[rows], heads), _heads(o[rows], heads)
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
