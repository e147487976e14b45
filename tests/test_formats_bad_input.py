"""Every kind of bad feature set gives one FormatError line that names the file, never a traceback."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from format_fixtures import edit_manifest, make_manifest, make_rows, one_line, shard_file, small_set
from safetensors.numpy import save_file

from mist.formats import FORMAT_VERSION, FeatureSet, FeatureSetWriter, FormatError, Manifest
from mist.formats.safetensors_check import MAX_HEADER_BYTES, read_header


def open_fails(directory: Path, names: Path | str, *fragments: str, verify: bool = False) -> str:
    """Open the set, expect a FormatError whose one-line message holds ``names`` and every fragment."""
    with pytest.raises(FormatError) as info:
        FeatureSet(directory, verify=verify)
    message = str(info.value)
    assert one_line(message), message
    assert str(names) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def forge_header(directory: Path, edit: Callable[[bytes], bytes]) -> Path:
    """Write a small set, then replace its first shard's JSON header with ``edit(header)`` (the length prefix
    follows the new header; the tensor bytes stay as they are)."""
    small_set(directory)
    path = shard_file(directory, 0)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    forged = edit(data[8:8 + n])
    path.write_bytes(struct.pack("<Q", len(forged)) + forged + data[8 + n:])
    return path


def replace_shard(directory: Path, index: int, features: np.ndarray, labels: np.ndarray,
                  ids: np.ndarray) -> Path:
    """Overwrite a shard with other tensors, written by the safetensors library, not the code under test."""
    path = shard_file(directory, index)
    save_file({"features": features, "labels": labels, "ids": ids}, str(path))
    return path


# ---- shard damage ----------------------------------------------------------------------------------------


def test_truncated_shard(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:-10])
    open_fails(tmp_path, path, "truncated")


def test_shard_truncated_inside_its_header(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 0)
    path.write_bytes(path.read_bytes()[:5])
    open_fails(tmp_path, path, "truncated")


def test_padded_shard(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 2)
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    open_fails(tmp_path, path, "padded")


def test_flipped_byte_in_tensor_data_fails_verification(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: the header still checks out
    path.write_bytes(bytes(data))

    fs = FeatureSet(tmp_path)  # headers are fine, and hashing every shard on every open is opt-in
    with pytest.raises(FormatError, match="checksum mismatch") as info:
        fs.verify()
    assert str(path) in str(info.value) and one_line(str(info.value))
    open_fails(tmp_path, path, "checksum mismatch", verify=True)


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 0)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 100) + data[8:])
    open_fails(tmp_path, path, "larger than the file")


def test_header_length_above_the_cap(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 0)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + data[8:])
    open_fails(tmp_path, path, "cap")


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = forge_header(tmp_path, lambda header: b"\xff" + b"x" * (len(header) - 1))
    open_fails(tmp_path, path, "not valid JSON")


def test_header_that_is_json_but_not_an_object(tmp_path: Path) -> None:
    path = forge_header(tmp_path, lambda header: b"[1, 2]".ljust(len(header)))
    open_fails(tmp_path, path, "not a JSON object")


def test_header_offsets_outside_the_file(tmp_path: Path) -> None:
    # A hand-edited offset that still parses: the data region it names does not exist.
    def move_ids_past_the_end(header: bytes) -> bytes:
        # ids come first (16 int64 = 128 bytes): their [0, 128] becomes [0, 9128], past the end of the file.
        forged = header.decode().replace('"data_offsets":[0,', '"data_offsets":[0,9', 1).encode()
        assert b'"ids":{"dtype":"I64","shape":[16],"data_offsets":[0,9128]}' in forged
        return forged

    path = forge_header(tmp_path, move_ids_past_the_end)
    open_fails(tmp_path, path, "'ids'", "truncated")


@pytest.mark.parametrize("tensor, dtype, expected", [
    ("features", np.float64, "F64"),
    ("features", np.float32, "F32"),  # the manifest says float16; float32 would be read as garbage
    ("labels", np.int32, "I32"),
    ("ids", np.float64, "F64"),
])
def test_wrong_dtype(tmp_path: Path, tensor: str, dtype: type, expected: str) -> None:
    manifest = small_set(tmp_path)
    features, labels, ids = make_rows(manifest, 16)
    tensors = {"features": features.astype(np.float16), "labels": labels, "ids": ids}
    tensors[tensor] = tensors[tensor].astype(dtype)
    path = replace_shard(tmp_path, 0, **tensors)
    open_fails(tmp_path, path, repr(tensor), f"dtype {expected}")


@pytest.mark.parametrize("shape", [
    (15, 2, 5, 4),  # rows disagree with the manifest's row count for this shard
    (16, 3, 5, 4),  # k
    (16, 2, 6, 4),  # T
    (16, 2, 5, 8),  # d
    (16, 2, 5),  # rank
])
def test_wrong_feature_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    small_set(tmp_path)
    rows = shape[0]
    path = replace_shard(tmp_path, 0, np.zeros(shape, np.float16), np.zeros(rows, np.int64),
                         np.arange(rows, dtype=np.int64))
    open_fails(tmp_path, path, "'features'", "shape")


def test_wrong_label_count(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = replace_shard(tmp_path, 0, np.zeros((16, 2, 5, 4), np.float16), np.zeros(15, np.int64),
                         np.arange(16, dtype=np.int64))
    open_fails(tmp_path, path, "'labels'", "shape")


def test_missing_tensor(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 0)
    save_file({"features": np.zeros((16, 2, 5, 4), np.float16), "labels": np.zeros(16, np.int64)}, str(path))
    open_fails(tmp_path, path, "'ids'", "missing")


def test_missing_shard(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 1)
    path.unlink()
    open_fails(tmp_path, path, "missing")


def test_shard_that_is_a_directory(tmp_path: Path) -> None:
    small_set(tmp_path)
    path = shard_file(tmp_path, 1)
    path.unlink()
    path.mkdir()
    open_fails(tmp_path, path, "directory")


# ---- manifest damage --------------------------------------------------------------------------------------


def test_manifest_from_a_newer_format_version(tmp_path: Path) -> None:
    small_set(tmp_path)

    def newer(obj: dict[str, Any]) -> None:
        obj["format_version"] = FORMAT_VERSION + 1
        obj["something_new"] = {"v_next": True}
        del obj["dim"]  # a v2 manifest may lack v1 fields: the version must be checked before them

    edit_manifest(tmp_path, newer)
    open_fails(tmp_path, tmp_path / "manifest.json", "newer", "upgrade")


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        for key in keys[:-1]:
            obj = obj[key]
        del obj[keys[-1]]
    return edit


def _set(value: Any, *keys: str | int) -> Callable[[dict[str, Any]], None]:
    def edit(obj: Any) -> None:
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, field", [
    (_drop("dim"), "dim"),
    (_drop("backbone", "weights_sha256"), "backbone.weights_sha256"),
    (_drop("tokens", "grid"), "tokens.grid"),
    (_drop("complete"), "complete"),
    (_drop("shards", 0, "sha256"), "shards[0].sha256"),
    (_set("5", "tokens", "count"), "tokens.count"),
    (_set(True, "dim"), "dim"),
    (_set(4.0, "dim"), "dim"),
    (_set(0, "dim"), "dim"),
    (_set("bfloat16", "dtype"), "dtype"),
    (_set([], "gather", "groups"), "gather.groups"),
    (_set([[0], [1, -2]], "gather", "groups"), "gather.groups[1]"),
    (_set("max", "gather", "scale"), "gather.scale"),
    (_set(6, "tokens", "prefix"), "tokens.prefix"),
    (_set([2, 0], "tokens", "grid"), "tokens.grid"),
    (_set("cat,dog", "classes"), "classes"),
    (_set(["cat", 1], "classes"), "classes"),
    (_set("yes", "complete"), "complete"),
    (_set(-1, "shards", 0, "rows"), "shards[0].rows"),
    (_set("abc", "shards", 0, "sha256"), "shards[0].sha256"),
    (_set(41, "rows"), "rows"),
    (_set([], "backbone"), "backbone"),
    (_set("other-format", "format"), "format"),
    (_set(0, "format_version"), "format_version"),
])
def test_manifest_field_errors_name_the_field(tmp_path: Path, edit: Callable, field: str) -> None:
    small_set(tmp_path)
    edit_manifest(tmp_path, edit)
    open_fails(tmp_path, tmp_path / "manifest.json", f"field '{field}'")


@pytest.mark.parametrize("name", ["../shard-00000.safetensors", "sub/shard.safetensors",
                                  "sub\\shard.safetensors", "/etc/passwd", "..", "", "shard\0.safetensors"])
def test_shard_file_name_must_stay_inside_the_set(tmp_path: Path, name: str) -> None:
    small_set(tmp_path)
    edit_manifest(tmp_path, _set(name, "shards", 0, "file"))
    open_fails(tmp_path, tmp_path / "manifest.json", "field 'shards[0].file'")


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2, 3]", "null", '{"format": "mist-feature-set"'])
def test_manifest_that_is_not_a_json_object(tmp_path: Path, text: str) -> None:
    small_set(tmp_path)
    (tmp_path / "manifest.json").write_text(text)
    open_fails(tmp_path, tmp_path / "manifest.json")


def test_manifest_with_an_absurd_integer(tmp_path: Path) -> None:
    # json.loads raises a bare ValueError (not JSONDecodeError) for integers over 4300 digits.
    small_set(tmp_path)
    text = (tmp_path / "manifest.json").read_text().replace('"dim": 4', '"dim": ' + "4" * 5000)
    (tmp_path / "manifest.json").write_text(text)
    open_fails(tmp_path, tmp_path / "manifest.json", "not valid JSON")


def test_manifest_nested_too_deep(tmp_path: Path) -> None:
    small_set(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    open_fails(tmp_path, tmp_path / "manifest.json", "not valid JSON")


def test_manifest_that_is_not_utf8(tmp_path: Path) -> None:
    small_set(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    open_fails(tmp_path, tmp_path / "manifest.json")


def test_missing_manifest(tmp_path: Path) -> None:
    open_fails(tmp_path, tmp_path / "manifest.json", "missing manifest")


def test_not_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    open_fails(path, path, "not a feature-set directory")
    open_fails(tmp_path / "absent", tmp_path / "absent", "not a feature-set directory")


def test_incomplete_set_needs_allow_incomplete(tmp_path: Path) -> None:
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, 40)
    writer = FeatureSetWriter(tmp_path, manifest, shard_rows=16)
    writer.add(features, labels, ids)  # two shards committed, 8 rows buffered, never closed

    open_fails(tmp_path, tmp_path, "incomplete", "32 rows")
    fs = FeatureSet(tmp_path, allow_incomplete=True)
    assert len(fs) == 32
    np.testing.assert_array_equal(fs.ids, ids[:32])


def test_manifest_errors_from_json_objects_name_the_source() -> None:
    # Manifest.from_json is how a checkpoint's embedded layout is read: its errors name where it came from.
    body = make_manifest().to_json()
    del body["split"]
    with pytest.raises(FormatError, match=r"^ckpt\.safetensors \(layout\): field 'split' is missing$"):
        Manifest.from_json(body, source="ckpt.safetensors (layout)")
    with pytest.raises(FormatError, match="field '<root>' must be an object"):
        Manifest.from_json([1, 2], source="x")


# ---- read_header on hand-made files ----------------------------------------------------------------------


def raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, data, fragment", [
    (b'{"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}', b"\0\0", "unsupported dtype"),
    (b'{"a": {"dtype": ["F16"], "shape": [1], "data_offsets": [0, 2]}}', b"\0\0", "unsupported dtype"),
    (b'{"a": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}}', b"\0\0", "shape"),
    (b'{"a": {"dtype": "F16", "shape": [true], "data_offsets": [0, 2]}}', b"\0\0", "shape"),
    (b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [2, 0]}}', b"\0\0", "reversed"),
    (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', b"\0\0", "truncated"),
    (b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0]}}', b"\0\0", "data_offsets"),
    (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 2]}}', b"\0\0", "needs 4 bytes"),
    (b'{"a": [1]}', b"", "not an object"),
    (b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},'
     b' "b": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}', b"\0\0", "overlap"),
    (b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [2, 4]}}', b"\0" * 4, "gaps"),
    (b'{"__metadata__": {"k": 1}}', b"", "__metadata__"),
    (b'{"__metadata__": 0}', b"", "__metadata__"),  # safetensors refuses a falsy non-object too
    (b'{"__metadata__": []}', b"", "__metadata__"),
    (b'{"a": ' + b"1" * 5000 + b"}", b"", "not valid JSON"),  # json.loads: bare ValueError
    (b"[" * 100_000 + b"]" * 100_000, b"", "not valid JSON"),  # json.loads: RecursionError
])
def test_read_header_rejects(tmp_path: Path, header: bytes, data: bytes, fragment: str) -> None:
    path = raw_file(tmp_path / "x.safetensors", header, data)
    with pytest.raises(FormatError) as info:
        read_header(path)
    assert str(path) in str(info.value) and fragment in str(info.value) and one_line(str(info.value))


def test_read_header_accepts_null_metadata_and_empty_tensors(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "x.safetensors",
                    b'{"__metadata__": null, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},'
                    b' "a": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}}  ', b"\0" * 8)
    header = read_header(path)
    assert header.metadata == {}
    assert header.tensors["a"].shape == () and header.tensors["a"].offset == 8 + path.stat().st_size - 16
    assert header.tensors["e"].nbytes == 0


def test_read_header_on_an_unreadable_name(tmp_path: Path) -> None:
    # ENAMETOOLONG is an OSError that none of the specific cases covers.
    path = tmp_path / ("x" * 300)
    with pytest.raises(FormatError) as info:
        read_header(path)
    assert one_line(str(info.value))
