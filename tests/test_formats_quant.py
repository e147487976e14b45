"""int8 and int4 feature sets: the error bound, int4 packing of odd sizes, and damaged scales or shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from format_fixtures import edit_manifest, make_manifest, make_rows, one_line, shard_file, write_set

from mist.formats import FeatureSet, FeatureSetWriter, FormatError, Manifest, manifest
from mist.formats.feature_set import sha256_file
from mist.formats.quant import (
    SCHEMES,
    QuantError,
    bytes_per_row,
    decode_features,
    dequantise_reference,
    encode_features,
    pack_int4,
    quantise,
    unpack_int4,
    unpack_int4_reference,
)
from mist.formats.safetensors_check import read_header, write_safetensors

QUANTISED = ("int8", "int4")


def check_bound(x: np.ndarray, dtype: str) -> np.ndarray:
    """Encode and decode ``x``; assert the SPEC §12 bound element by element; return the decoded batch."""
    stored = encode_features(x, dtype)
    back = decode_features(stored, dtype, x.shape[1:])
    assert back.dtype == np.float32 and back.shape == x.shape
    if dtype == "float32":
        assert np.array_equal(back, x)
    elif dtype == "float16":
        assert np.allclose(back, x, rtol=2.0 ** -11, atol=2.0 ** -24)
    else:
        scale = stored["scales"].astype(np.float32)[..., None]
        qmax = SCHEMES[dtype].qmax
        absmax = np.abs(x).max(axis=-1, keepdims=True)
        assert (scale * qmax >= absmax).all()  # the scale is rounded up: the clamp never cuts a value
        assert (np.abs(x - back) <= scale * (0.5 + 2.0 ** -16)).all()
    return back


@pytest.mark.parametrize("dtype", ["float32", "float16", *QUANTISED])
def test_round_trip_within_the_bound_on_random_features(dtype: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 9, 33)).astype(np.float32)
    x[0] *= 1e3  # large and tiny tokens: each gets its own scale
    x[1] *= 1e-6
    x[2, 0, 4] = 0.0  # an all-zero token
    x[3, 1, 2, 5] = 40.0  # an outlier channel
    back = check_bound(x, dtype)
    assert np.all(back[2, 0, 4] == 0)
    if dtype in QUANTISED:
        relative = np.linalg.norm(back - x) / np.linalg.norm(x)
        assert relative < {"int8": 0.01, "int4": 0.15}[dtype], relative


def test_scales_are_fp16_and_never_zero() -> None:
    x = np.zeros((1, 1, 3, 4), np.float32)
    x[0, 0, 1] = 1e-9  # absmax / 127 is below the smallest fp16 subnormal: rounded up to it, not to 0
    x[0, 0, 2] = 127.0  # absmax / 127 = 1 exactly
    codes, scale = quantise(x, SCHEMES["int8"])
    assert scale.dtype == np.float16 and (scale > 0).all()
    assert scale[0, 0].tolist() == [1.0, float(np.float16(2.0 ** -24)), 1.0]
    assert codes[0, 0, 2].tolist() == [127] * 4


def test_quantisation_refuses_what_it_cannot_store() -> None:
    with pytest.raises(QuantError, match="NaN or inf"):
        encode_features(np.full((1, 1, 2, 2), np.nan, np.float32), "int8")
    with pytest.raises(QuantError, match="too large for an fp16 scale"):
        encode_features(np.full((1, 1, 2, 2), 1e7, np.float32), "int4")


@pytest.mark.parametrize("row_shape", [(1, 1, 1), (1, 3, 5), (2, 7, 3), (3, 5, 8), (1, 49, 192)])
def test_int4_packing_of_odd_token_and_channel_counts(row_shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(row_shape))
    codes = rng.integers(-7, 8, size=(5, *row_shape)).astype(np.int8)
    values = int(np.prod(row_shape))
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.shape == (5, (values + 1) // 2)
    if values % 2:
        assert (packed[:, -1] >> 4 == 0).all()  # the unused high nibble of an odd count is 0
    flat = codes.reshape(5, -1)
    assert np.array_equal(unpack_int4_reference(packed, values), flat)
    assert np.array_equal(unpack_int4(packed, values), flat)  # the fast path equals the reference


def test_fast_decode_equals_the_reference_formula() -> None:
    x = np.random.default_rng(1).standard_normal((4, 2, 5, 7)).astype(np.float32)
    for dtype in QUANTISED:
        stored = encode_features(x, dtype)
        codes = stored["features"] if dtype == "int8" else unpack_int4_reference(stored["features"], 70)
        reference = dequantise_reference(codes.reshape(x.shape), stored["scales"])
        assert np.array_equal(decode_features(stored, dtype, x.shape[1:]), reference)


def test_bytes_per_row() -> None:
    shape = (1, 49, 192)  # Lite0 stage 5
    assert [bytes_per_row(d, shape) for d in ("float32", "float16", "int8", "int4")] == [37632, 18816, 9506, 4802]
    assert bytes_per_row("int4", (1, 3, 5)) == 8 + 6


# ---- feature sets on disk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", QUANTISED)
@pytest.mark.parametrize("row_shape", [(2, 5, 4), (1, 3, 5), (2, 7, 3)])
def test_set_round_trip_with_odd_sizes(tmp_path: Path, dtype: str, row_shape: tuple[int, int, int]) -> None:
    k, t, d = row_shape
    m = make_manifest(dtype=dtype, groups=[[0]] if k == 1 else [[0, 1, 2], [3, 4, 5]], tokens=t, dim=d,
                      prefix_tokens=0, grid=None)
    features, labels, ids = make_rows(m, 40)
    write_set(tmp_path, m, features, labels, ids)
    fs = FeatureSet(tmp_path, verify=True)
    assert fs.manifest.dtype == dtype and fs.row_shape == row_shape
    everything = fs.read(np.arange(40))
    assert np.array_equal(everything, decode_features(encode_features(features, dtype), dtype, row_shape))
    check_bound(features, dtype)
    # Unsorted, repeated rows across shards, into a caller's reused buffer, and as float64.
    rows = np.array([39, 0, 17, 17, 5, 33, 16])
    buffer = np.full((len(rows), *row_shape), np.nan, np.float32)
    assert fs.read(rows, out=buffer) is buffer
    assert np.array_equal(buffer, everything[rows])
    assert np.array_equal(fs.read(rows, dtype=np.float64), everything[rows].astype(np.float64))
    batches = list(fs.batches(9, shuffle=True, seed=2))
    order = fs.epoch_order(True, 2, 0)
    assert np.array_equal(np.concatenate([b[0] for b in batches]), everything[order])


def test_manifest_records_the_scheme_and_the_version(tmp_path: Path) -> None:
    write_set(tmp_path / "f16", make_manifest(), *make_rows(make_manifest(), 20))
    write_set(tmp_path / "i4", make_manifest(dtype="int4"), *make_rows(make_manifest(), 20))
    plain = json.loads((tmp_path / "f16" / "manifest.json").read_text())
    quantised = json.loads((tmp_path / "i4" / "manifest.json").read_text())
    assert plain["format_version"] == 1 and "quantization" not in plain  # older readers still read float sets
    assert quantised["format_version"] == 2
    assert quantised["quantization"] == {"scheme": "absmax-per-token", "bits": 4, "qmax": 7,
                                         "scale_dtype": "float16", "scale_rounding": "up",
                                         "rounding": "nearest-even",
                                         "packing": "two-per-byte-low-nibble-first-offset-8"}
    assert list(quantised).index("quantization") == list(quantised).index("dtype") + 1
    header = read_header(shard_file(tmp_path / "i4", 0))
    assert {n: (str(e.dtype), e.shape) for n, e in header.tensors.items()} == {
        "features": ("uint8", (16, 20)), "scales": ("float16", (16, 2, 5)), "labels": ("int64", (16,)),
        "ids": ("int64", (16,))}


def test_an_older_reader_refuses_a_quantised_set_cleanly(tmp_path: Path, monkeypatch) -> None:
    write_set(tmp_path, make_manifest(dtype="int8"), *make_rows(make_manifest(), 20))
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 1)  # what a version-1 mist reads
    with pytest.raises(FormatError) as info:
        FeatureSet(tmp_path)
    assert "format version 2 is newer than this mist reads (1); upgrade mist" in str(info.value)


def test_resumed_int4_set_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    m = make_manifest(dtype="int4", dim=3)
    features, labels, ids = make_rows(m, 40)
    write_set(tmp_path / "clean", m, features, labels, ids)
    partial = FeatureSetWriter(tmp_path / "killed", m, shard_rows=16)
    partial.add(features[:20], labels[:20], ids[:20])  # one shard committed, 4 rows lost with the process
    resumed = FeatureSetWriter(tmp_path / "killed", m, shard_rows=16)
    assert resumed.rows_done == 16
    resumed.add(features[16:], labels[16:], ids[16:])
    resumed.close()
    digests = [[sha256_file(p) for p in sorted((tmp_path / name).glob("shard-*"))] for name in ("clean", "killed")]
    assert digests[0] == digests[1] and len(digests[0]) == 3


# ---- bad input ----------------------------------------------------------------------------------------------


def int8_set(directory: Path, **overrides: Any) -> Manifest:
    m = make_manifest(dtype="int8", **overrides)
    return write_set(directory, m, *make_rows(m, 40))


def opening_fails(directory: Path, *fragments: str, verify: bool = False) -> str:
    with pytest.raises(FormatError) as info:
        FeatureSet(directory, verify=verify)
    message = str(info.value)
    assert one_line(message), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard with ``change(tensors)`` applied, keeping its layout valid (only values change)."""
    header = read_header(path)
    raw = path.read_bytes()
    tensors = {name: np.frombuffer(raw[e.offset:e.offset + e.nbytes], e.dtype).reshape(e.shape).copy()
               for name, e in header.tensors.items()}
    change(tensors)
    write_safetensors(path, tensors, header.metadata)


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "inf"), (0.0, "zero"), (-0.5, "negative")])
@pytest.mark.parametrize("verify", [False, True])
def test_corrupt_scales_are_refused(tmp_path: Path, bad: float, what: str, verify: bool) -> None:
    int8_set(tmp_path)
    shard = shard_file(tmp_path, 1)

    def damage(tensors: dict[str, np.ndarray]) -> None:
        tensors["scales"][3, 1, 2] = bad

    rewrite_shard(shard, damage)
    if verify:  # the checksum catches it first
        opening_fails(tmp_path, str(shard), "checksum mismatch", verify=True)
    else:
        opening_fails(tmp_path, str(shard), f"holds a {what} scale (row 3, group 1, token 2)")


