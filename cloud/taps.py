"""Taps: which modules of a backbone give the layers z_0..z_N, and hooks that sum them into groups.

Layer 0 is the input of the first block: for a ViT the patch tokens with the prefix tokens, position
embedding and ``norm_pre`` applied; for a CNN the stem output. Layers 1..N are the block outputs (the
residual stream of a ViT, flattened feature maps of a CNN). A CNN whose recipe names a ``head`` gets one
more layer, the final feature map (EfficientNet: after ``conv_head``/``bn2``), so ``last`` means the
standard final features.

Which modules are "the blocks" is data about a model family (``RECIPES``), not code per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from .errors import CloudError


@dataclass(frozen=True)
class TapRecipe:
    blocks: str  # dotted module-path pattern of the blocks, in forward order; '*' matches one path segment
    layout: str  # "NLC": token sequences; "NCHW" / "NHWC": feature maps, flattened to (B, H*W, C)
    head: str | None = None  # a module whose output is one extra, final layer


# Keyed by class name, matched along the model's MRO, so subclasses (e.g. distilled DeiT) inherit a recipe.
RECIPES: dict[str, TapRecipe] = {
    "VisionTransformer": TapRecipe("blocks.*", "NLC"),
    "Eva": TapRecipe("blocks.*", "NLC"),
    "EfficientNet": TapRecipe("blocks.*.*", "NCHW", head="bn2"),
    "ResNet": TapRecipe("layer?.*", "NCHW"),
    "ConvNeXt": TapRecipe("stages.*.blocks.*", "NCHW"),
    "Beit": TapRecipe("blocks.*", "NLC"),
    "SwinTransformer": TapRecipe("layers.*.blocks.*", "NHWC"),  # timm's Swin blocks keep (B, H, W, C)
    "MobileNetV3": TapRecipe("blocks.*.*", "NCHW"),  # its conv_head runs after pooling: no spatial head
    "RegNet": TapRecipe("s?.b*", "NCHW"),
    "ResNetV2": TapRecipe("stages.*.blocks.*", "NCHW"),
}


@dataclass(frozen=True)
class Layer:
    index: int
    name: str  # module path; layer 0 is "<first block>:input"
    module: nn.Module
    at_input: bool  # tapped at the module's input (layer 0) instead of its output


@dataclass(frozen=True)
class LayerShape:
    tokens: int  # T, prefix tokens included
    dim: int  # d
    prefix: int  # class/register tokens at the front
    grid: tuple[int, int] | None  # (rows, cols) of the spatial tokens

    @property
    def td(self) -> tuple[int, int]:
        return (self.tokens, self.dim)


def recipe_for(model: nn.Module) -> TapRecipe:
    for cls in type(model).__mro__:
        if cls.__name__ in RECIPES:
            return RECIPES[cls.__name__]
    raise CloudError(f"no tap recipe for model class {type(model).__name__} "
                     f"(known: {', '.join(sorted(RECIPES))}); add one to RECIPES in mist/cloud/taps.py")


def _matches(name: str, pattern: str) -> bool:
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatchcase(p, w) for p, w in zip(parts, wanted))


def find_layers(model: nn.Module) -> list[Layer]:
    """The tappable layers of ``model`` in forward order: layer 0, the blocks, then the head if any."""
    recipe = recipe_for(model)
    # named_modules() follows registration order, which for timm's nn.Sequential stacks is forward order.
    blocks = [(n, m) for n, m in model.named_modules() if _matches(n, recipe.blocks)]
    if not blocks:
        raise CloudError(f"{type(model).__name__}: no module matches the block pattern {recipe.blocks!r}")
    layers = [Layer(0, f"{blocks[0][0]}:input", blocks[0][1], at_input=True)]
    layers += [Layer(i + 1, n, m, at_input=False) for i, (n, m) in enumerate(blocks)]
    if recipe.head is not None:
        head = model.get_submodule(recipe.head) if _has_submodule(model, recipe.head) else None
        if head is not None and not isinstance(head, nn.Identity):
            layers.append(Layer(len(layers), recipe.head, head, at_input=False))
    return layers


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def to_tokens(value: object, layout: str) -> torch.Tensor:
    """A hooked module's output (or input tuple) as (B, T, d)."""
    x = value[0] if isinstance(value, (tuple, list)) else value
    if layout == "NCHW":
        # For a channels_last map this view is already contiguous (B, H*W, C): no copy.
        return x.flatten(2).transpose(1, 2)
    if layout == "NHWC":
        return x.flatten(1, 2)
    return x


