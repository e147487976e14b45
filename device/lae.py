"""LAE, the low-rank attention edge network that MIST trains on the device.

Input: k summed feature maps per image, x of shape (B, k, T, d), one map per Gather* group.

    state = pos_embed (a learned (T, d) table, zero at init; only with pos_embed=True) or 0
    for group j in 0..k-1:
        state = state + x[:, j]                                  # group j's map joins the running state
        for each of its blocks_per_group blocks:
            state = state + attention(layernorm(state))           # low-rank attention, residual, no MLP
    logits = head(pool(layernorm(state)))                         # final LN, mean/cls pool, linear to C

Every block's up-projection `out.weight` starts at zero, so the untrained LAE is exactly a linear probe on
the LayerNorm of the summed maps, and training can only move away from that baseline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .attention import attention_backward, attention_forward
from .layers import (
    POOL_MODES,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    pool_backward,
    pool_forward,
)


@dataclass
class LAEConfig:
    dim: int  # d, feature width
    tokens: int  # T, tokens per map (prefix tokens included)
    groups: int  # k, number of Gather* maps per image
    num_classes: int  # C
    rank: int = 32  # r, width of the attention space
    heads: int = 4  # r is split into heads of r / heads channels
    blocks_per_group: int = 1  # 0 gives a plain linear probe on LN(sum of maps)
    pool: str = "mean"  # or "cls": token 0, only meaningful when the features carry a class token
    input_scale: float = 1.0  # features are multiplied by this before use
    init_std: float = 0.02  # std of the normal init of qkv.weight and head.weight
    # A learned position embedding added to the first map: attention alone is blind to where a token sits
    # (a location task needs it), and the backbone's own position signal may have faded by the tapped layers.
    pos_embed: bool = False

    def validate(self) -> None:
        for name in ("dim", "tokens", "groups", "num_classes", "rank", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LAEConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.blocks_per_group, int) or self.blocks_per_group < 0:
            bpg = self.blocks_per_group
            raise ValueError(f"LAEConfig.blocks_per_group must be an integer >= 0, got {bpg!r}")
        if self.rank > self.dim:
            raise ValueError(f"LAEConfig.rank ({self.rank}) must not exceed dim ({self.dim}): it is low-rank")
        if self.rank % self.heads:
            raise ValueError(f"LAEConfig.heads ({self.heads}) must divide rank ({self.rank})")
        if self.pool not in POOL_MODES:
            raise ValueError(f"LAEConfig.pool must be one of {POOL_MODES}, got {self.pool!r}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"LAEConfig.input_scale must be finite and > 0, got {self.input_scale!r}")
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"LAEConfig.init_std must be finite and >= 0, got {self.init_std!r}")

    @property
    def num_blocks(self) -> int:
        return self.groups * self.blocks_per_group

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LAEConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LAEConfig keys: {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


def param_shapes(cfg: LAEConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in the canonical order (blocks in order, then norm, then head).

    Linear weights are stored (in, out), the transpose of torch.nn.Linear's layout.
    """
    d, r, C = cfg.dim, cfg.rank, cfg.num_classes
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.pos_embed:
        shapes["pos_embed"] = (cfg.tokens, d)
    for b in range(cfg.num_blocks):
        shapes[f"blocks.{b}.norm.weight"] = (d,)
        shapes[f"blocks.{b}.norm.bias"] = (d,)
        shapes[f"blocks.{b}.qkv.weight"] = (d, 3 * r)
        shapes[f"blocks.{b}.qkv.bias"] = (3 * r,)
        shapes[f"blocks.{b}.out.weight"] = (r, d)
        shapes[f"blocks.{b}.out.bias"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    shapes["head.weight"] = (d, C)
    shapes["head.bias"] = (C,)
    return shapes


def init_params(cfg: LAEConfig, seed: int, dtype: np.dtype | type = np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters. Random draws come from np.random.default_rng(seed) in the insertion order of
    param_shapes (block 0's qkv.weight, block 1's qkv.weight, ..., head.weight), in float64, then cast,
    so float32 and float64 models from one seed hold the same weights up to rounding.
    """
    cfg.validate()
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            p = np.ones(shape)
        elif name.endswith("qkv.weight") or name == "head.weight":
            p = rng.standard_normal(shape) * cfg.init_std
        else:  # biases, out.weight and pos_embed: zero so the untrained adaptor adds nothing to the state
            p = np.zeros(shape)
        params[name] = p.astype(dtype)
    return params


def count_params(params: dict[str, np.ndarray]) -> int:
    return sum(int(p.size) for p in params.values())


def flops_per_image(cfg: LAEConfig, backward: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) for one image; elementwise work (LN, softmax) is not counted.

    Each matmul's backward is two matmuls of the same size (one per operand), so forward + backward is 3x
    the forward. No matmul is skipped in the backward: only the first LayerNorm's input gradient is.
    """
    T, d, r, C = cfg.tokens, cfg.dim, cfg.rank, cfg.num_classes
    per_block = 2 * T * d * 3 * r  # qkv projection
    per_block += 2 * T * T * r  # scores q @ k^T, summed over heads
    per_block += 2 * T * T * r  # a @ v
    per_block += 2 * T * r * d  # output projection
    forward = cfg.num_blocks * per_block + 2 * d * C  # + head
    return 3 * forward if backward else forward


def check_params(cfg: LAEConfig, params: dict[str, np.ndarray]) -> np.dtype:
    """Check that cfg is valid and params holds exactly its parameters, with its shapes, in one floating
    dtype; return that dtype (the model computes in it). LAE and fast_lae.FastLAE both start with this."""
    cfg.validate()
    shapes = param_shapes(cfg)
    if set(params) != set(shapes):
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)).kind != "f":
        raise ValueError(f"params must share one floating dtype, got {sorted(map(str, dtypes))}")
    for name, shape in shapes.items():
        if params[name].shape != shape:
            raise ValueError(f"param {name} has shape {params[name].shape}, expected {shape}")
    return next(iter(dtypes))


