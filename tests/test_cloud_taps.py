"""Taps: the hooked z_0..z_N equal the model's own intermediates, for ViTs and for EfficientNet."""

from __future__ import annotations

import pytest
import timm
import torch

from mist.cloud.gather import parse_groups
from mist.cloud.taps import GroupTap, find_layers, probe, recipe_for, to_tokens

EXACT = dict(rtol=0.0, atol=0.0)


def _vit(name: str, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img_size).eval()


def _each(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    layers = find_layers(model)
    with GroupTap(model, layers, parse_groups("each", len(layers))) as tap, torch.inference_mode():
        return tap(x)


@pytest.mark.parametrize("name, img_size, prefix", [
    ("vit_tiny_patch16_224", 64, 1),  # class token
    ("vit_pwee_patch16_reg1_gap_256", 64, 1),  # one register token, no class token
    ("test_vit3", 32, None),
])
def test_vit_taps_equal_forward_intermediates(name: str, img_size: int, prefix: int | None) -> None:
    model = _vit(name, img_size)
    x = torch.randn(2, 3, img_size, img_size)
    taps = _each(model, x)
    n_blocks = len(model.blocks)
    assert taps.shape[1] == n_blocks + 1
    if prefix is not None:
        assert model.num_prefix_tokens == prefix
    with torch.inference_mode():
        inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True,
                                            intermediates_only=True)
        z0 = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(taps[:, 0], z0, **EXACT)
    for i, (spatial, prefix_tokens) in enumerate(inter, start=1):
        torch.testing.assert_close(taps[:, i], torch.cat([prefix_tokens, spatial], dim=1), **EXACT)
    shapes = probe(model, find_layers(model), (3, img_size, img_size))
    grid = img_size // 16
    assert {(s.tokens, s.dim, s.prefix, s.grid) for s in shapes} == {
        (model.num_prefix_tokens + grid * grid, model.embed_dim, model.num_prefix_tokens, (grid, grid))}


def _manual_efficientnet(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        s = model.bn1(model.conv_stem(x))
        maps = [s]
        for stage in model.blocks:
            for block in stage:
                s = block(s)
                maps.append(s)
        maps.append(model.bn2(model.conv_head(s)))
    return [m.flatten(2).transpose(1, 2) for m in maps]


@pytest.mark.parametrize("channels_last", [False, True])
def test_efficientnet_lite0_taps_equal_manual_forward(channels_last: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    if channels_last:  # the layout extraction uses for CNNs; the flattened tokens must not depend on it
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    expected = _manual_efficientnet(model, x)
    layers = find_layers(model)
    assert len(layers) == 18 and layers[0].name == "blocks.0.0:input" and layers[-1].name == "bn2"
    with torch.inference_mode():
        # Layers of one (T, d) only can share a tensor, so tap them one at a time here.
        for i, want in enumerate(expected):
            with GroupTap(model, layers, [[i]]) as tap:
                got = tap(x)[:, 0]
            torch.testing.assert_close(got, want, **EXACT)


def test_group_sum_is_the_fp32_sum_of_its_layers() -> None:
    model = _vit("test_vit", 32)
    x = torch.randn(3, 3, 32, 32)
    each = _each(model, x)
    layers = find_layers(model)
    with GroupTap(model, layers, [[0, 1, 2], [3, 4, 5, 6], [6]]) as tap, torch.inference_mode():
        sums = tap(x)
    assert sums.dtype == torch.float32 and sums.shape == (3, 3, 5, 64)
    torch.testing.assert_close(sums[:, 0], each[:, 0] + each[:, 1] + each[:, 2], **EXACT)
    torch.testing.assert_close(sums[:, 1], each[:, 3:7].sum(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums[:, 2], each[:, 6], **EXACT)


def test_forward_stops_after_the_last_tapped_layer() -> None:
    model = _vit("test_vit", 32)
    ran = []
    model.blocks[3].register_forward_hook(lambda *_: ran.append("blocks.3"))
    model.norm.register_forward_hook(lambda *_: ran.append("norm"))
    layers = find_layers(model)
    with GroupTap(model, layers, [[0, 1, 2]]) as tap, torch.inference_mode():
        tap(torch.randn(1, 3, 32, 32))
    assert ran == []
    with GroupTap(model, layers, [[4]]) as tap, torch.inference_mode():  # layer 4 = blocks.3
        tap(torch.randn(1, 3, 32, 32))
    assert ran == ["blocks.3"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.blocks[:3])  # hooks removed


# Several timm families, random init, tiny inputs: the recipe finds blocks in forward order and every
# same-shape run of layers can be summed.
@pytest.mark.parametrize("name, img_size", [
    ("test_vit2", 32), ("test_efficientnet", 64), ("test_resnet", 64), ("test_convnext", 64),
    ("resnet18", 64), ("convnext_atto", 64), ("swin_tiny_patch4_window7_224", 224),
    ("mobilenetv3_small_050", 64), ("regnetx_002", 64), ("resnetv2_50", 64), ("beit_base_patch16_224", 224),
])
def test_recipes_across_families(name: str, img_size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    layers = find_layers(model)
    shapes = probe(model, layers, (3, img_size, img_size))
    assert [la.index for la in layers] == list(range(len(layers))) and len(layers) >= 4
    x = torch.randn(2, 3, img_size, img_size)
    each = [None] * len(layers)
    recorded = {}
    hooks = [la.module.register_forward_hook((lambda i: lambda _m, _a, out: recorded.__setitem__(i, out))(la.index))
             for la in layers[1:]]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    layout = recipe_for(model).layout
    for i in range(1, len(layers)):
        each[i] = to_tokens(recorded[i], layout)
        assert each[i].shape[1:] == (shapes[i].tokens, shapes[i].dim)
    last = len(layers) - 1
    start = last
    while start > 1 and shapes[start - 1].td == shapes[last].td:
        start -= 1
    with GroupTap(model, layers, [list(range(start, last + 1))]) as tap, torch.inference_mode():
        got = tap(x)[:, 0]
    torch.testing.assert_close(got, sum(each[start:last + 1]), rtol=1e-5, atol=1e-5)
