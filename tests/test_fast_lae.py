"""FastLAE (device/fast_lae.py) against the readable LAE (device/lae.py): float64, random shapes, every config
the model has (groups, blocks per group, both poolings, input scaling); loss, logits and every gradient."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from digits_sets import write_digits_set

from mist.device.adaptor import build as build_model
from mist.device.data import FrozenMaps, prepare_maps
from mist.device.evaluation import eval_chunk_rows, evaluate_rows
from mist.device.fast_lae import FastLAE
from mist.device.lae import LAE, LAEConfig, init_params
from mist.device.parallel import run_chunks
from mist.device.step import loss_and_grads
from mist.formats import FeatureSet

ATOL = 1e-10


def random_case(seed: int, **fixed):
    """A random small shape and config, params moved off their init so no gradient is trivially zero."""
    rng = np.random.default_rng(seed)
    heads = int(rng.integers(1, 4))
    rank = heads * int(rng.integers(1, 4))
    case = dict(dim=int(rng.integers(rank, 3 * rank + 8)), tokens=int(rng.integers(1, 12)),
                groups=int(rng.integers(1, 4)), num_classes=int(rng.integers(2, 6)), rank=rank, heads=heads,
                blocks_per_group=int(rng.integers(0, 3)), pool=str(rng.choice(["mean", "cls"])),
                input_scale=float(rng.choice([1.0, 0.5, 3.0])))
    cfg = LAEConfig(**{**case, **fixed})
    params = init_params(cfg, seed, np.float64)
    for p in params.values():
        p += 0.3 * rng.standard_normal(p.shape)
    batch = int(rng.integers(1, 6))
    # features with a per-token offset and spread, like a backbone's, so the LayerNorms do real work
    x = (rng.standard_normal((batch, cfg.groups, cfg.tokens, cfg.dim)) * rng.uniform(0.5, 3.0)
         + rng.standard_normal((batch, cfg.groups, cfg.tokens, 1)))
    labels = rng.integers(0, cfg.num_classes, batch)
    return cfg, params, x, labels


def assert_same(cfg, params, x, labels, smoothing=0.1):
    loss, grads, logits = loss_and_grads(LAE(cfg, params), x, labels, smoothing)
    f_loss, f_grads, f_logits = loss_and_grads(FastLAE(cfg, params), x, labels, smoothing)
    assert abs(loss - f_loss) < ATOL
    np.testing.assert_allclose(f_logits, logits, rtol=0, atol=ATOL)
    assert list(f_grads) == list(grads)  # same keys, canonical order
    for name in grads:
        assert f_grads[name].dtype == np.float64 and f_grads[name].shape == grads[name].shape
        np.testing.assert_allclose(f_grads[name], grads[name], rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("seed", range(24))
def test_random_shapes_match_the_reference(seed):
    assert_same(*random_case(seed))


@pytest.mark.parametrize("groups, blocks_per_group, pool, input_scale",
                         list(itertools.product([1, 3], [0, 1, 2], ["mean", "cls"], [1.0, 0.25])))
def test_every_config_matches_the_reference(groups, blocks_per_group, pool, input_scale):
    assert_same(*random_case(100 + groups, groups=groups, blocks_per_group=blocks_per_group, pool=pool,
                             input_scale=input_scale))


def test_training_steps_stay_with_the_reference():
    """Weights change between steps and buffers are reused: five AdamW steps stay together."""
    from mist.device.optim import AdamW, clip_grad_norm

    cfg, params, x, labels = random_case(7, groups=2, blocks_per_group=2, tokens=6, dim=20, rank=4, heads=2)
    models = [LAE(cfg, {n: p.copy() for n, p in params.items()}), FastLAE(cfg, {n: p.copy() for n, p in
                                                                                  params.items()})]
    optims = [AdamW(m.params, lr=1e-2, weight_decay=1e-2) for m in models]
    for step in range(5):
        batch = x[step % 2::2] if step % 2 else x  # two batch sizes: buffers are replaced, then reused
        for model, opt in zip(models, optims):
            _, grads, _ = loss_and_grads(model, batch, labels[step % 2::2] if step % 2 else labels, 0.1)
            clip_grad_norm(grads, 1.0)
            opt.step(grads)
    for name in params:
        np.testing.assert_allclose(models[1].params[name], models[0].params[name], rtol=0, atol=ATOL, err_msg=name)


def test_float32_and_fp16_features_match_the_reference():
    cfg, params, x, labels = random_case(3, groups=2, blocks_per_group=1, input_scale=0.5)
    params32 = {n: p.astype(np.float32) for n, p in params.items()}
    x16 = x.astype(np.float16)
    ref = LAE(cfg, params32).forward(x16)
    fast = FastLAE(cfg, params32)
    out = fast.forward(x16)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.forward(prepare_maps(x16, cfg.input_scale, np.float32)), ref, rtol=1e-4, atol=1e-4)


def test_evaluation_forward_keeps_nothing_and_equals_the_training_forward():
    cfg, params, x, labels = random_case(5, blocks_per_group=2)
    model = FastLAE(cfg, params)
    trained = model.forward(x)
    assert model._cache is not None
    evaluated = model.forward(x, keep_cache=False)
    np.testing.assert_allclose(evaluated, trained, rtol=0, atol=1e-12)
    assert model._cache is None
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.zeros_like(trained))


def test_backward_releases_its_cache_and_refuses_the_input_gradient():
    cfg, params, x, labels = random_case(9)
    model = build_model(cfg, params)
    assert isinstance(model, FastLAE)  # no longer a subclass of LAE (issue 21): the shared checks are lae.check_params
    logits = model.forward(x)
    with pytest.raises(ValueError, match="frozen"):
        model.backward(np.zeros_like(logits), input_grad=True)
    model.backward(np.zeros_like(logits))
    assert model._cache is None


def test_bad_shapes_and_params_are_refused_like_the_reference():
    cfg, params, x, _ = random_case(11)
    with pytest.raises(ValueError, match="features must have shape"):
        FastLAE(cfg, params).forward(x[:, :, :, :-1])
    with pytest.raises(ValueError, match="do not match"):
        FastLAE(cfg, {n: p for n, p in params.items() if n != "head.bias"})


def test_nonfinite_rows_are_found_from_the_statistics():
    cfg, params, x, _ = random_case(13, groups=2)
    x = np.repeat(x[:1], 4, axis=0)
    x[1, 1, 0, 0] = np.inf  # a late group: the cumulative map F_1 carries it
    x[2, 0, -1, -1] = np.nan
    fm = prepare_maps(x, cfg.input_scale, FastLAE(cfg, params).dtype)
    assert isinstance(fm, FrozenMaps)
    assert fm.nonfinite_rows().tolist() == [1, 2]


def test_thread_chunks_cover_every_row_once_and_reraise():
    seen = np.zeros(37, int)

    def work(rows: slice) -> None:
        seen[rows] += 1

    run_chunks(work, 37, 5)
    assert (seen == 1).all()

    def fail(rows: slice) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run_chunks(fail, 10, 3)


def test_evaluate_rows_matches_the_reference_on_a_real_set(tmp_path):
    """Chunked, read-ahead evaluation of a real feature set (two groups, several shards) gives the same
    logits and loss as the plain batched loop over the readable model."""
    fs = FeatureSet(write_digits_set(tmp_path / "digits", slice(0, 150), k=2, shard_rows=40))
    cfg = LAEConfig(dim=16, tokens=8, groups=2, num_classes=10, rank=8, heads=2, blocks_per_group=2)
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    for p in params.values():
        p += (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    rows = rng.permutation(len(fs))[:123]
    ref = evaluate_rows(LAE(cfg, params), fs, rows, batch_size=50, label_smoothing=0.1)
    fast = evaluate_rows(FastLAE(cfg, params), fs, rows, batch_size=7, label_smoothing=0.1)
    np.testing.assert_allclose(fast["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert abs(fast["loss"] - ref["loss"]) < 1e-5
    assert (fast["labels"] == ref["labels"]).all()


def test_evaluation_chunks_are_capped_by_memory_not_batch_size():
    vit_b = LAEConfig(dim=768, tokens=197, groups=1, num_classes=10)
    assert eval_chunk_rows(vit_b, 10_000) == eval_chunk_rows(vit_b, 27) == 27
    assert eval_chunk_rows(vit_b, 3) == 3


# ---- the learned position table (pos_embed) in the fast path: equations (20), (21) of docs/performance.md ----


@pytest.mark.parametrize("seed", range(12))
def test_pos_embed_random_shapes_match_the_reference(seed):
    assert_same(*random_case(200 + seed, pos_embed=True))


@pytest.mark.parametrize("groups, blocks_per_group, pool", list(itertools.product([1, 3], [0, 1, 2], ["mean", "cls"])))
def test_pos_embed_every_config_matches_the_reference(groups, blocks_per_group, pool):
    cfg, params, x, labels = random_case(300 + groups, groups=groups, blocks_per_group=blocks_per_group, pool=pool,
                                         pos_embed=True)
    params["pos_embed"] += 5.0  # a table far from zero mean: the statistics (20) must carry its offset
    assert_same(cfg, params, x, labels)


def test_pos_embed_trains_with_the_reference_and_builds_the_fast_path():
    """Five AdamW steps with the table learning, two batch sizes: the weights (the table included) stay
    together, and build() now gives the fast path for such a config."""
    from mist.device.optim import AdamW, clip_grad_norm

    cfg, params, x, labels = random_case(17, groups=2, blocks_per_group=1, tokens=7, dim=24, rank=4, heads=2,
                                         pos_embed=True)
    assert isinstance(build_model(cfg, params), FastLAE)
    models = [LAE(cfg, {n: p.copy() for n, p in params.items()}),
              build_model(cfg, {n: p.copy() for n, p in params.items()})]
    optims = [AdamW(m.params, lr=1e-2, weight_decay=1e-2) for m in models]
    for step in range(5):
        rows = slice(step % 2, None, 2) if step % 2 else slice(None)
        for model, opt in zip(models, optims):
            _, grads, _ = loss_and_grads(model, x[rows], labels[rows], 0.1)
            clip_grad_norm(grads, 1.0)
            opt.step(grads)
    assert np.abs(models[1].params["pos_embed"] - params["pos_embed"]).max() > 1e-3  # it did learn
    for name in params:
        np.testing.assert_allclose(models[1].params[name], models[0].params[name], rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_attention_kernels_match_the_reference_even_where_the_shift_bound_underflows(spread):
    """The fast kernels shift scores by a Cauchy-Schwarz bound, not the row maximum; with spread 40 the bound
    lies hundreds of nats above many rows' maxima, whose sums underflow and are computed again exactly."""
    from mist.device.attention import (
        attention_backward,
        attention_backward_fast,
        attention_forward,
        attention_forward_fast,
    )

    rng = np.random.default_rng(int(spread))
    B, T, r, heads = 3, 9, 8, 2
    qkv = rng.standard_normal((B, T, 3 * r)) * spread
    do = rng.standard_normal((B, T, r))
    out, cache = attention_forward(qkv, np.eye(3 * r), np.zeros(3 * r), np.eye(r), np.zeros(r), heads)
    dqkv, *_ = attention_backward(do, cache)
    o, shifts, inv_sums = np.empty((B, T, r)), np.empty((B, heads, T)), np.empty((B, heads, T))
    attention_forward_fast(qkv, o, heads, shifts, inv_sums)
    np.testing.assert_allclose(o, out, rtol=0, atol=ATOL * spread)
    np.testing.assert_allclose(attention_backward_fast(do, qkv, o, heads, shifts, inv_sums), dqkv, rtol=0,
                               atol=ATOL * spread)