class LAE:
    """The model: holds the config and a params dict (shared, not copied, so an optimizer that updates the
    arrays in place is seen by the next forward), and the caches of the last forward."""

    kind = "lae"  # its model kind (device/adaptor.py)
    reads = "features"  # the (B, k, T, d) maps of a data.Batch

    def __init__(self, cfg: LAEConfig, params: dict[str, np.ndarray]):
        self.dtype = check_params(cfg, params)
        self.cfg = cfg
        self.params = params
        self._cache: tuple | None = None  # forward_tokens: the blocks' and the final norm's
        self._head_cache: tuple | None = None  # forward: the pooling's and the head's

    def forward(self, x: np.ndarray, keep_cache: bool = True) -> np.ndarray:
        """x (B, k, T, d), any float dtype -> logits (B, C) in the params' dtype.
        keep_cache=False (evaluation) lets each block's activations be freed as soon as it is done."""
        h = self.forward_tokens(x, keep_cache)
        pooled, pool_cache = pool_forward(h, self.cfg.pool)
        logits, head_cache = linear_forward(pooled, self.params["head.weight"], self.params["head.bias"])
        self._head_cache = (pool_cache, head_cache) if keep_cache else None
        return logits

    def forward_tokens(self, x: np.ndarray, keep_cache: bool = True) -> np.ndarray:
        """x (B, k, T, d) -> the output tokens after the final LayerNorm, (B, T, d): what the head reads (the
        pooled classifier here, a per-token classifier in device/dense.py)."""
        cfg, p = self.cfg, self.params
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (cfg.groups, cfg.tokens, cfg.dim):
            want = ("B", cfg.groups, cfg.tokens, cfg.dim)
            raise ValueError(f"features must have shape {want}, got {x.shape}")
        x = x.astype(self.dtype, copy=False)  # e.g. fp16 features on disk -> fp32 compute
        if cfg.input_scale != 1.0:
            x = x * cfg.input_scale
        block_caches = []
        state = None
        b = 0
        for j in range(cfg.groups):
            if state is None:
                state = x[:, 0] + p["pos_embed"] if cfg.pos_embed else x[:, 0]
            else:
                state = state + x[:, j]
            for _ in range(cfg.blocks_per_group):
                pre = f"blocks.{b}."
                h, ln_cache = layernorm_forward(state, p[pre + "norm.weight"], p[pre + "norm.bias"])
                a, attn_cache = attention_forward(
                    h, p[pre + "qkv.weight"], p[pre + "qkv.bias"], p[pre + "out.weight"], p[pre + "out.bias"],
                    cfg.heads,
                )
                state = state + a
                if keep_cache:
                    block_caches.append((ln_cache, attn_cache))
                b += 1
        h, ln_cache = layernorm_forward(state, p["norm.weight"], p["norm.bias"])
        self._cache = (block_caches, ln_cache) if keep_cache else None
        return h

    def backward(self, dlogits: np.ndarray, input_grad: bool = False) -> dict[str, np.ndarray]:
        """Gradients of every parameter (same keys as params) given dloss/dlogits; the reverse of forward.

        The features are frozen, so training never forms their gradient. ``input_grad=True`` adds it as
        ``grads["input"]`` (B, k, T, d), for the numerical gradient check of the whole model.
        """
        if self._cache is None or self._head_cache is None:
            raise RuntimeError("backward needs a forward(x, keep_cache=True) first")
        pool_cache, head_cache = self._head_cache
        dpooled, dhead_weight, dhead_bias = linear_backward(dlogits, head_cache)
        g = self.backward_tokens(pool_backward(dpooled, pool_cache), input_grad)
        g["head.weight"], g["head.bias"] = dhead_weight, dhead_bias
        grads = {name: g[name] for name in self.params}  # canonical order
        if input_grad:
            grads["input"] = g["input"]
        return grads

    def backward_tokens(self, dh: np.ndarray, input_grad: bool = False) -> dict[str, np.ndarray]:
        """Gradients of the blocks, the final norm and the position embedding given dloss/d(output tokens)
        (B, T, d), the reverse of ``forward_tokens``; the head's own gradients are its caller's."""
        if self._cache is None:
            raise RuntimeError("backward needs a forward(x, keep_cache=True) first")
        block_caches, ln_cache = self._cache
        g: dict[str, np.ndarray] = {}
        dstate, g["norm.weight"], g["norm.bias"] = layernorm_backward(dh, ln_cache)
        cfg = self.cfg
        dx = np.zeros((dstate.shape[0], cfg.groups, cfg.tokens, cfg.dim), self.dtype) if input_grad else None
        if dx is not None and cfg.blocks_per_group == 0:
            dx[:] = dstate[:, None]  # every map was added straight into the final state
        for b in reversed(range(len(block_caches))):
            pre = f"blocks.{b}."
            blk_ln_cache, attn_cache = block_caches[b]
            # state = state + attention(layernorm(state)): dstate flows on unchanged through the residual,
            # and the attention branch adds its own share.
            dh, g[pre + "qkv.weight"], g[pre + "qkv.bias"], g[pre + "out.weight"], g[pre + "out.bias"] = (
                attention_backward(dstate, attn_cache)
            )
            # Block 0's input is x[:, 0], frozen features with no parameters upstream: skip its dx (unless
            # the position embedding, added there, needs it).
            need_dx = b > 0 or dx is not None or cfg.pos_embed
            dstate_ln, g[pre + "norm.weight"], g[pre + "norm.bias"] = layernorm_backward(
                dh, blk_ln_cache, need_dx=need_dx
            )
            if need_dx:
                dstate = dstate + dstate_ln
            # Group j's map was added into the state just before its first block, so its gradient is the
            # state's gradient at that point (only formed on request: the features are frozen).
            if dx is not None and b % cfg.blocks_per_group == 0:
                dx[:, b // cfg.blocks_per_group] = dstate
        if cfg.pos_embed:  # added to every image's first state: its gradient is that state's, summed
            g["pos_embed"] = dstate.sum(axis=0)
        if dx is not None:
            g["input"] = dx * cfg.input_scale
        return g
