"""Feature sets give back exactly what was written, batch by batch, without loading the whole set."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from format_fixtures import make_manifest, make_rows, shard_file, small_set, write_set
from safetensors.numpy import load_file

from mist.formats import FeatureSet, FeatureSetWriter, sha256_file


def test_round_trip_is_exact_across_shards(tmp_path: Path) -> None:
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, 40)
    written = write_set(tmp_path, manifest, features, labels, ids, shard_rows=16)

    # 40 rows in shards of 16: two full shards and a last partial one.
    assert [s.rows for s in written.shards] == [16, 16, 8]
    assert written.complete and written.rows == 40
    fs = FeatureSet(tmp_path, verify=True)
    assert len(fs) == 40 and fs.row_shape == (2, 5, 4) and fs.num_classes == 3
    # Stored as fp16, so the exact expectation is the fp16 rounding of the input, bit for bit.
    np.testing.assert_array_equal(fs.read(np.arange(40), dtype=np.float16), features.astype(np.float16))
    np.testing.assert_array_equal(fs.read(np.arange(40)), features.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(fs.labels, labels)
    np.testing.assert_array_equal(fs.ids, ids)
    assert fs.labels.dtype == np.int64 and fs.ids.dtype == np.int64


def test_transposed_input_round_trips(tmp_path: Path) -> None:
    # safetensors 0.8.0 silently wrote the wrong bytes for non-contiguous arrays; the writer must not.
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, 24)
    transposed = np.ascontiguousarray(features.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    strided_labels = np.repeat(labels, 2)[::2]
    strided_ids = np.repeat(ids, 2)[::2]
    assert not transposed.flags.c_contiguous and not strided_labels.flags.c_contiguous
    np.testing.assert_array_equal(transposed, features)

    writer = FeatureSetWriter(tmp_path, manifest, shard_rows=24)
    writer.add(transposed, strided_labels, strided_ids)  # exactly one shard: no concatenation in between
    writer.close()

    fs = FeatureSet(tmp_path)
    np.testing.assert_array_equal(fs.read(np.arange(24), dtype=np.float16), features.astype(np.float16))
    np.testing.assert_array_equal(fs.labels, labels)
    np.testing.assert_array_equal(fs.ids, ids)


def test_float32_storage_round_trips_exactly(tmp_path: Path) -> None:
    manifest = make_manifest(dtype="float32")
    features, labels, ids = make_rows(manifest, 21)
    write_set(tmp_path, manifest, features, labels, ids, shard_rows=8)

    fs = FeatureSet(tmp_path, verify=True)
    np.testing.assert_array_equal(fs.read(np.arange(21)), features)
    assert load_file(str(shard_file(tmp_path, 0)))["features"].dtype == np.float32


def test_shards_are_plain_safetensors(tmp_path: Path) -> None:
    # Any safetensors reader (not just ours) sees the three documented tensors with their documented dtypes.
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, 20)
    write_set(tmp_path, manifest, features, labels, ids, shard_rows=16)

    last = load_file(str(shard_file(tmp_path, 1)))
    assert set(last) == {"features", "labels", "ids"}
    assert last["features"].dtype == np.float16 and last["features"].shape == (4, 2, 5, 4)
    np.testing.assert_array_equal(last["features"], features[16:].astype(np.float16))
    np.testing.assert_array_equal(last["labels"], labels[16:])
    np.testing.assert_array_equal(last["ids"], ids[16:])


def test_same_rows_give_byte_identical_shards(tmp_path: Path) -> None:
    # The set's fingerprint is built from shard checksums; it must not change when nothing changed. Three
    # copies, since safetensors' save_file (which varied its metadata order) matched now and then by chance.
    for name in ("a", "b", "c"):
        small_set(tmp_path / name)
    a, b, c = (FeatureSet(tmp_path / name) for name in ("a", "b", "c"))
    assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in b.manifest.shards]
    assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in c.manifest.shards]
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    on_disk = [sha256_file(shard_file(tmp_path / "a", i)) for i in range(3)]
    assert on_disk == [s.sha256 for s in a.manifest.shards]


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, 20)
    write_set(tmp_path / "a", manifest, features, labels, ids)
    features[3, 0, 0, 0] += 1.0
    write_set(tmp_path / "b", manifest, features, labels, ids)
    assert FeatureSet(tmp_path / "a").fingerprint != FeatureSet(tmp_path / "b").fingerprint


# ---- batches and read ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSet, np.ndarray]:
    """40 rows in shards of 16, 16, 8, plus the fp16 features it should return."""
    directory = tmp_path_factory.mktemp("forty")
    manifest = make_manifest()
    features, labels, ids = make_rows(manifest, 40)
    write_set(directory, manifest, features, labels, ids)
    return FeatureSet(directory), features.astype(np.float16).astype(np.float32)


def test_batches_cover_every_row_once_in_order(forty: tuple[FeatureSet, np.ndarray]) -> None:
    fs, features = forty
    batches = list(fs.batches(6))
    assert [len(b[0]) for b in batches] == [6] * 6 + [4]  # the last batch is short, not dropped or padded
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), features)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), fs.labels)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), fs.ids)


def test_shuffled_batches_cover_every_row_once_and_match_their_rows(
        forty: tuple[FeatureSet, np.ndarray]) -> None:
    fs, features = forty
    row_of_id = {int(i): r for r, i in enumerate(fs.ids)}
    seen = []
    for x, y, ids in fs.batches(8, shuffle=True, seed=3, epoch=1):
        rows = np.array([row_of_id[int(i)] for i in ids])
        # Each batch's features and labels belong to the rows its ids name.
        np.testing.assert_array_equal(x, features[rows])
        np.testing.assert_array_equal(y, fs.labels[rows])
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(40))
    assert seen != list(range(40))


def test_shuffle_is_reproducible_per_seed_and_epoch(forty: tuple[FeatureSet, np.ndarray]) -> None:
    fs, _ = forty

    def ids(seed: int, epoch: int) -> list[int]:
        return np.concatenate([b[2] for b in fs.batches(8, shuffle=True, seed=seed, epoch=epoch)]).tolist()

    assert ids(3, 0) == ids(3, 0)
    assert ids(3, 0) != ids(3, 1)
    assert ids(3, 0) != ids(4, 0)
    np.testing.assert_array_equal(fs.epoch_order(True, 3, 0), fs.epoch_order(True, 3, 0))


def test_shuffle_mixes_shards_within_a_batch(forty: tuple[FeatureSet, np.ndarray]) -> None:
    # A shard-local shuffle would keep every batch inside one shard; a global one mixes them.
    fs, _ = forty
    shard_of_row = np.repeat([0, 1, 2], [16, 16, 8])
    order = fs.epoch_order(True, seed=0, epoch=0)
    shards_per_batch = [len(set(shard_of_row[order[b:b + 8]])) for b in range(0, 40, 8)]
    assert max(shards_per_batch) > 1


def test_start_batch_skips_exactly(forty: tuple[FeatureSet, np.ndarray]) -> None:
    fs, _ = forty
    full = list(fs.batches(6, shuffle=True, seed=5, epoch=2))
    resumed = list(fs.batches(6, shuffle=True, seed=5, epoch=2, start_batch=4))
    assert len(resumed) == len(full) - 4
    for got, want in zip(resumed, full[4:]):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert list(fs.batches(6, start_batch=7)) == []


def test_read_returns_rows_in_the_requested_order(forty: tuple[FeatureSet, np.ndarray]) -> None:
    fs, features = forty
    rows = np.array([39, 0, 17, 16, 15, 3, 3, 32, 31, 8])  # unsorted, repeated, across all three shards
    np.testing.assert_array_equal(fs.read(rows), features[rows])
    np.testing.assert_array_equal(fs.read(rows.tolist(), dtype=np.float16), features[rows].astype(np.float16))
    assert fs.read(np.array([], dtype=np.int64)).shape == (0, 2, 5, 4)


@pytest.mark.parametrize("row", [-1, 40])
def test_read_out_of_range_is_an_index_error(forty: tuple[FeatureSet, np.ndarray], row: int) -> None:
    fs, _ = forty
    with pytest.raises(IndexError):
        fs.read(np.array([0, row]))


def test_reading_a_batch_does_not_load_the_set(tmp_path: Path) -> None:
    # 600 rows of (2, 32, 64) fp16 = 8 KiB a row, ~4.9 MB in all; a batch of 8 rows is 64 KiB as float32.
    manifest = make_manifest(tokens=32, prefix_tokens=0, grid=None, dim=64)
    rng = np.random.default_rng(0)
    writer = FeatureSetWriter(tmp_path, manifest, shard_rows=128)
    for begin in range(0, 600, 100):
        writer.add(rng.standard_normal((100, 2, 32, 64)).astype(np.float16),
                   np.zeros(100, np.int64), np.arange(begin, begin + 100))
    writer.close()
    set_bytes = 600 * 2 * 32 * 64 * 2

    tracemalloc.start()
    try:
        fs = FeatureSet(tmp_path)
        _, opened = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        batch = next(fs.batches(8, shuffle=True, seed=1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch[0].shape == (8, 2, 32, 64)
    assert opened < set_bytes / 20, f"opening the set allocated {opened} bytes"
    assert peak < set_bytes / 20, f"reading 8 rows allocated {peak} bytes of a {set_bytes}-byte set"
