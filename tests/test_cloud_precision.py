"""``--autocast`` and the CUDA path. The CUDA tests run where CUDA exists and skip, saying why, elsewhere."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_cloud_datasets import make_folder

from mist.cloud.cli import main
from mist.cloud.precision import TOLERANCE, autocast_choice
from mist.formats import FeatureSet

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available on this machine (scripts/gpu-check.sh "
                                                 "runs these tests on a GPU machine)")
TINY = ["--random-init", "--workers", "0", "--progress", "none", "--batch-size", "4", "--dtype", "float32"]


def extract(data: Path, out: Path, *extra: str) -> FeatureSet:
    result = CliRunner().invoke(main, ["extract", *TINY, "--data", str(data), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return FeatureSet(out, verify=True)


def relative_error(a: FeatureSet, b: FeatureSet) -> float:
    x, y = a.read(np.arange(len(a))), b.read(np.arange(len(b)))
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_auto_is_fp32_on_cpu_and_per_family_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_choice("auto", cpu, "NLC") == autocast_choice("auto", cpu, "NCHW") == "off"
    assert autocast_choice("auto", cuda, "NLC") == "bf16" and autocast_choice("auto", cuda, "NCHW") == "off"
    assert autocast_choice("auto", cuda, "NHWC") == "off" and autocast_choice("fp16", cpu, "NCHW") == "fp16"


def test_cpu_bf16_autocast_is_recorded_and_refuses_to_mix_on_resume(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    vit = ["--model", "test_vit", "--img-size", "32", "--groups", "0-6"]
    exact = extract(data, tmp_path / "fp32", *vit)
    assert "autocast" not in exact.manifest.backbone  # fp32 sets are unchanged by the option
    bf16 = extract(data, tmp_path / "bf16", *vit, "--autocast", "bf16")
    assert bf16.manifest.backbone["autocast"] == "bf16"
    assert 0 < relative_error(bf16, exact) < 10 * TOLERANCE  # random init: looser than the measured 2.2e-3
    assert bf16.manifest.layout_fingerprint() != exact.manifest.layout_fingerprint()


@needs_cuda
@pytest.mark.parametrize("model, groups", [("test_vit", "0-6"), ("test_efficientnet", "last")])
def test_cuda_fp32_matches_cpu(tmp_path: Path, model: str, groups: str) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    args = ["--model", model, "--img-size", "64", "--groups", groups, "--autocast", "off"]
    on_cpu = extract(data, tmp_path / "cpu", *args)
    on_gpu = extract(data, tmp_path / "gpu", *args, "--device", "cuda")
    assert on_gpu.ids.tolist() == on_cpu.ids.tolist() and on_gpu.labels.tolist() == on_cpu.labels.tolist()
    assert relative_error(on_gpu, on_cpu) < 1e-4  # fp32 on both (TF32 off), only summation order differs


@needs_cuda
def test_cuda_auto_autocast_stays_within_tolerance(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    args = ["--model", "test_vit", "--img-size", "64", "--groups", "0-6", "--device", "cuda"]
    auto = extract(data, tmp_path / "auto", *args)
    exact = extract(data, tmp_path / "fp32", *args, "--autocast", "off")
    assert auto.manifest.backbone["autocast"] == "bf16"
    assert relative_error(auto, exact) < 10 * TOLERANCE


@needs_cuda
@pytest.mark.slow
def test_torchrun_on_every_gpu_equals_one_process(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    args = [*TINY, "--model", "test_vit", "--img-size", "64", "--groups", "0-6", "--shard-rows", "4",
            "--device", "cuda", "--data", str(data)]
    one = extract(data, tmp_path / "one", *args[len(TINY):-2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                          str(torch.cuda.device_count()), "--master-addr", "127.0.0.1", "--master-port", str(port),
                          "-m", "mist.cloud", "extract", *args, "--out", str(tmp_path / "many")],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    many = FeatureSet(tmp_path / "many", verify=True)
    assert many.ids.tolist() == one.ids.tolist()
    # Another GPU may pick another cuDNN algorithm: fp32 rounding, not bits.
    np.testing.assert_allclose(many.read(np.arange(len(many))), one.read(np.arange(len(one))), rtol=1e-4, atol=1e-5)
