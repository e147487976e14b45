"""The NumPy LAE against its PyTorch twin (tests/torch_lae.py): same weights, same inputs, same numbers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_lae import TorchLAE, adamw_param_groups, grads_to_numpy, load_numpy_params, params_to_numpy  # noqa: E402

from mist.device.lae import LAE, LAEConfig, init_params  # noqa: E402
from mist.device.optim import AdamW, clip_grad_norm  # noqa: E402
from mist.device.step import loss_and_grads  # noqa: E402

CASES = [
    dict(groups=1, blocks_per_group=1, pool="mean"),
    dict(groups=2, blocks_per_group=1, pool="cls", input_scale=0.5),
    dict(groups=2, blocks_per_group=2, pool="mean", heads=4),
]


def setup(case: dict, dtype, seed: int = 0):
    cfg = LAEConfig(**{**dict(dim=24, tokens=9, num_classes=5, rank=8, heads=2), **case})
    params = init_params(cfg, seed, np.float64)
    rng = np.random.default_rng(seed + 1)
    for name, p in params.items():  # move every tensor off its init so no gradient is trivially zero
        p += (0.2 if name.endswith("weight") and "norm" not in name else 0.1) * rng.standard_normal(p.shape)
    params = {n: p.astype(dtype) for n, p in params.items()}
    x = rng.standard_normal((4, cfg.groups, cfg.tokens, cfg.dim)).astype(dtype)
    labels = rng.integers(0, cfg.num_classes, 4)
    twin = TorchLAE(cfg.to_dict()).to(torch.float64 if dtype == np.float64 else torch.float32)
    load_numpy_params(twin, params)
    return cfg, params, x, labels, twin


def torch_loss_and_grads(twin, x, labels, smoothing):
    twin.zero_grad()
    logits = twin(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=smoothing)
    loss.backward()
    return loss.item(), grads_to_numpy(twin), logits.detach().numpy()


@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logits_and_grads_match_torch(case, dtype, atol):
    cfg, params, x, labels, twin = setup(case, dtype)
    loss, grads, logits = loss_and_grads(LAE(cfg, params), x, labels, label_smoothing=0.1)
    t_loss, t_grads, t_logits = torch_loss_and_grads(twin, x, labels, 0.1)
    assert logits.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    assert abs(loss - t_loss) < atol
    np.testing.assert_allclose(logits, t_logits, rtol=0, atol=atol)
    assert set(grads) == set(t_grads)
    for name in grads:
        np.testing.assert_allclose(grads[name], t_grads[name], rtol=0, atol=atol, err_msg=name)


def test_training_steps_match_torch():
    """Five steps of loss -> clip -> AdamW in float64 on both sides stay together to 1e-10."""
    cfg, params, x, labels, twin = setup(CASES[2], np.float64)
    model = LAE(cfg, params)
    opt = AdamW(params, lr=1e-2, weight_decay=0.05)
    t_opt = torch.optim.AdamW(adamw_param_groups(twin, 0.05), lr=1e-2)
    for _ in range(5):
        _, grads, _ = loss_and_grads(model, x, labels, label_smoothing=0.1)
        norm = clip_grad_norm(grads, 0.5)
        opt.step(grads)
        torch_loss_and_grads(twin, x, labels, 0.1)
        t_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5).item()
        t_opt.step()
        assert abs(norm - t_norm) < 1e-10
    t_params = params_to_numpy(twin)
    for name in params:
        np.testing.assert_allclose(params[name], t_params[name], rtol=0, atol=1e-10, err_msg=name)
