"""The whole LAE: finite-difference check of every parameter through the loss, the zero-init linear-probe
property, configs and parameter bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad, rel_error

from mist.device.lae import (
    LAE,
    LAEConfig,
    count_params,
    flops_per_image,
    init_params,
    param_shapes,
)
from mist.device.step import loss_and_grads


def perturbed_params(cfg: LAEConfig, seed: int) -> dict[str, np.ndarray]:
    """float64 params with every tensor non-trivial. out.weight must be non-zero, or no gradient reaches
    anything upstream of the attention branches and the check would pass vacuously; norms and biases are
    moved off 1 / 0 so a mix-up between them would show."""
    params = init_params(cfg, seed, np.float64)
    rng = np.random.default_rng(seed + 1)
    for name, p in params.items():
        p += (0.3 if "weight" in name and "norm" not in name else 0.1) * rng.standard_normal(p.shape)
    return params


CASES = [
    dict(groups=1, blocks_per_group=1, pool="mean"),
    dict(groups=1, blocks_per_group=2, pool="cls"),
    dict(groups=2, blocks_per_group=1, pool="cls"),
    dict(groups=2, blocks_per_group=2, pool="mean", input_scale=0.5),
    dict(groups=2, blocks_per_group=1, pool="mean", pos_embed=True),
    dict(groups=1, blocks_per_group=0, pool="mean", pos_embed=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lae_gradcheck(case):
    cfg = LAEConfig(dim=8, tokens=5, num_classes=3, rank=4, heads=2, **case)
    params = perturbed_params(cfg, seed=0)
    model = LAE(cfg, params)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, cfg.groups, cfg.tokens, cfg.dim))
    labels = rng.integers(0, cfg.num_classes, 3)
    loss, grads, logits = loss_and_grads(model, x, labels, label_smoothing=0.1)
    assert list(grads) == list(params) and logits.shape == (3, cfg.num_classes)
    f = lambda: loss_and_grads(model, x, labels, label_smoothing=0.1)[0]  # noqa: E731
    for i, (name, p) in enumerate(params.items()):
        err = check_grad(f, p, grads[name], max_checks=24, seed=i)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", [*CASES, dict(groups=2, blocks_per_group=0, pool="mean")],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lae_input_gradcheck(case):
    """The gradient w.r.t. the features: training never needs it, but it checks the whole backward path."""
    from mist.device.layers import softmax_cross_entropy

    cfg = LAEConfig(dim=8, tokens=5, num_classes=3, rank=4, heads=2, **case)
    model = LAE(cfg, perturbed_params(cfg, seed=2))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, cfg.groups, cfg.tokens, cfg.dim))
    labels = rng.integers(0, cfg.num_classes, 3)
    _, dlogits = softmax_cross_entropy(model.forward(x), labels, 0.1)
    dx = model.backward(dlogits, input_grad=True)["input"]
    f = lambda: softmax_cross_entropy(model.forward(x), labels, 0.1)[0]  # noqa: E731
    err = check_grad(f, x, dx, max_checks=60, seed=4)
    assert err < 1e-6, f"input: relative error {err:.2e}"


def test_initial_model_is_linear_probe():
    """With every out.weight at zero the blocks add nothing: logits = head(pool(LN(sum of maps)))."""
    cfg = LAEConfig(dim=16, tokens=6, groups=3, num_classes=4, rank=8, heads=2, blocks_per_group=2,
                    input_scale=0.25)
    params = init_params(cfg, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, cfg.groups, cfg.tokens, cfg.dim))
    logits = LAE(cfg, params).forward(x)
    summed = x.sum(axis=1) * cfg.input_scale
    h = (summed - summed.mean(-1, keepdims=True)) / np.sqrt(summed.var(-1, keepdims=True) + 1e-5)
    probe = h.mean(axis=1) @ params["head.weight"] + params["head.bias"]
    assert rel_error(logits, probe) < 1e-12
    # and a non-zero out.weight does change the output (not a constant one: the same value in every output
    # channel shifts each token's row uniformly, which the final LayerNorm removes)
    params["blocks.0.out.weight"][:] = 0.1 * rng.standard_normal((cfg.rank, cfg.dim))
    assert rel_error(LAE(cfg, params).forward(x), probe) > 1e-4


def test_init_params_names_order_and_values():
    cfg = LAEConfig(dim=8, tokens=3, groups=2, num_classes=5, rank=4, heads=2)
    params = init_params(cfg, seed=7)
    block = ["norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "out.weight", "out.bias"]
    expect = [f"blocks.{b}.{n}" for b in range(2) for n in block] + [
        "norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(params) == expect == list(param_shapes(cfg))
    assert all(p.dtype == np.float32 for p in params.values())
    assert params["blocks.1.qkv.weight"].shape == (8, 12) and params["blocks.1.out.weight"].shape == (4, 8)
    assert not params["blocks.0.out.weight"].any() and np.all(params["norm.weight"] == 1)
    # documented draw order: qkv.weight of each block, then head.weight, from default_rng(seed), float64
    rng = np.random.default_rng(7)
    for name in ["blocks.0.qkv.weight", "blocks.1.qkv.weight", "head.weight"]:
        want = (rng.standard_normal(params[name].shape) * cfg.init_std).astype(np.float32)
        assert np.array_equal(params[name], want)
    head64 = init_params(cfg, 7, np.float64)["head.weight"]
    assert np.array_equal(head64.astype(np.float32), params["head.weight"])
    assert count_params(params) == 2 * (8 + 8 + 8 * 12 + 12 + 4 * 8 + 8) + 8 + 8 + 8 * 5 + 5


def test_forward_dtype_and_input_cast():
    cfg = LAEConfig(dim=8, tokens=4, groups=1, num_classes=3, rank=4, heads=2)
    params = init_params(cfg, 0)
    params["blocks.0.out.weight"][:] = 0.05 * np.random.default_rng(1).standard_normal((4, 8))
    model = LAE(cfg, params)
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 8)).astype(np.float16)
    loss, grads, logits = loss_and_grads(model, x, np.array([0, 2]))
    assert logits.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    assert np.allclose(model.forward(x.astype(np.float32), keep_cache=False), logits, atol=1e-6)
    with pytest.raises(RuntimeError):
        model.backward(np.zeros_like(logits))  # the keep_cache=False forward dropped the caches
    with pytest.raises(ValueError, match="shape"):
        model.forward(np.zeros((2, 2, 4, 8)))


def test_zero_blocks_is_a_linear_probe_model():
    cfg = LAEConfig(dim=4, tokens=2, groups=2, num_classes=2, rank=2, heads=1, blocks_per_group=0)
    params = init_params(cfg, 0, np.float64)
    assert sorted(params) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 4))
    loss, grads, _ = loss_and_grads(LAE(cfg, params), x, np.array([0, 1, 1]))
    f = lambda: loss_and_grads(LAE(cfg, params), x, np.array([0, 1, 1]))[0]  # noqa: E731
    assert all(check_grad(f, params[n], grads[n]) < 1e-6 for n in params)


def test_flops_match_the_method_notes():
    # ViT-B/16: T=197, d=768, r=32, one block: ~130 MFLOP per image for forward plus backward
    cfg = LAEConfig(dim=768, tokens=197, groups=1, num_classes=100)
    assert flops_per_image(cfg) == 3 * flops_per_image(cfg, backward=False)
    assert 125e6 < flops_per_image(cfg) < 140e6


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rank=64), "rank"),
        (dict(rank=0), "rank"),
        (dict(heads=3), "divide"),
        (dict(heads=0), "heads"),
        (dict(pool="max"), "pool"),
        (dict(groups=0), "groups"),
        (dict(blocks_per_group=-1), "blocks_per_group"),
        (dict(input_scale=0.0), "input_scale"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(dim=2.5), "dim"),
    ],
)
def test_config_validation(change, message):
    base = dict(dim=32, tokens=4, groups=1, num_classes=2, rank=8, heads=2)
    with pytest.raises(ValueError, match=message):
        LAEConfig(**{**base, **change}).validate()


def test_config_round_trip_and_param_mismatch():
    cfg = LAEConfig(dim=8, tokens=3, groups=2, num_classes=5, rank=4, heads=2, pool="cls", input_scale=0.5)
    assert LAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        LAEConfig.from_dict({**cfg.to_dict(), "mlp": True})
    params = init_params(cfg, 0)
    with pytest.raises(ValueError, match="missing"):
        LAE(cfg, {k: v for k, v in params.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="shape"):
        LAE(cfg, {**params, "head.bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="dtype"):
        LAE(cfg, {**params, "head.bias": np.zeros(5, np.float64)})
