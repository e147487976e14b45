"""The LAE written in PyTorch: the reference the NumPy model is checked against, and the twin a benchmark can
train side by side with it. Self-contained: it imports only torch and takes the LAEConfig as a plain dict
(LAEConfig.to_dict()), so it does not depend on mist.

Parameter names are those of mist.device.lae (its state_dict keys are exactly the NumPy params keys). The only
layout difference: nn.Linear stores weight as (out, in), the NumPy model as (in, out); load_numpy_params and
grads_to_numpy transpose those.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class TorchLAEBlock(nn.Module):
    def __init__(self, dim: int, rank: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, 3 * rank)
        self.out = nn.Linear(rank, dim)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        B, T, _ = state.shape
        q, k, v = self.qkv(self.norm(state)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B,h,T,hs)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, T, -1)
        return state + self.out(o)


class TorchLAE(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.groups = cfg["groups"]
        self.blocks_per_group = cfg.get("blocks_per_group", 1)
        self.pool = cfg.get("pool", "mean")
        self.input_scale = cfg.get("input_scale", 1.0)
        dim, rank, heads = cfg["dim"], cfg.get("rank", 32), cfg.get("heads", 4)
        self.blocks = nn.ModuleList(
            TorchLAEBlock(dim, rank, heads) for _ in range(self.groups * self.blocks_per_group)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, k, T, d) -> logits (B, C)."""
        x = x.to(self.head.weight.dtype) * self.input_scale
        state = torch.zeros_like(x[:, 0])
        blocks = iter(self.blocks)
        for j in range(self.groups):
            state = state + x[:, j]
            for _ in range(self.blocks_per_group):
                state = next(blocks)(state)
        h = self.norm(state)
        pooled = h.mean(dim=1) if self.pool == "mean" else h[:, 0]
        return self.head(pooled)


def _is_linear_weight(name: str) -> bool:
    return name.endswith(("qkv.weight", "out.weight")) or name == "head.weight"


def _to_numpy(name: str, t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.T if _is_linear_weight(name) else t).numpy().copy()


def load_numpy_params(model: nn.Module, params: dict[str, np.ndarray]) -> None:
    """Copy a NumPy params dict into the model, in the model's dtype, transposing linear weights."""
    state = {}
    for n, p in params.items():
        state[n] = torch.from_numpy(np.ascontiguousarray(p.T if _is_linear_weight(n) else p))
    model.load_state_dict(state, strict=True)  # copies into the existing tensors, casting to their dtype


def params_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters, in the NumPy layout (e.g. to give a NumPy LAE the twin's weights)."""
    return {n: _to_numpy(n, p) for n, p in model.named_parameters()}


def grads_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The .grad of every parameter, in the NumPy layout."""
    return {n: _to_numpy(n, p.grad) for n, p in model.named_parameters()}


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Param groups for torch.optim.AdamW with mist's rule: no decay for biases and LayerNorm weights."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if n.endswith(".bias") or "norm." in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
