"""The dense head: each layer's backward against float64 central differences, the fast upsampling against
its pixel-by-pixel reference and torch's bilinear interpolation, and both dense models end to end."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad, contract

from mist.device.dense import DENSE_LAE, DENSE_PROBE, DenseConfig, build, init_dense
from mist.device.dense_layers import (
    IGNORE_INDEX,
    grid_backward,
    grid_forward,
    interpolation_matrix,
    pixel_cross_entropy,
    upsample_backward,
    upsample_forward,
    upsample_reference,
)


@pytest.mark.parametrize("grid,size", [((2, 3), (8, 12)), ((4, 4), (4, 4)), ((3, 5), (7, 11)), ((1, 2), (3, 6))])
def test_upsample_fast_path_equals_the_reference(grid, size):
    x = np.random.default_rng(0).standard_normal((2, *grid, 3))
    fast, _ = upsample_forward(x, size)
    np.testing.assert_allclose(fast, upsample_reference(x, size), rtol=1e-12, atol=1e-12)


def test_upsample_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 4))
    ours, _ = upsample_forward(x, (12, 20))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(12, 20),
                                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)


def test_interpolation_rows_sum_to_one():
    u = interpolation_matrix(13, 4, np.float64)
    np.testing.assert_allclose(u.sum(axis=1), 1.0)
    assert (u >= 0).all()


def test_upsample_backward():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 5))
    g = rng.standard_normal((2, 9, 8, 5))
    _, cache = upsample_forward(x, (9, 8))
    assert check_grad(contract(g, lambda: upsample_forward(x, (9, 8))[0]), x, upsample_backward(g, cache),
                      max_checks=None) < 1e-7


def test_grid_backward():
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((2, 1 + 6, 4))
    g = rng.standard_normal((2, 2, 3, 4))
    _, cache = grid_forward(tokens, 1, (2, 3))
    dtokens = grid_backward(g, cache)
    assert (dtokens[:, 0] == 0).all()
    assert check_grad(contract(g, lambda: grid_forward(tokens, 1, (2, 3))[0]), tokens, dtokens,
                      max_checks=None) < 1e-7


def test_pixel_cross_entropy_gradient_and_ignore():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 3, 4, 5))
    labels = rng.integers(0, 5, (2, 3, 4)).astype(np.uint8)
    labels[0, 0] = IGNORE_INDEX
    loss, dlogits = pixel_cross_entropy(logits, labels)
    assert check_grad(lambda: pixel_cross_entropy(logits, labels)[0], logits, dlogits, max_checks=None) < 1e-7
    assert (dlogits[0, 0] == 0).all()  # ignored pixels get no gradient
    # the mean is over labelled pixels only: the reference, spelt out
    valid = labels != IGNORE_INDEX
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean([logp[b, y, x, labels[b, y, x]] for b, y, x in zip(*np.nonzero(valid))])
    assert loss == pytest.approx(want, rel=1e-12)
    assert pixel_cross_entropy(logits, np.full_like(labels, IGNORE_INDEX)) == (0.0, pytest.approx(0 * logits))


def test_pixel_cross_entropy_refuses_a_label_beyond_the_classes():
    with pytest.raises(ValueError, match="labels must lie"):
        pixel_cross_entropy(np.zeros((1, 2, 2, 3)), np.full((1, 2, 2), 3, np.uint8))


def _config(**settings) -> DenseConfig:
    return DenseConfig(dim=8, tokens=1 + 6, groups=2, num_classes=3, prefix=1, grid=[2, 3], label_size=[4, 6],
                       rank=4, heads=2, **settings)


@pytest.mark.parametrize("kind,settings", [(DENSE_LAE, {}), (DENSE_LAE, {"pos_embed": True}),
                                           (DENSE_LAE, {"blocks_per_group": 2}), (DENSE_PROBE, {})])
def test_dense_models_gradients_through_the_pixel_loss(kind, settings):
    cfg = _config(**settings)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, cfg.groups, cfg.tokens, cfg.dim))
    params = {n: p.astype(np.float64) for n, p in init_dense(kind, cfg, 0, x.astype(np.float32)).items()}
    for name, p in params.items():  # every tensor non-trivial, so no gradient passes vacuously
        if name not in ("input.mean", "input.scale"):
            p += 0.3 * rng.standard_normal(p.shape)
    labels = rng.integers(0, 3, (2, 4, 6)).astype(np.uint8)
    labels[1, :2] = IGNORE_INDEX
    model = build(kind, cfg, params)
    _, dlogits = pixel_cross_entropy(model.forward(x), labels)
    grads = model.backward(dlogits)
    assert set(grads) == ({"head.weight", "head.bias"} if kind == DENSE_PROBE else set(params))

    def loss() -> float:
        return pixel_cross_entropy(model.forward(x, keep_cache=False), labels)[0]

    for name, g in grads.items():
        assert check_grad(loss, params[name], g, max_checks=30) < 1e-6, name


def test_untrained_dense_lae_is_a_per_token_probe_on_the_normed_sum():
    cfg = _config()
    x = np.random.default_rng(6).standard_normal((2, cfg.groups, cfg.tokens, cfg.dim))
    params = init_dense(DENSE_LAE, cfg, 0)
    logits = build(DENSE_LAE, cfg, params).forward(x.astype(np.float32))
    state = x.sum(axis=1)[:, 1:]
    normed = (state - state.mean(-1, keepdims=True)) / np.sqrt(state.var(-1, keepdims=True) + 1e-5)
    token_logits = (normed @ params["head.weight"] + params["head.bias"]).reshape(2, 2, 3, 3)
    np.testing.assert_allclose(logits, upsample_reference(token_logits, (4, 6)), rtol=1e-4, atol=1e-5)
