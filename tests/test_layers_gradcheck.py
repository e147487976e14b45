"""Finite-difference checks of every layer's backward, inputs and parameters, in float64."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad, contract, rel_error

from mist.device.attention import attention_backward, attention_forward, merge_heads, split_heads
from mist.device.layers import (
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    pool_backward,
    pool_forward,
    softmax_cross_entropy,
)

TOL = 1e-6


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def test_layernorm_grads():
    rng = np.random.default_rng(0)
    x, w, b = randn(rng, 3, 4, 7), 1 + 0.3 * randn(rng, 7), randn(rng, 7)
    g = randn(rng, 3, 4, 7)
    f = contract(g, lambda: layernorm_forward(x, w, b)[0])
    y, cache = layernorm_forward(x, w, b)
    dx, dw, db = layernorm_backward(g, cache)
    for t, grad in ((x, dx), (w, dw), (b, db)):
        assert check_grad(f, t, grad) < TOL
    # need_dx=False must leave the parameter gradients unchanged
    none, dw2, db2 = layernorm_backward(g, cache, need_dx=False)
    assert none is None and np.array_equal(dw, dw2) and np.array_equal(db, db2)


def test_layernorm_matches_definition():
    rng = np.random.default_rng(1)
    x = randn(rng, 5, 6)
    y, _ = layernorm_forward(x, np.ones(6), np.zeros(6), eps=0.0)
    expect = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    assert rel_error(y, expect) < 1e-12


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_linear_grads(lead):
    rng = np.random.default_rng(2)
    x, w, b = randn(rng, *lead, 6), randn(rng, 6, 4), randn(rng, 4)
    g = randn(rng, *lead, 4)
    f = contract(g, lambda: linear_forward(x, w, b)[0])
    _, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(g, cache)
    for t, grad in ((x, dx), (w, dw), (b, db)):
        assert check_grad(f, t, grad) < TOL
    none, dw2, _ = linear_backward(g, cache, need_dx=False)
    assert none is None and np.array_equal(dw, dw2)


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_pool_grads(mode):
    rng = np.random.default_rng(3)
    x, g = randn(rng, 3, 5, 4), randn(rng, 3, 4)
    f = contract(g, lambda: pool_forward(x, mode)[0])
    _, cache = pool_forward(x, mode)
    assert check_grad(f, x, pool_backward(g, cache), max_checks=None) < TOL


def test_pool_rejects_unknown_mode():
    with pytest.raises(ValueError, match="pool"):
        pool_forward(np.zeros((1, 2, 3)), "max")


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_grads(heads):
    rng = np.random.default_rng(10 + heads)
    B, T, d, r = 2, 5, 6, 4
    x = randn(rng, B, T, d)
    w_qkv, b_qkv = 0.5 * randn(rng, d, 3 * r), 0.1 * randn(rng, 3 * r)
    w_o, b_o = 0.5 * randn(rng, r, d), 0.1 * randn(rng, d)
    g = randn(rng, B, T, d)
    f = contract(g, lambda: attention_forward(x, w_qkv, b_qkv, w_o, b_o, heads)[0])
    _, cache = attention_forward(x, w_qkv, b_qkv, w_o, b_o, heads)
    grads = attention_backward(g, cache)
    for t, grad in zip((x, w_qkv, b_qkv, w_o, b_o), grads):
        assert check_grad(f, t, grad) < TOL


def test_attention_matches_naive_loop():
    """The batched (B,h,T,hs) code equals attention written per image and per head."""
    rng = np.random.default_rng(4)
    B, T, d, r, heads = 2, 4, 6, 4, 2
    hs = r // heads
    x, w_qkv, b_qkv = randn(rng, B, T, d), randn(rng, d, 3 * r), randn(rng, 3 * r)
    w_o, b_o = randn(rng, r, d), randn(rng, d)
    out, _ = attention_forward(x, w_qkv, b_qkv, w_o, b_o, heads)
    expect = np.empty_like(out)
    for i in range(B):
        qkv = x[i] @ w_qkv + b_qkv
        o = np.empty((T, r))
        for j in range(heads):
            cols = slice(j * hs, (j + 1) * hs)
            q, k, v = qkv[:, :r][:, cols], qkv[:, r : 2 * r][:, cols], qkv[:, 2 * r :][:, cols]
            s = q @ k.T / np.sqrt(hs)
            a = np.exp(s) / np.exp(s).sum(1, keepdims=True)
            o[:, cols] = a @ v
        expect[i] = o @ w_o + b_o
    assert rel_error(out, expect) < 1e-12
    t = randn(rng, B, T, r)
    assert np.array_equal(merge_heads(split_heads(t, heads)), t)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_grads(smoothing):
    rng = np.random.default_rng(5)
    logits, labels = 2 * randn(rng, 6, 5), rng.integers(0, 5, 6)
    loss, dlogits = softmax_cross_entropy(logits, labels, smoothing)
    f = lambda: softmax_cross_entropy(logits, labels, smoothing)[0]  # noqa: E731
    assert check_grad(f, logits, dlogits, max_checks=None) < TOL


def test_cross_entropy_values():
    # two classes, equal logits: loss is log 2 whatever the smoothing
    loss, _ = softmax_cross_entropy(np.zeros((3, 2)), np.array([0, 1, 0]), 0.2)
    assert abs(loss - np.log(2)) < 1e-12
    # huge logits do not overflow
    loss, d = softmax_cross_entropy(np.array([[1e4, 0.0]]), np.array([1]))
    assert np.isfinite(loss) and abs(loss - 1e4) < 1e-8 and np.all(np.isfinite(d))
    with pytest.raises(ValueError):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_keep_dtype(dtype):
    rng = np.random.default_rng(6)
    x = randn(rng, 2, 3, 4).astype(dtype)
    p = {n: randn(rng, *s).astype(dtype) for n, s in {"w": (4,), "b": (4,), "wq": (4, 6), "bq": (6,)}.items()}
    y, c = layernorm_forward(x, p["w"], p["b"])
    assert y.dtype == dtype and all(t.dtype == dtype for t in layernorm_backward(y, c))
    out, c = attention_forward(x, p["wq"], p["bq"], p["wq"][:, :2].T.copy(), p["b"], 2)
    assert out.dtype == dtype and all(t.dtype == dtype for t in attention_backward(out, c))
    pooled, c = pool_forward(x, "mean")
    assert pooled.dtype == dtype and pool_backward(pooled, c).dtype == dtype
    _, dl = softmax_cross_entropy(pooled, np.array([0, 1]), 0.1)
    assert dl.dtype == dtype
