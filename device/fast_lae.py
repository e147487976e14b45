"""FastLAE: the LAE of lae.py computed without ever forming a (B, T, d) activation. Same math, same API.

Why it can: the features are frozen and everything a block adds to the residual stream has rank r + 1. Before
each block the state is z = F + O W (equation (1) of docs/performance.md): F the frozen map of the block's
group, O the earlier blocks' attention outputs each with a ones column, W their stacked output weights and
biases. A LayerNorm of z then needs only F's per-token mean and variance (computed once per batch), F as a
GEMM operand, and rank-r algebra; its backward is a low-rank part minus a per-token multiple rho of the
centred state. docs/performance.md derives every step in this file's names, numbered (1) to (21) ((20) and
(21) fold in the learned position table, pos_embed), and each phase of ``forward`` and ``backward`` cites its
equation. tests/test_fast_lae.py checks every output and gradient against lae.py.

Once prepared, F is read only by GEMMs: per group one forward GEMM (7) and one backward GEMM (17), and with
mean pooling two batched GEMVs (8), (11). The attention maps (B, h, T, T) stay elementwise: attention.py's
fast kernels run them in batch chunks on the thread pool, in cache, and never store them. Activations kept
for the backward: (B, T, r)-sized arrays and two (B, h, T) arrays per block (each softmax row's shift and sum).

The maps F_j and their statistics come from the data step (data.py: FrozenMaps, prepare_maps), prepared
once per batch for every model that reads them; adaptor.build gives this model for every LAE config.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import attention_backward_fast, attention_forward_fast
from .data import FrozenMaps, prepare_maps
from .lae import LAEConfig, check_params

EPS = 1e-5  # as layers.layernorm_forward and torch.nn.LayerNorm


class FastLAE:
    """Drop-in for LAE (same constructor, forward, backward, params, cfg, dtype), the low-rank way. Not a
    subclass: it shares only the parameter checks (lae.check_params) and the math, checked in tests.

    ``forward`` takes the FrozenMaps of a data.Batch (prepared once per batch, in the read-ahead), or raw
    features, which it prepares itself. The frozen features get no gradient: ``backward(..., input_grad=True)``
    is lae.LAE's job.
    """

    kind = "lae"  # its model kind (device/adaptor.py)
    reads = "maps"

    def __init__(self, cfg: LAEConfig, params: dict[str, np.ndarray]):
        self.dtype = check_params(cfg, params)
        self.cfg = cfg
        self.params = params  # shared, not copied: the optimizer's in-place updates reach the next forward
        self._cache: tuple | None = None  # the last training forward's activations, for backward
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

    # ---- forward ----

    def _stacked_out(self) -> np.ndarray:
        """W of (1): every block's [out.weight; out.bias], (num_blocks * (r + 1), d)."""
        p, nb = self.params, self.cfg.num_blocks
        if nb == 0:
            return np.zeros((0, self.cfg.dim), self.dtype)
        return np.concatenate([np.vstack([p[f"blocks.{b}.out.weight"], p[f"blocks.{b}.out.bias"][None]])
                               for b in range(nb)])

    def _blocks_read(self, j: int) -> int:
        """n_read of (7): how many blocks' outputs the LayerNorms in group j read: those before the group's last
        block, or all of them in the last group, whose state also feeds the final LayerNorm."""
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
        ra, NR = r + 1, cfg.num_blocks * (r + 1)  # each block adds r + 1 columns to O: [o_b 1]
        # (1), (2), (3), (4): W, Wc and the products of them every LayerNorm's statistics use
        W = self._stacked_out()
        Wc = W - W.mean(axis=1, keepdims=True)
        WcWcT = Wc @ Wc.T
        pos = p["pos_embed"] if cfg.pos_embed else None  # (20): F' = F + pos in every state
        tag = "train" if keep_cache else "eval"
        O = self._buffer(f"{tag}.O", (B, T, NR))  # (1): [o_0 1 | o_1 1 | ...], filled block by block
        O[..., r::ra] = 1.0  # the ones column that carries each block's out.bias
        blocks, groups = [], []
        for j in range(k):
            F = fm.maps[j].reshape(B * T, d)
            mu, var = fm.mean[j], fm.var[j]
            if pos is not None:  # (20): F' = F + pos has these statistics
                mu, var = _stats_with_pos(fm.maps[j], mu, var, pos)
            first, n_read = j * bpg, self._blocks_read(j)
            # (5): A = diag(gamma) W_qkv, the block LayerNorm's scale folded into the projection
            A = [p[f"blocks.{b}.norm.weight"][:, None] * p[f"blocks.{b}.qkv.weight"] for b in range(first, first + bpg)]
            # (7): the group's one forward GEMM over F, Y = F [Abar_first .. Abar_last | Wc^T] = Fc [A .. | W^T]:
            # operands with centred columns centre F's rows for free
            M = np.concatenate([a - a.mean(axis=0) for a in A] + [Wc[:n_read * ra].T], axis=1)
            Y = (F @ M).reshape(B, T, -1)
            if pos is not None:
                Y += pos @ M  # (20): F' M = F M + pos M, the same (T, cols) rows for every image
            G = Y[..., bpg * 3 * r:]  # (3): G = Fc W^T
            groups.append((mu, var, G))
            for i, b in enumerate(range(first, first + bpg)):
                pre, R = f"blocks.{b}.", b * ra
                O_in = O[..., :R]  # (1): the earlier blocks' outputs, all that block b's LayerNorm adds to F
                # (4): the LayerNorm's variance from F's, G and rank-R algebra
                var_z = var + (2.0 / d) * _rowdot(O_in, G[..., :R]) + (1.0 / d) * _rowdot(O_in @ WcWcT[:R, :R], O_in) \
                    if R else var  # a group's first block (R = 0) reads F alone
                sigma = np.sqrt(var_z + EPS)
                # (6): qkv_hat = (Fc A + O (Wc A)) / sigma, built in place in the GEMM's output
                # (no new (B, T, 3r) arrays)
                qkv = Y[..., i * 3 * r:(i + 1) * 3 * r]
                if R:
                    qkv += O_in @ (Wc[:R] @ A[i])
                qkv /= sigma[..., None]
                # (5): qkv = qkv_hat + qkv_bias, qkv_bias = beta W_qkv + b_qkv
                qkv_bias = p[pre + "norm.bias"] @ p[pre + "qkv.weight"] + p[pre + "qkv.bias"]
                qkv += qkv_bias
                rows = self._buffer(f"{tag}.softmax.{b if keep_cache else 0}", (2, B, cfg.heads, T))
                attention_forward_fast(qkv, O[..., R:R + r], cfg.heads, rows[0], rows[1])  # o_b joins O
                blocks.append((sigma, qkv, qkv_bias, rows, A[i]))
        # (8): the final LayerNorm, pooled: only the tokens the pool reads (all for mean, token 0 for cls)
        sel = slice(0, 1) if cfg.pool == "cls" else slice(None)
        F, (mu, var, G_f), O_f = fm.maps[k - 1][:, sel], (g[:, sel] for g in groups[-1]), O[:, sel]
        sigma = np.sqrt(var + (2.0 / d) * _rowdot(O_f, G_f) + (1.0 / d) * _rowdot(O_f @ WcWcT, O_f) + EPS)  # (4)
        w = 1.0 / F.shape[1]  # each selected token's share of the pooled vector
        a = w / sigma
        aO = np.matmul(a[:, None, :], O_f)[:, 0]
        pooled_hat = np.matmul(a[:, None, :], F)[:, 0] - (a * mu).sum(axis=1, keepdims=True) + aO @ Wc
        if pos is not None:
            pooled_hat += a @ pos[sel]  # (20)
        # (9): the final LayerNorm's scale and bias, then the head
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

    # ---- backward: equations (10) to (19), the reverse of forward: the final LayerNorm first, then the
    # groups and their blocks in reverse ----

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
        # (10): the head and the final LayerNorm's parameters
        g["head.weight"] = pooled.T @ dlogits
        g["head.bias"] = dlogits.sum(axis=0)
        dpooled = dlogits @ p["head.weight"].T
        g["norm.weight"] = (dpooled * pooled_hat).sum(axis=0)
        g["norm.bias"] = dpooled.sum(axis=0)
        # (11): the final LayerNorm's input gradient, D_t = a_t gc - rho_t zc_t
        gc = dpooled * p["norm.weight"]
        gc -= gc.mean(axis=1, keepdims=True)
        F_f, O_f, G_f = fm.maps[k - 1][:, sel], O[:, sel], groups[-1][2][:, sel]
        gc_dot_zc = (np.matmul(F_f, gc[:, :, None])[..., 0] + np.matmul(O_f, (gc @ Wc.T)[:, :, None])[..., 0])
        pos = p["pos_embed"] if cfg.pos_embed else None
        if pos is not None:
            gc_dot_zc += gc @ pos[sel].T  # (20): gc . F'_t
        rho = a * gc_dot_zc / (d * sigma_f * sigma_f)
        if pos is not None:  # (21): the pos_embed gradient, the batch sum of every LayerNorm's D
            dpos = np.zeros((T, d), self.dtype)
            dpos[sel] += a.T @ gc  # the final LayerNorm's low-rank part, a_t gc
            rhoO_sum = np.zeros((T, NR), self.dtype)  # sum over images of rho O, every LayerNorm
            rhoO_sum[sel] += (rho[..., None] * O_f).sum(axis=0)
        # (13): dO = sum of D W^T and dW = sum of O^T D over every LayerNorm; dW's F part comes per group (17)
        dO = np.zeros((B, T, NR), self.dtype)
        dW = np.zeros((NR, d), self.dtype)
        if NR:  # (14), (15) for the final LayerNorm
            dO[:, sel] += a[..., None] * (gc @ W.T)[:, None, :] - rho[..., None] * (G_f + O_f @ (Wc @ W.T))
            rhoO = (rho[..., None] * O_f).reshape(-1, NR)
            dW += aO.T @ gc - (O_f.reshape(-1, NR).T @ rhoO) @ Wc
        rho_sum = np.zeros((B, T), self.dtype)  # (16): rho summed over this group's LayerNorms seen so far
        rho_sum[:, sel] = rho
        for j in reversed(range(k)):
            mu, _, G = groups[j]
            first, n_read = j * bpg, self._blocks_read(j)
            if j < k - 1:
                rho_sum[...] = 0.0
            rho_after, OtP_of = {}, {}
            # (17)'s operand, cols = [P_first .. P_last | rho_after O], filled in place: each block's dqkv
            # (P once divided by sigma) is written straight into its columns
            cols = np.empty((B, T, bpg * 3 * r + n_read * ra), self.dtype)
            for b in reversed(range(first, first + bpg)):
                pre, R = f"blocks.{b}.", b * ra
                sigma, qkv, qkv_bias, softmax_rows, A = blocks[b]
                rho_after[b] = rho_sum.copy()  # (16): the rho of this group's LayerNorms after b, which read o_b
                dqkv = cols[..., (b - first) * 3 * r:(b - first + 1) * 3 * r]
                attention_backward_fast(dO[..., R:R + r], qkv, O[..., R:R + r], cfg.heads, *softmax_rows, out=dqkv)
                blocks[b] = None
                g[pre + "qkv.bias"] = dqkv.sum(axis=(0, 1))  # (18)
                if b or pos is not None:  # (12): rho_b = dqkv . qkv_hat / (d sigma^2), qkv_hat = qkv - qkv_bias
                    rho_b = (_rowdot(dqkv, qkv) - dqkv @ qkv_bias) / (d * sigma * sigma)
                P = dqkv
                P /= sigma[..., None]  # (12): P = dqkv / sigma, in place: dqkv itself is not needed again
                O_in = O[..., :R]
                OtP_of[b] = O_in.reshape(-1, R).T @ P.reshape(-1, 3 * r) if R else None  # O^T P of (15), (18)
                if b == 0 and pos is None:
                    continue  # block 0 reads the frozen features only: its input gradient goes nowhere
                # (12): D_t = P_t Abar^T - rho_b zc_t; then (14), (15) for block b's LayerNorm
                Abar = A - A.mean(axis=0)
                rhoO = rho_b[..., None] * O_in
                if pos is not None:  # (21): this LayerNorm's low-rank part and its rho O, summed over images
                    dpos += P.sum(axis=0) @ Abar.T
                    rhoO_sum[:, :R] += rhoO.sum(axis=0)
                rho_sum += rho_b
                if R:  # block 0 (R = 0) reaches here only for pos_embed: its LayerNorm reads no O
                    dO[..., :R] += P @ (Abar.T @ W[:R].T) - rho_b[..., None] * (G[..., :R] + O_in @ (Wc[:R] @ W[:R].T))
                    dW[:R] += OtP_of[b] @ Abar.T - (O_in.reshape(-1, R).T @ rhoO.reshape(-1, R)) @ Wc[:R]
            if pos is not None and (bpg or j == k - 1):  # (21): -sum rho (F' - mu') of the group's LayerNorms
                dpos -= np.einsum("bt,btd->td", rho_sum, fm.maps[j]) + rho_sum.sum(axis=0)[:, None] * pos
                dpos += (rho_sum * mu).sum(axis=0)[:, None]
            # (17): the group's one backward GEMM over F, Fc^T cols, cols = [P_first .. P_last | rho_after O]
            for b in range(n_read):
                at = bpg * 3 * r + b * ra
                np.multiply((rho_after[b] if b >= first else rho_sum)[..., None], O[..., b * ra:(b + 1) * ra],
                            out=cols[..., at:at + ra])
            if not cols.shape[-1]:
                continue
            cols = cols.reshape(B * T, -1)
            FcT_cols = fm.maps[j].reshape(B * T, d).T @ cols - (mu.reshape(-1) @ cols)[None, :]
            if pos is not None:  # (20): F'^T cols = F^T cols + pos^T (cols summed over images)
                FcT_cols += pos.T @ cols.reshape(B, T, -1).sum(axis=0)
            for i, b in enumerate(range(first, first + bpg)):
                pre, R = f"blocks.{b}.", b * ra
                # (18): zhat_dqkv = sum_t zhat_t^T dqkv_t = Fc^T P + Wc^T (O^T P), then the block's parameters
                zhat_dqkv = FcT_cols[:, i * 3 * r:(i + 1) * 3 * r]
                if R:
                    zhat_dqkv = zhat_dqkv + Wc[:R].T @ OtP_of[b]
                W_qkv, gamma, beta, db_qkv = (p[pre + "qkv.weight"], p[pre + "norm.weight"], p[pre + "norm.bias"],
                                              g[pre + "qkv.bias"])
                g[pre + "qkv.weight"] = gamma[:, None] * zhat_dqkv + np.outer(beta, db_qkv)
                g[pre + "norm.weight"] = (zhat_dqkv * W_qkv).sum(axis=1)
                g[pre + "norm.bias"] = W_qkv @ db_qkv
            dW[:n_read * ra] -= FcT_cols[:, bpg * 3 * r:].T  # (15): its F part, summed over the group's LayerNorms
        for b in range(nb):  # (19): each block's rows of dW
            g[f"blocks.{b}.out.weight"] = dW[b * ra:b * ra + r].copy()
            g[f"blocks.{b}.out.bias"] = dW[b * ra + r].copy()
        if pos is not None:
            g["pos_embed"] = dpos - rhoO_sum @ Wc  # (21): the O Wc part of every zc
        return {name: g[name] for name in self.params}


def _stats_with_pos(maps: np.ndarray, mu: np.ndarray, var: np.ndarray,
                    pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(20): per-token mean and variance of F' = F + pos from F's (B, T): the mean adds pos's, the variance
    adds pos's and twice the covariance, (Fc . posc) / d = (F . posc) / d since posc sums to zero."""
    posc = pos - pos.mean(axis=1, keepdims=True)
    cov = np.einsum("btd,td->bt", maps, posc) / pos.shape[1]
    return mu + pos.mean(axis=1), var + pos.var(axis=1) + 2.0 * cov


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token dot product over the last axis: (..., n), (..., n) -> (...)."""
    return (a * b).sum(axis=-1)
