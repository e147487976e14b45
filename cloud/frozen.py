"""The frozen backbone that ``extract`` and ``serve`` share: built once by ``load_frozen``, run by ``gather``.

Both commands take a batch through ``FrozenBackbone.gather`` (device placement, channels-last layout,
autocast, the Gather* taps, ``--pool``, the scale and the cast to the storage dtype), so a served image's
features are the ones ``extract`` writes for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mist.formats import Manifest

from . import precision
from .backbones import Backbone, create_backbone
from .errors import CloudError
from .gather import DTYPES, auto_groups, check_group_shapes, finish, parse_groups, pool_tokens
from .taps import GroupTap, Layer, find_layers, probe, recipe_for

Log = Callable[[str], None]


@dataclass
class FrozenBackbone:
    """A backbone ready to tap: its layers, parsed groups and their shape, on its device.

    ``extract`` and ``serve`` both build it with ``load_frozen`` and run batches through ``gather``, so a
    served image goes through exactly the code an extracted one does.
    """

    backbone: Backbone
    model: torch.nn.Module
    layers: list[Layer]
    groups: list[list[int]]
    tokens: int  # after --pool
    dim: int
    prefix: int
    grid: list[int] | None
    pool: str
    device: torch.device
    channels_last: bool
    autocast: str  # resolved: "off", "bf16" or "fp16"

    def manifest(self, scale: str, dtype: str, classes: list[str], split: str, dataset: dict) -> Manifest:
        return Manifest(
            backbone={**self.backbone.describe(), **precision.manifest_record(self.autocast)}, groups=self.groups,
            scale=scale, tokens=self.tokens, prefix_tokens=self.prefix, grid=self.grid, dim=self.dim, pool=self.pool,
            dtype=dtype, data_config=self.backbone.data_config, classes=classes, split=split, dataset=dataset,
            layer_names=[la.name for la in self.layers],
        )

    def gather(self, tap: GroupTap, images: torch.Tensor, scale: str, dtype: str) -> torch.Tensor:
        """(B, C, H, W) transformed images -> (B, k, T, d) group sums in the storage dtype, on the CPU."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast(self.autocast, self.device):
            sums = tap(images)
        return finish(pool_tokens(sums, self.pool), self.groups, scale, dtype).cpu()


def load_frozen(model_name: str, weights: str, weights_file: str | None, img_size: int | None, seed: int,
                groups_spec: str, pool: str, data_overrides: dict, device: torch.device | str, autocast: str,
                log: Log, model_kwargs: dict | None = None) -> FrozenBackbone:
    """Build the frozen backbone, find its layers, parse and check ``--groups``, move it to its device."""
    device = torch_device(device) if isinstance(device, str) else device
    backbone = create_backbone(model_name, weights, weights_file, img_size, seed, log, model_kwargs=model_kwargs)
    backbone.data_config.update(data_overrides)
    model = backbone.model
    layers = find_layers(model)
    shapes = probe(model, layers, backbone.data_config["input_size"])
    if groups_spec.strip().lower() == "auto":
        groups = auto_groups([s.td for s in shapes])
    else:
        groups = parse_groups(groups_spec, len(layers))
    tokens, dim = check_group_shapes(groups, [s.td for s in shapes], [la.name for la in layers])
    shape = shapes[groups[0][0]]
    prefix, grid = shape.prefix, None if shape.grid is None else list(shape.grid)
    if pool == "cls" and prefix < 1:
        raise CloudError(f"--pool cls needs a class token, but {model_name}'s layers have none; use --pool mean")
    if pool != "none":
        tokens, prefix, grid = 1, 0, None
    channels_last = recipe_for(model).layout == "NCHW"
    if channels_last:  # measured ~5x faster for EfficientNet-Lite0 on CPU (docs/cloud.md)
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    mode = precision.autocast_choice(autocast, device, recipe_for(model).layout)
    if device.type == "cuda" and mode == "off":
        precision.exact_fp32_on_cuda()
    return FrozenBackbone(backbone, model, layers, groups, tokens, dim, prefix, grid, pool, device, channels_last,
                          mode)


def sum_dtype(storage: str) -> str:
    """The dtype the writer receives: the storage dtype for floats, the fp32 sums for a quantised set."""
    return storage if storage in DTYPES else "float32"


def torch_device(name: str) -> torch.device:
    """``--device`` (cpu, cuda, cuda:N, auto) -> a torch device, refusing one this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CloudError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CloudError(f"--device {name}: CUDA is not available on this machine")
    return device
