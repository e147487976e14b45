"""A writer that dies mid-set leaves a set that says so, and a new writer finishes it byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from format_fixtures import make_manifest, make_rows, one_line, shard_file, write_set

from mist.formats import FeatureSet, FeatureSetWriter, FormatError, Manifest
from mist.formats import writer as writer_module

N, SHARD = 45, 8  # five full shards and a last one of 5 rows


def crash_after(directory: Path, rows: int, batch: int = 6) -> tuple[Manifest, tuple[np.ndarray, ...]]:
    """Add ``rows`` rows and abandon the writer without close(), as a kill -9 would."""
    manifest = make_manifest()
    data = make_rows(manifest, N)
    writer = FeatureSetWriter(directory, manifest, shard_rows=SHARD)
    for begin in range(0, rows, batch):
        end = min(begin + batch, rows)
        writer.add(*(a[begin:end] for a in data))
    return manifest, data


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "manifest.json")


def test_abandoned_writer_leaves_an_incomplete_manifest_of_whole_shards(tmp_path: Path) -> None:
    crash_after(tmp_path, 29)  # three full shards (24 rows), 5 rows still buffered

    on_disk = Manifest.load(tmp_path / "manifest.json")
    assert not on_disk.complete
    assert [s.rows for s in on_disk.shards] == [SHARD] * 3 and on_disk.rows == 24
    assert shard_files(tmp_path) == [f"shard-0000{i}.safetensors" for i in range(3)]


def test_every_incomplete_manifest_lists_only_full_shards(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Record every manifest the writer commits: a crash may stop it after any one of them, and each must be
    # resumable. In particular the short last shard must never be listed by an incomplete manifest.
    committed: list[dict[str, Any]] = []
    real = writer_module.atomic_write_json

    def recording(path: Path, obj: Any) -> None:
        committed.append(json.loads(json.dumps(obj)))
        real(path, obj)

    monkeypatch.setattr(writer_module, "atomic_write_json", recording)
    manifest = make_manifest()
    write_set(tmp_path, manifest, *make_rows(manifest, N), shard_rows=SHARD)

    assert committed[-1]["complete"] and committed[-1]["rows"] == N
    for obj in committed[:-1]:
        assert not obj["complete"]
        assert all(s["rows"] == SHARD for s in obj["shards"]), obj["shards"]


def test_resume_removes_stray_and_unlisted_shards(tmp_path: Path) -> None:
    manifest, _ = crash_after(tmp_path, 29)
    # A shard renamed into place after the last manifest commit, and a temp file a kill left mid-write.
    (tmp_path / "shard-00003.safetensors").write_bytes(b"written but never listed")
    (tmp_path / "shard-00004.safetensors.tmp").write_bytes(b"half a shard")
    # A kill during a manifest commit leaves its temp file; the committed manifest.json is what counts.
    (tmp_path / "manifest.json.tmp").write_bytes(b'{"half": ')
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")

    writer = FeatureSetWriter(tmp_path, manifest, shard_rows=SHARD)
    assert writer.rows_done == 24
    shards = [f"shard-0000{i}.safetensors" for i in range(3)]
    assert shard_files(tmp_path) == sorted([*shards, "manifest.json.tmp", "notes.txt"])
    assert unrelated.exists()  # only the writer's own shard names are cleaned up


@pytest.mark.parametrize("crash_at", [0, 7, 8, 29, 40])
def test_resumed_set_equals_an_uninterrupted_one(tmp_path: Path, crash_at: int) -> None:
    manifest = make_manifest()
    data = make_rows(manifest, N)
    whole = write_set(tmp_path / "whole", manifest, *data, shard_rows=SHARD)

    crash_after(tmp_path / "resumed", crash_at)
    (tmp_path / "resumed" / "shard-00009.safetensors.tmp").write_bytes(b"x")
    writer = FeatureSetWriter(tmp_path / "resumed", manifest, shard_rows=SHARD)
    done = writer.rows_done
    assert done == crash_at // SHARD * SHARD
    for begin in range(done, N, 11):  # a different batch size from the first run: shards must not care
        writer.add(*(a[begin:begin + 11] for a in data))
    resumed = writer.close()

    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in whole.shards]
    assert resumed == whole
    for name in shard_files(tmp_path / "whole"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert shard_files(tmp_path / "whole") == shard_files(tmp_path / "resumed")
    fs = FeatureSet(tmp_path / "resumed", verify=True)
    np.testing.assert_array_equal(fs.ids, data[2])


@pytest.mark.parametrize("change, field", [
    ({"dim": 8}, "dim"),
    ({"groups": [[0, 1], [2, 3]]}, "gather.groups"),
    ({"scale": "mean"}, "gather.scale"),
    ({"dtype": "float32"}, "dtype"),
    ({"split": "test"}, "split"),
    ({"classes": ["cat", "dog"]}, "classes"),
])
def test_resume_with_a_different_layout_names_the_field(tmp_path: Path, change: dict[str, Any],
                                                        field: str) -> None:
    crash_after(tmp_path, 20)
    with pytest.raises(FormatError) as info:
        FeatureSetWriter(tmp_path, make_manifest(**change), shard_rows=SHARD)
    message = str(info.value)
    assert f"'{field}'" in message and "manifest.json" in message and one_line(message), message
    assert Manifest.load(tmp_path / "manifest.json").rows == 16  # the partial set is left as it was


def test_resume_with_a_different_shard_size_fails(tmp_path: Path) -> None:
    manifest, _ = crash_after(tmp_path, 20)
    with pytest.raises(FormatError, match="rows per shard"):
        FeatureSetWriter(tmp_path, manifest, shard_rows=SHARD + 1)


def test_resume_refuses_a_corrupt_listed_shard(tmp_path: Path) -> None:
    manifest, _ = crash_after(tmp_path, 20)
    path = shard_file(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch") as info:
        FeatureSetWriter(tmp_path, manifest, shard_rows=SHARD)
    assert str(path) in str(info.value)


def test_complete_set_is_not_reopened_unless_overwrite(tmp_path: Path) -> None:
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, N)
    write_set(tmp_path, manifest, features, labels, ids, shard_rows=SHARD)

    with pytest.raises(FormatError, match="already complete"):
        FeatureSetWriter(tmp_path, manifest, shard_rows=SHARD)
    assert FeatureSet(tmp_path, verify=True).manifest.rows == N  # refused without touching anything

    writer = FeatureSetWriter(tmp_path, manifest, shard_rows=SHARD, overwrite=True)
    assert writer.rows_done == 0 and shard_files(tmp_path) == []
    writer.add(features[:3], labels[:3], ids[:3])
    writer.close()
    assert shard_files(tmp_path) == ["shard-00000.safetensors"]
    np.testing.assert_array_equal(FeatureSet(tmp_path).ids, ids[:3])


def test_overwrite_replaces_an_unreadable_manifest(tmp_path: Path) -> None:
    crash_after(tmp_path, 20)
    (tmp_path / "manifest.json").write_text("{ garbage")
    with pytest.raises(FormatError, match="not valid JSON"):
        FeatureSetWriter(tmp_path, make_manifest(), shard_rows=SHARD)
    writer = FeatureSetWriter(tmp_path, make_manifest(), shard_rows=SHARD, overwrite=True)
    assert writer.rows_done == 0 and shard_files(tmp_path) == []


def test_failure_while_writing_a_shard_leaves_no_temp_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, data = crash_after(tmp_path, 16)

    def dies_halfway(path: Path, tensors: dict, metadata: dict) -> None:
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    writer = FeatureSetWriter(tmp_path, manifest, shard_rows=SHARD)
    monkeypatch.setattr(writer_module, "write_safetensors", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        writer.add(*(a[16:24] for a in data))
    assert shard_files(tmp_path) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert Manifest.load(tmp_path / "manifest.json").rows == 16


def test_empty_set(tmp_path: Path) -> None:
    # A split with no images is still a valid, complete set of zero rows.
    FeatureSetWriter(tmp_path, make_manifest(), shard_rows=SHARD).close()
    fs = FeatureSet(tmp_path, verify=True)
    assert len(fs) == 0 and list(fs.batches(4)) == []
    assert fs.read(np.array([], np.int64)).shape == (0, 2, 5, 4)


def test_add_checks_the_row_shape(tmp_path: Path) -> None:
    # A caller's shape bug is a ValueError at once, not a corrupt shard later.
    writer = FeatureSetWriter(tmp_path, make_manifest(), shard_rows=SHARD)
    with pytest.raises(ValueError, match="per row"):
        writer.add(np.zeros((2, 2, 5, 3)), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="one entry per row"):
        writer.add(np.zeros((2, 2, 5, 4)), np.zeros(3), np.zeros(2))
