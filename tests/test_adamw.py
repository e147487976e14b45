"""AdamW, gradient clipping and the schedule against torch.optim.AdamW / clip_grad_norm_."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mist.device.optim import AdamW, clip_grad_norm, default_no_decay, lr_schedule

SHAPES = {
    "blocks.0.norm.weight": (6,),
    "blocks.0.qkv.weight": (6, 12),
    "blocks.0.qkv.bias": (12,),
    "norm.bias": (6,),
    "head.weight": (6, 3),
}


def make_params(dtype, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def grad_stream(steps: int, dtype, seed: int = 1) -> list[dict[str, np.ndarray]]:
    # the scale alternates so the global norm (about 11 * scale here) falls on both sides of a clip at 2
    rng = np.random.default_rng(seed)
    return [{n: (rng.standard_normal(s) * (1.0 if t % 2 else 0.05)).astype(dtype) for n, s in SHAPES.items()}
            for t in range(steps)]


def test_default_no_decay_rule():
    assert default_no_decay("blocks.3.qkv.bias") and default_no_decay("head.bias")
    assert default_no_decay("blocks.0.norm.weight") and default_no_decay("norm.weight")
    assert not default_no_decay("blocks.0.qkv.weight") and not default_no_decay("head.weight")


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_adamw_matches_torch(dtype, atol):
    torch = pytest.importorskip("torch")
    steps, base_lr, wd, max_norm = 20, 3e-2, 0.1, 2.0
    params = make_params(dtype)
    t_params = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in params.items()}
    opt = AdamW(params, lr=base_lr, betas=(0.85, 0.99), eps=1e-7, weight_decay=wd)
    groups = [
        {"params": [p for n, p in t_params.items() if not default_no_decay(n)], "weight_decay": wd},
        {"params": [p for n, p in t_params.items() if default_no_decay(n)], "weight_decay": 0.0},
    ]
    t_opt = torch.optim.AdamW(groups, lr=base_lr, betas=(0.85, 0.99), eps=1e-7)
    clipped = 0
    for step, grads in enumerate(grad_stream(steps, dtype)):
        lr = lr_schedule(step, steps, base_lr, warmup_steps=4, min_lr=1e-3)
        for n, p in t_params.items():
            p.grad = torch.from_numpy(grads[n].copy())
        norm = clip_grad_norm(grads, max_norm)
        t_norm = torch.nn.utils.clip_grad_norm_(list(t_params.values()), max_norm).item()
        assert abs(norm - t_norm) <= 10 * atol * max(1.0, norm)
        clipped += norm > max_norm
        opt.step(grads, lr=lr)
        for g in t_opt.param_groups:
            g["lr"] = lr
        t_opt.step()
    assert 0 < clipped < steps  # the stream exercises both the clipped and the unclipped path
    for n in params:
        np.testing.assert_allclose(params[n], t_params[n].detach().numpy(), rtol=0, atol=atol, err_msg=n)


def test_weight_decay_only_where_decayed():
    params = {"w": np.ones(3), "b.bias": np.ones(3)}
    opt = AdamW(params, lr=0.1, weight_decay=0.5, no_decay=lambda n: n.endswith(".bias"))
    opt.step({"w": np.zeros(3), "b.bias": np.zeros(3)})  # zero gradient: only decay can move a weight
    assert np.allclose(params["w"], 1 - 0.1 * 0.5) and np.all(params["b.bias"] == 1)


def test_state_dict_round_trip_continues_identically():
    grads = grad_stream(10, np.float64)
    a_params = make_params(np.float64)
    a = AdamW(a_params, lr=1e-2)
    for g in grads[:5]:
        a.step({n: v.copy() for n, v in g.items()})
    state = a.state_dict()
    b_params = {n: p.copy() for n, p in a_params.items()}
    b = AdamW(b_params, lr=1e-2)
    b.load_state_dict({k: (np.asarray(v) if k == "step" else v) for k, v in state.items()})
    assert b.step_count == 5 and set(state) == {"step"} | {f"{m}.{n}" for m in "mv" for n in SHAPES}
    for g in grads[5:]:
        a.step({n: v.copy() for n, v in g.items()})
        b.step({n: v.copy() for n, v in g.items()})
    for n in a_params:
        assert np.array_equal(a_params[n], b_params[n])
    state["m.head.weight"][:] = 123.0  # state_dict hands out copies, not the live buffers
    assert not np.any(a.m["head.weight"] == 123.0)


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 0) == 5.0 and grads["a"][0] == 3.0  # disabled, norm still reported
    assert clip_grad_norm(grads, 10.0) == 5.0 and grads["a"][0] == 3.0  # under the limit: untouched
    assert clip_grad_norm(grads, 1.0) == 5.0
    new = math.sqrt(float(np.sum(grads["a"] ** 2) + np.sum(grads["b"] ** 2)))
    assert abs(new - 1.0 / (1.0 + 2e-7)) < 1e-12  # torch's coef = max_norm / (norm + 1e-6)
    g32 = {"a": np.ones(4, np.float32)}
    clip_grad_norm(g32, 0.5)
    assert g32["a"].dtype == np.float32


def test_lr_schedule_shape():
    total, warm, base, low = 100, 10, 1e-3, 1e-5
    lrs = [lr_schedule(s, total, base, warm, low) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(base / warm) and lrs[warm - 1] == pytest.approx(base)
    assert np.allclose(np.diff(lrs[:warm]), base / warm)  # linear warm-up
    assert lrs[warm] == pytest.approx(base)  # cosine starts at the peak
    assert all(x >= y for x, y in zip(lrs[warm:], lrs[warm + 1 :]))  # then never rises
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx((base + low) / 2)
    assert lrs[total] == pytest.approx(low) and lrs[-1] == pytest.approx(low)
    assert lr_schedule(0, 10, 1.0, 0) == 1.0  # no warm-up: starts at the peak
