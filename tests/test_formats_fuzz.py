"""Fuzz the readers: whatever the bytes, the only exception that escapes is FormatError.

A device reads files that crossed a network from another machine; a malformed one must end in a one-line
message, never in a KeyError, an OverflowError or a crash inside a native library.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from format_fixtures import one_line, shard_file, small_set
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mist.formats import Checkpoint, FeatureSet, FormatError, Manifest, load_checkpoint, save_checkpoint
from mist.formats.safetensors_check import DTYPES, Header, read_header

# No example database: a run depends only on its seed, not on failures replayed from an earlier run on this
# machine. MIST_FUZZ_EXAMPLES raises the example count for a long hunt; the default keeps the file to seconds.
FUZZ = settings(max_examples=int(os.environ.get("MIST_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def only_format_errors(call: Any, *args: Any) -> Any:
    """Run ``call``; success is fine, FormatError must be one line, anything else fails the test."""
    try:
        return call(*args)
    except FormatError as e:
        assert one_line(str(e)), str(e)
        return None


def mutate(safetensors_bytes: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    """Set bytes within the 8-byte prefix and the JSON header, where parsing happens, then maybe truncate."""
    (length,) = struct.unpack("<Q", safetensors_bytes[:8])
    data = bytearray(safetensors_bytes)
    for position, value in flips:
        data[position % (length + 8)] = value
    return bytes(data if cut is None else data[:cut])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_set")
    small_set(directory, n=20, shard_rows=8)
    return directory


# ---- read_header ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
sizes = st.integers(-2, 40) | st.integers(2**31, 2**70)
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPES, "BF16", "f16", "", "F8_E4M3"]) | json_values,
        "shape": st.lists(sizes, max_size=4) | json_values,
        "data_offsets": st.lists(sizes, min_size=0, max_size=3) | json_values,
    },
) | json_values
headers = st.dictionaries(
    st.sampled_from(["features", "labels", "ids", "__metadata__", "param.w"]) | st.text(max_size=6),
    tensor_entries | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_values, max_size=3),
    max_size=4,
)


def write_raw(path: Path, prefix: int, body: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", prefix % 2**64) + body + data)
    return path


@FUZZ
@given(prefix=st.integers(0, 2**64 - 1) | st.integers(0, 400), body=st.binary(max_size=300),
       data=st.binary(max_size=64))
def test_read_header_on_random_bytes(workdir: Path, prefix: int, body: bytes, data: bytes) -> None:
    only_format_errors(read_header, write_raw(workdir / "random.safetensors", prefix, body, data))


@FUZZ
@given(body=st.binary(max_size=40))
def test_read_header_on_files_shorter_than_a_prefix(workdir: Path, body: bytes) -> None:
    path = workdir / "short.safetensors"
    path.write_bytes(body[:12])
    only_format_errors(read_header, path)


@FUZZ
@given(header=headers, data=st.binary(max_size=48), slack=st.integers(-3, 3),
       cut=st.none() | st.integers(0, 200), junk=st.binary(max_size=4))
def test_read_header_on_garbled_json(workdir: Path, header: dict, data: bytes, slack: int,
                                     cut: int | None, junk: bytes) -> None:
    # Structured headers reach the per-tensor checks that random bytes almost never get past.
    body = json.dumps(header).encode()
    if cut is not None:  # garble: splice junk into the JSON text
        body = body[:cut] + junk + body[cut + len(junk):]
    path = write_raw(workdir / "garbled.safetensors", len(body) + max(slack, 0), body, data)
    result = only_format_errors(read_header, path)
    if result is not None:
        assert isinstance(result, Header)
        size = path.stat().st_size
        for entry in result.tensors.values():  # whatever was accepted lies inside the file
            assert 0 <= entry.offset and entry.offset + entry.nbytes <= size


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 10_000))
def test_read_header_on_mutated_valid_shards(workdir: Path, valid_set: Path,
                                             flips: list[tuple[int, int]], cut: int | None) -> None:
    path = workdir / "mutated.safetensors"
    path.write_bytes(mutate(shard_file(valid_set, 0).read_bytes(), flips, cut))
    only_format_errors(read_header, path)


# ---- whole feature sets -----------------------------------------------------------------------------------


@pytest.fixture
def scratch_set(valid_set: Path, workdir: Path) -> Path:
    """A fresh copy of the valid set, for one fuzz test to damage example after example."""
    directory = workdir / "scratch"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(valid_set, directory)
    return directory


def open_and_read(directory: Path) -> None:
    fs = FeatureSet(directory)
    for _ in fs.batches(7, shuffle=True):  # a set that opened must also read
        pass
    fs.verify()


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prefix=st.integers(0, 2**64 - 1) | st.integers(0, 2000), body=st.binary(max_size=2000))
def test_feature_set_with_a_random_shard(scratch_set: Path, prefix: int, body: bytes) -> None:
    write_raw(shard_file(scratch_set, 1), prefix, body, b"")
    only_format_errors(open_and_read, scratch_set)


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_feature_set_with_a_mutated_shard(scratch_set: Path, valid_set: Path,
                                          flips: list[tuple[int, int]]) -> None:
    data = bytearray(shard_file(valid_set, 2).read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    shard_file(scratch_set, 2).write_bytes(bytes(data))
    only_format_errors(open_and_read, scratch_set)


def manifest_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON object (including inside lists), to pick one to damage."""
    paths = [prefix] if prefix else []
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in children:
        paths.extend(manifest_paths(value, (*prefix, key)))
    return paths


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_feature_set_with_a_damaged_manifest(scratch_set: Path, valid_set: Path, data: st.DataObject) -> None:
    original = json.loads((valid_set / "manifest.json").read_text())
    paths = manifest_paths(original)
    obj = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = obj
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier damage removed or replaced this path's parent
    (scratch_set / "manifest.json").write_text(json.dumps(obj))
    only_format_errors(open_and_read, scratch_set)


@FUZZ
@given(value=json_values)
def test_manifest_from_random_json(value: Any) -> None:
    only_format_errors(Manifest.from_json, value, "fuzz")


# ---- checkpoints ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz_ckpt") / "c.safetensors"
    save_checkpoint(path, Checkpoint(params={"w": np.ones((2, 3), np.float32)}, config={"dim": 3},
                                     classes=["a", "b"], feature_set={"fingerprint": "x"},
                                     optimizer={"step": np.array(4)}, train_state={"step": 4}))
    return path.read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 10_000))
def test_load_checkpoint_on_mutated_files(workdir: Path, valid_checkpoint: bytes,
                                          flips: list[tuple[int, int]], cut: int | None) -> None:
    path = workdir / "ckpt.safetensors"
    path.write_bytes(mutate(valid_checkpoint, flips, cut))
    only_format_errors(load_checkpoint, path)


@FUZZ
@given(header=headers, data=st.binary(max_size=48))
def test_load_checkpoint_on_garbled_json(workdir: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path = write_raw(workdir / "garbled_ckpt.safetensors", len(body), body, data)
    only_format_errors(load_checkpoint, path)