def forward_fn(model: nn.Module):
    # forward_features skips the classifier, which no tap reads.
    return getattr(model, "forward_features", model)


class _StopForward(Exception):
    """Raised by the hook of the last tapped layer, so later blocks cost nothing."""


class _Hooks:
    """Calls ``callback(layer index, value)`` with each layer's input (layer 0) or output."""

    def __init__(self, layers: Sequence[Layer], callback: Callable[[int, object], None]):
        self.handles = [self._attach(layer, callback) for layer in layers]

    @staticmethod
    def _attach(layer: Layer, callback: Callable[[int, object], None]):
        i = layer.index
        if layer.at_input:
            return layer.module.register_forward_pre_hook(lambda _m, args: callback(i, args))
        return layer.module.register_forward_hook(lambda _m, _args, out: callback(i, out))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def probe(model: nn.Module, layers: Sequence[Layer], input_size: Sequence[int]) -> list[LayerShape]:
    """Shapes of every layer for one image of ``input_size`` (C, H, W), from one forward of zeros."""
    layout = recipe_for(model).layout
    raw: dict[int, tuple[int, ...]] = {}

    def record(i: int, value: object) -> None:
        x = value[0] if isinstance(value, (tuple, list)) else value
        raw[i] = tuple(x.shape)

    hooks = _Hooks(layers, record)
    try:
        with torch.inference_mode():
            forward_fn(model)(torch.zeros(1, *input_size))
    except (AssertionError, ValueError, RuntimeError) as e:  # e.g. an input size the patch size does not divide
        if isinstance(e, RuntimeError) and "alloc" in str(e).lower():
            raise  # out of memory: the caller's memory guard words it
        reason = (str(e).splitlines() or [""])[0] or e.__class__.__name__
        raise CloudError(f"{type(model).__name__} cannot run on a {'x'.join(map(str, input_size))} input "
                         f"({reason}); choose another --img-size") from None
    finally:
        hooks.remove()
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    patch_grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    shapes = []
    for layer in layers:
        shape = raw[layer.index]
        if layout in ("NCHW", "NHWC"):
            _, c, h, w = shape if layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
            shapes.append(LayerShape(h * w, c, 0, (h, w)))
        else:
            _, t, d = shape
            grid = tuple(int(g) for g in patch_grid) if patch_grid is not None else None
            if grid is not None and grid[0] * grid[1] != t - prefix:
                grid = None
            shapes.append(LayerShape(t, d, prefix, grid))
    return shapes


class GroupTap:
    """Hooks that add every tapped layer into its groups' fp32 sums during one forward, then stop it.

    Memory is the k group maps, never the N layer maps. Use as a context manager (removes the hooks).
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], groups: Sequence[Sequence[int]]):
        self.model = model
        self.layout = recipe_for(model).layout
        self.k = len(groups)
        self.groups_of: dict[int, list[int]] = {}
        for g, group in enumerate(groups):
            for i in group:
                self.groups_of.setdefault(i, []).append(g)
        self.last = max(self.groups_of)
        self._sums: torch.Tensor | None = None
        self._seen = [False] * self.k
        self._hooks = _Hooks([layers[i] for i in sorted(self.groups_of)], self._add)

    def _add(self, i: int, value: object) -> None:
        t = to_tokens(value, self.layout)
        if self._sums is None:
            b, n, d = t.shape
            self._sums = torch.empty((b, self.k, n, d), dtype=torch.float32, device=t.device)
        for g in self.groups_of[i]:
            if self._seen[g]:
                self._sums[:, g].add_(t)
            else:
                self._sums[:, g].copy_(t)  # copies at once, so a later in-place op cannot change it
                self._seen[g] = True
        if i == self.last:
            raise _StopForward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, k, T, d) fp32 group sums."""
        self._sums, self._seen = None, [False] * self.k
        try:
            forward_fn(self.model)(x)
        except _StopForward:
            pass
        if self._sums is None or not all(self._seen):
            raise RuntimeError("the forward pass did not reach every tapped layer")
        sums, self._sums = self._sums, None
        return sums

    def close(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> GroupTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