def test_packed_array_of_the_wrong_length(tmp_path: Path) -> None:
    m = make_manifest(dtype="int4")
    write_set(tmp_path, m, *make_rows(m, 40))
    shard = shard_file(tmp_path, 0)

    def shorten(tensors: dict[str, np.ndarray]) -> None:
        tensors["features"] = tensors["features"][:, :-1].copy()

    rewrite_shard(shard, shorten)
    opening_fails(tmp_path, str(shard), "tensor 'features' has shape (16, 19), expected (16, 20)")


def test_missing_scales(tmp_path: Path) -> None:
    int8_set(tmp_path)
    shard = shard_file(tmp_path, 2)
    rewrite_shard(shard, lambda tensors: tensors.pop("scales"))
    opening_fails(tmp_path, str(shard), "tensor 'scales' is missing")


def test_shards_in_a_dtype_the_manifest_does_not_declare(tmp_path: Path) -> None:
    write_set(tmp_path, make_manifest(), *make_rows(make_manifest(), 40))  # float16 shards

    def claim_int8(obj: dict[str, Any]) -> None:
        obj.update(format_version=2, dtype="int8", quantization=SCHEMES["int8"].describe())

    edit_manifest(tmp_path, claim_int8)
    opening_fails(tmp_path, str(shard_file(tmp_path, 0)), "tensor 'features' has dtype F16, expected I8")


@pytest.mark.parametrize("edit, fragment", [
    (lambda o: o.update(dtype="int3"), "field 'dtype' must be one of"),
    (lambda o: o.update(format_version=1), "field 'dtype' 'int8' needs format_version 2"),
    (lambda o: o.pop("quantization"), "field 'quantization' is missing"),
    (lambda o: o["quantization"].update(qmax=100), "field 'quantization' does not describe the int8 scheme"),
])
def test_manifest_scheme_damage(tmp_path: Path, edit, fragment: str) -> None:
    int8_set(tmp_path)
    edit_manifest(tmp_path, edit)
    opening_fails(tmp_path, "manifest.json", fragment)


def test_writer_casts_any_float_input(tmp_path: Path) -> None:
    m = make_manifest(dtype="int8")
    features, labels, ids = make_rows(m, 20)
    write_set(tmp_path / "a", m, features, labels, ids)
    write_set(tmp_path / "b", replace(m), features.astype(np.float64), labels, ids)
    assert sha256_file(shard_file(tmp_path / "a", 0)) == sha256_file(shard_file(tmp_path / "b", 0))
