"""Dense models for segmentation sets: the dense LAE and the dense probe, and their checkpoints.

    dense LAE    x (B, k, T, d) ─► LAE blocks ─► final LN ─► tokens (B, T, d) ─► per-token linear ─►
                 bilinear upsampling ─► pixel logits (B, H, W, C)
    dense probe  x (B, k, T, d) ─► the k maps side by side per token (B, T, k*d), standardised with the
                 training set's per-channel mean and spread ─► per-token linear ─► bilinear upsampling

The dense LAE is the LAE of device/lae.py with its pooled head replaced: the same blocks, the same final
LayerNorm (``LAE.forward_tokens``), then the layers of device/dense_layers.py. Its up-projections start at
zero, so the untrained dense LAE is a per-token linear classifier on LN(sum of maps), and training moves it
away from there. The dense probe has no attention: each token is classified from its own shipped values, the
baseline the adaptor must beat on the same bytes. Both train by AdamW steps (device/dense_train.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FormatError, Manifest

from .dense_layers import grid_backward, grid_forward, upsample_backward, upsample_forward
from .lae import LAE, LAEConfig, init_params
from .layers import linear_backward, linear_forward

DENSE_LAE, DENSE_PROBE = "dense-lae", "dense-probe"
DENSE_KINDS = (DENSE_LAE, DENSE_PROBE)
FROZEN = ("input.mean", "input.scale")  # the dense probe's standardisation: measured once, never trained


@dataclass
class DenseConfig:
    """The sizes both dense kinds share, read from the set's manifest, plus the LAE's own settings."""

    dim: int
    tokens: int
    groups: int
    num_classes: int
    prefix: int
    grid: list[int]  # (gh, gw) spatial tokens
    label_size: list[int]  # (H, W) of the label maps the pixel logits match
    rank: int = 32
    heads: int = 4
    blocks_per_group: int = 1
    pos_embed: bool = False
    init_std: float = 0.02

    def lae_config(self) -> LAEConfig:
        cfg = LAEConfig(dim=self.dim, tokens=self.tokens, groups=self.groups, num_classes=self.num_classes,
                        rank=self.rank, heads=self.heads, blocks_per_group=self.blocks_per_group,
                        init_std=self.init_std, pos_embed=self.pos_embed)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown dense config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def for_set(cls, manifest: Manifest, **settings: Any) -> DenseConfig:
        if manifest.label_size is None or manifest.grid is None:
            raise ValueError("a dense model needs a segmentation set (label maps over a token grid)")
        return cls(dim=manifest.dim, tokens=manifest.tokens, groups=manifest.k, num_classes=len(manifest.classes),
                   prefix=manifest.prefix_tokens, grid=list(manifest.grid), label_size=list(manifest.label_size),
                   **settings)


class DenseLAE:
    """The LAE's output tokens, classified one by one and upsampled to the label maps."""

    kind = DENSE_LAE

    def __init__(self, cfg: DenseConfig, params: dict[str, np.ndarray]):
        self.cfg, self.params = cfg, params
        self.lae = LAE(cfg.lae_config(), params)  # shares the arrays: an optimizer step is seen by both
        self.dtype = self.lae.dtype
        self._cache: tuple | None = None

    def forward(self, x: np.ndarray, keep_cache: bool = True) -> np.ndarray:
        """x (B, k, T, d) -> pixel logits (B, H, W, C)."""
        cfg, p = self.cfg, self.params
        h = self.lae.forward_tokens(x, keep_cache)
        on_grid, grid_cache = grid_forward(h, cfg.prefix, tuple(cfg.grid))
        token_logits, head_cache = linear_forward(on_grid, p["head.weight"], p["head.bias"])
        logits, up_cache = upsample_forward(token_logits, tuple(cfg.label_size))
        self._cache = (grid_cache, head_cache, up_cache) if keep_cache else None
        return logits

    def backward(self, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        if self._cache is None:
            raise RuntimeError("backward needs a forward(x, keep_cache=True) first")
        grid_cache, head_cache, up_cache = self._cache
        dtoken_logits = upsample_backward(dlogits, up_cache)
        don_grid, dweight, dbias = linear_backward(dtoken_logits, head_cache)
        g = self.lae.backward_tokens(grid_backward(don_grid, grid_cache))
        g["head.weight"], g["head.bias"] = dweight, dbias
        return {name: g[name] for name in self.params}


class DenseProbe:
    """Each token's k shipped values side by side, standardised, classified by one linear map."""

    kind = DENSE_PROBE

    def __init__(self, cfg: DenseConfig, params: dict[str, np.ndarray]):
        width = cfg.groups * cfg.dim
        want = {"input.mean": (width,), "input.scale": (width,), "head.weight": (width, cfg.num_classes),
                "head.bias": (cfg.num_classes,)}
        if {n: p.shape for n, p in params.items()} != want:
            raise ValueError(f"dense probe params must be {want}")
        self.cfg, self.params = cfg, params
        self.dtype = params["head.weight"].dtype
        self._cache: tuple | None = None

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """(B, k, T, d) -> (B, T, k*d), each channel centred and scaled by the training set's statistics."""
        B, k, T, d = x.shape
        side_by_side = np.asarray(x, self.dtype).transpose(0, 2, 1, 3).reshape(B, T, k * d)
        return (side_by_side - self.params["input.mean"]) * self.params["input.scale"]

    def forward(self, x: np.ndarray, keep_cache: bool = True) -> np.ndarray:
        cfg, p = self.cfg, self.params
        on_grid, _ = grid_forward(self.standardise(x), cfg.prefix, tuple(cfg.grid))
        token_logits, head_cache = linear_forward(on_grid, p["head.weight"], p["head.bias"])
        logits, up_cache = upsample_forward(token_logits, tuple(cfg.label_size))
        self._cache = (head_cache, up_cache) if keep_cache else None
        return logits

    def backward(self, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        if self._cache is None:
            raise RuntimeError("backward needs a forward(x, keep_cache=True) first")
        head_cache, up_cache = self._cache
        _, dweight, dbias = linear_backward(upsample_backward(dlogits, up_cache), head_cache, need_dx=False)
        return {"head.weight": dweight, "head.bias": dbias}  # the standardisation is frozen


def init_dense(kind: str, cfg: DenseConfig, seed: int, train_x: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fresh float32 parameters; the dense probe measures its standardisation on ``train_x`` (n, k, T, d)."""
    if kind == DENSE_LAE:
        return init_params(cfg.lae_config(), seed)
    width = cfg.groups * cfg.dim
    rng = np.random.default_rng(seed)
    if train_x is None:
        mean, scale = np.zeros(width), np.ones(width)
    else:
        n, k, T, d = train_x.shape
        channels = train_x.transpose(0, 2, 1, 3).reshape(n * T, k * d).astype(np.float64)
        mean, scale = channels.mean(axis=0), 1.0 / (channels.std(axis=0) + 1e-6)
    return {"input.mean": mean.astype(np.float32), "input.scale": scale.astype(np.float32),
            "head.weight": (rng.standard_normal((width, cfg.num_classes)) * cfg.init_std).astype(np.float32),
            "head.bias": np.zeros(cfg.num_classes, np.float32)}


def build(kind: str, cfg: DenseConfig, params: dict[str, np.ndarray]) -> DenseLAE | DenseProbe:
    return (DenseLAE if kind == DENSE_LAE else DenseProbe)(cfg, params)


def trainable(model: DenseLAE | DenseProbe) -> dict[str, np.ndarray]:
    return {name: p for name, p in model.params.items() if name not in FROZEN}


def from_checkpoint(ckpt: Checkpoint, path: str) -> DenseLAE | DenseProbe:
    """The dense model a checkpoint holds, once its config and weights agree (one line naming the file)."""
    if ckpt.kind not in DENSE_KINDS:
        raise FormatError(f"{path}: a {ckpt.kind!r} checkpoint; a segmentation set needs a dense model "
                          f"({', '.join(DENSE_KINDS)})")
    try:
        cfg = DenseConfig.from_dict(ckpt.config)
        params = {name: np.asarray(p, np.float32) for name, p in ckpt.params.items()}
        return build(ckpt.kind, cfg, params)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: checkpoint config and weights do not agree ({e})") from None


def describe(model: DenseLAE | DenseProbe) -> str:
    cfg = model.cfg
    if model.kind == DENSE_PROBE:
        return f"dense probe on {cfg.groups * cfg.dim} values a token"
    return (f"dense LAE rank {cfg.rank}, {cfg.heads} heads, {cfg.blocks_per_group} block(s) a group"
            + (", position embedding" if cfg.pos_embed else ""))


def parameter_count(model: DenseLAE | DenseProbe) -> int:
    return sum(int(p.size) for p in trainable(model).values())
