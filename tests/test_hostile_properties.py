"""Property tests (hypothesis) over flag values and manifest / shard / checkpoint metadata, plus files that
change while they are read. Whatever the value: success, or one line naming the problem; never a traceback,
never a changed valid file."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import write_digits_set
from hostile import forge_checkpoint, reseal_shard, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mist.device.adaptor import parameter_count
from mist.device.cli import main as device_main
from mist.device.cli_options import load_adaptor as _load_adaptor
from mist.device.lae import LAEConfig, count_params, init_params
from mist.formats import FeatureSet, FormatError
from mist.formats.manifest import MANIFEST_NAME
from mist.kit.flags import finite_float, parse_bytes
from mist.kit.text import csv_line, json_text, terminal_text, utf8_safe

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prop")
    train = write_digits_set(root / "train", slice(0, 96), shard_rows=32)
    run_dir = root / "run"
    result = CliRunner().invoke(device_main, ["train", str(train), "--out", str(run_dir), "--rank", "8", "--heads",
                                              "2", "--epochs", "1", "--batch-size", "48"])
    assert result.exit_code == 0, result.output
    return {"root": root, "train": train, "run": run_dir, "ckpt": run_dir / "best.safetensors"}


def one_line_or_ok(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output


# ---- flags ------------------------------------------------------------------------------------------------

NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**30, 10**30)
TEXTS = NUMBERS.map(str) | st.sampled_from(["nan", "-inf", "1e999", "", "0x10", "1_000", " 3 "])


@SETTINGS
@given(value=TEXTS)
def test_finite_float_accepts_exactly_finite_numbers_in_range(value):
    kind = finite_float(0, 1, max_open=True)
    try:
        got = kind.convert(value, None, None)
    except click.BadParameter:
        return
    assert math.isfinite(got) and 0 <= got < 1


@SETTINGS
@given(flag=st.sampled_from(["--lr", "--min-lr", "--weight-decay", "--warmup", "--label-smoothing", "--grad-clip",
                             "--input-scale", "--val-split", "--seed", "--max-memory", "--batch-size", "--rank"]),
       value=TEXTS)
def test_train_flags_are_checked_before_any_work(fx, tmp_path, flag, value):
    before = snapshot(fx["root"])
    out = tmp_path / "r"
    shutil.rmtree(out, ignore_errors=True)
    result = CliRunner().invoke(device_main, ["train", str(fx["train"]), "--out", str(out), "--rank", "8",
                                              "--heads", "2", "--epochs", "1", "--batch-size", "48", flag, value])
    one_line_or_ok(result)
    assert snapshot(fx["root"]) == before


@SETTINGS
@given(text=st.text(max_size=12))
def test_sizes_parse_or_refuse(text):
    try:
        n = parse_bytes(text)
    except ValueError:
        return
    assert n >= 1


# ---- output -----------------------------------------------------------------------------------------------


@SETTINGS
@given(cells=st.lists(st.text(max_size=10), min_size=1, max_size=5))
def test_csv_round_trips_and_encodes(cells):
    import csv
    import io

    line = csv_line(["7", *cells])  # like predict's rows, which start with the id
    line.encode("utf-8")  # never a lone surrogate
    assert next(csv.reader(io.StringIO(line, newline=""))) == ["7", *map(utf8_safe, cells)]


@SETTINGS
@given(text=st.text(max_size=20))
def test_terminal_text_is_one_printable_line(text):
    shown = terminal_text(text, "utf-8")
    shown.encode("utf-8")
    assert "\n" not in shown and "\x1b" not in shown and "\r" not in shown


@SETTINGS
@given(obj=JSON | st.floats())
def test_json_text_is_strict_json(obj):
    json.loads(json_text(obj), parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


@SETTINGS
@given(dim=st.integers(1, 64), rank_per_head=st.integers(1, 4), heads=st.integers(1, 4), groups=st.integers(1, 3),
       blocks=st.integers(0, 3), classes=st.integers(1, 12))
def test_parameter_count_matches_the_real_arrays(dim, rank_per_head, heads, groups, blocks, classes):
    rank = rank_per_head * heads
    if rank > dim:
        return
    cfg = LAEConfig(dim=dim, tokens=5, groups=groups, num_classes=classes, rank=rank, heads=heads,
                    blocks_per_group=blocks)
    assert parameter_count(cfg) == count_params(init_params(cfg, 0))


# ---- manifest, shard and checkpoint metadata -----------------------------------------------------------------

MANIFEST_FIELDS = ["rows", "complete", "classes", "dim", "dtype", "format_version", "shards", "tokens", "split"]


@SETTINGS
@given(field=st.sampled_from(MANIFEST_FIELDS), value=JSON)
def test_any_manifest_field_value_opens_or_is_refused_in_one_line(fx, tmp_path, field, value):
    directory = tmp_path / "m"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(fx["train"], directory)
    obj = json.loads((directory / MANIFEST_NAME).read_text())
    obj[field] = value
    (directory / MANIFEST_NAME).write_text(json.dumps(obj))
    try:
        fs = FeatureSet(directory, verify=True)
    except FormatError as e:
        assert "\n" not in str(e)
        return
    fs.read(np.arange(len(fs)))


@SETTINGS
@given(key=st.sampled_from(["shard_index", "row_start", "set_identity", "rows", "format"]),
       value=st.text(max_size=10) | st.integers(-3, 100).map(str))
def test_any_shard_metadata_is_checked_against_the_manifest(fx, tmp_path, key, value):
    directory = tmp_path / "s"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(fx["train"], directory)
    reseal_shard(directory, 1, **{key: value})
    truthful = {"shard_index": "1", "row_start": "32"}
    try:
        FeatureSet(directory, verify=True)
    except FormatError as e:
        assert "\n" not in str(e) and key in ("shard_index", "row_start", "set_identity")
        return
    assert key in ("rows", "format") or truthful.get(key) == value  # informative keys, or the truth


@SETTINGS
@given(key=st.sampled_from(["classes", "config", "feature_set", "train_state", "format_version"]), value=JSON)
def test_any_checkpoint_metadata_loads_consistently_or_is_refused(fx, tmp_path, key, value):
    forged = forge_checkpoint(fx["ckpt"], tmp_path / "c.safetensors", **{key: value})
    try:
        ckpt, model, _ = _load_adaptor(str(forged))
    except FormatError as e:
        assert "\n" not in str(e)
        return
    assert len(ckpt.classes) == len(set(ckpt.classes)) == model.cfg.num_classes
    assert model.params["head.weight"].shape[1] == len(ckpt.classes)


# ---- files that change while they are read ------------------------------------------------------------------


@pytest.mark.parametrize("change", ["truncate", "replace", "remove", "rewrite"])
def test_shard_changed_after_opening_is_a_one_line_error(fx, tmp_path, change):
    directory = shutil.copytree(fx["train"], tmp_path / "set")
    fs = FeatureSet(directory, verify=True)
    fs.read(np.arange(10))
    shard = directory / fs.manifest.shards[1].file
    if change == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif change == "replace":
        other = shard.with_name("other")
        shutil.copy(directory / fs.manifest.shards[2].file, other)
        os.replace(other, shard)
    elif change == "remove":
        shard.unlink()
    else:  # same size, same inode, other bytes
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        stat = shard.stat()
        with open(shard, "r+b") as f:
            f.write(bytes(data))
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(FormatError, match="while it was being read") as info:
        fs.read(np.arange(90))
    assert "\n" not in str(info.value) and str(shard) in str(info.value)
    fs.read(np.arange(20))  # rows of the untouched shard still read
