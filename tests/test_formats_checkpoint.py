"""Adaptor checkpoints: one safetensors file that round-trips weights, optimizer state and train state."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from format_fixtures import one_line, shard_file, small_set
from safetensors.numpy import load_file, save_file

from mist.formats import Checkpoint, FormatError, load_checkpoint, save_checkpoint


def make_checkpoint(train_state: dict[str, Any] | None = None) -> Checkpoint:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    return Checkpoint(
        params={"attn.wq": w.T,  # transposed, so not C-contiguous
                "head.w": rng.standard_normal((4, 3)).astype(np.float32),
                "head.b": np.zeros(3, np.float32),
                "scale": np.array(0.5, np.float64)},  # a 0-d weight
        config={"dim": 4, "rank": 2, "pool": "cls", "dropout": 0.0},
        classes=["cat", "dog", "eel"],
        feature_set={"fingerprint": "ab" * 32, "layout": {"dim": 4, "groups": [[0, 1, 2], [3, 4, 5]]}},
        optimizer={"step": np.array(17, np.int64),  # AdamW's counter, as the trainer stores it
                   "m.head.w": rng.standard_normal((4, 3)).astype(np.float32),
                   "v.head.w": np.abs(rng.standard_normal((4, 3))).astype(np.float32)},
        train_state=train_state,
    )


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.params.keys() == b.params.keys() and a.optimizer.keys() == b.optimizer.keys()
    for mine, theirs in ((a.params, b.params), (a.optimizer, b.optimizer)):
        for name, value in mine.items():
            assert theirs[name].dtype == np.asarray(value).dtype, name
            np.testing.assert_array_equal(theirs[name], value, err_msg=name)
    assert (a.config, a.classes, a.feature_set, a.train_state) == (b.config, b.classes, b.feature_set,
                                                                   b.train_state)


def test_round_trip_with_optimizer_and_train_state(tmp_path: Path) -> None:
    rng = np.random.default_rng(1234)
    rng.standard_normal(5)
    train_state = {"step": 17, "epoch": 2, "best_val_acc": 0.8125, "rng": rng.bit_generator.state,
                   "options": {"lr": 1e-3, "batch_size": 64}}
    # PCG64's state and increment are 128-bit integers: JSON must carry them exactly.
    assert train_state["rng"]["state"]["state"] > 2**64
    ckpt = make_checkpoint(train_state)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, ckpt)

    back = load_checkpoint(path)
    assert_same(ckpt, back)
    assert back.resumable
    assert back.optimizer["step"].shape == () and int(back.optimizer["step"]) == 17
    restored = np.random.default_rng()
    restored.bit_generator.state = back.train_state["rng"]
    np.testing.assert_array_equal(restored.standard_normal(8), rng.standard_normal(8))


def test_round_trip_without_train_state(tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    ckpt.optimizer = {}
    save_checkpoint(tmp_path / "best.safetensors", ckpt)
    back = load_checkpoint(tmp_path / "best.safetensors")
    assert_same(ckpt, back)
    assert not back.resumable and back.train_state is None and back.optimizer == {}


def test_checkpoint_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_checkpoint({"step": 1}))
    data = path.read_bytes()
    # 8-byte little-endian header length, then a JSON object, then exactly the tensor bytes: no pickle.
    (length,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{" and length % 8 == 0
    header = json.loads(data[8:8 + length])
    assert header["__metadata__"]["format"] == "mist-adaptor"
    assert json.loads(header["__metadata__"]["classes"]) == ["cat", "dog", "eel"]
    # Any safetensors reader gets the tensors under their documented names.
    tensors = load_file(str(path))
    assert set(tensors) == {"param.attn.wq", "param.head.w", "param.head.b", "param.scale",
                            "optim.step", "optim.m.head.w", "optim.v.head.w"}


def test_same_checkpoint_gives_the_same_bytes(tmp_path: Path) -> None:
    # Metadata key order must not vary between writes (safetensors' own save_file varies it).
    ckpt = make_checkpoint({"step": 3, "epoch": 0})
    for name in ("a", "b", "c"):
        save_checkpoint(tmp_path / name, ckpt)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (tmp_path / "c").read_bytes()


@pytest.mark.parametrize("where, bad", [("params", np.nan), ("params", np.inf), ("optimizer", -np.inf)])
def test_non_finite_values_are_refused_and_the_old_file_kept(tmp_path: Path, where: str, bad: float) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, make_checkpoint({"step": 1}))
    before = path.read_bytes()

    ckpt = make_checkpoint({"step": 2})
    target = getattr(ckpt, where)["head.w" if where == "params" else "m.head.w"]
    target[1, 2] = bad
    with pytest.raises(FormatError, match="non-finite") as info:
        save_checkpoint(path, ckpt)
    assert str(path) in str(info.value) and one_line(str(info.value))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors"]  # no temp file left behind


def test_integer_weights_are_refused_at_save(tmp_path: Path) -> None:
    # load_checkpoint refuses non-float weights, so writing one would only fail later, at resume.
    ckpt = make_checkpoint()
    ckpt.params["head.b"] = np.zeros(3, np.int64)
    with pytest.raises(FormatError, match="floating point"):
        save_checkpoint(tmp_path / "c.safetensors", ckpt)
    assert not (tmp_path / "c.safetensors").exists()


# ---- bad checkpoint files --------------------------------------------------------------------------------


def load_fails(path: Path, *fragments: str) -> None:
    with pytest.raises(FormatError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and one_line(message), message
    for fragment in fragments:
        assert fragment in message, message


def good_metadata(**changes: str) -> dict[str, str]:
    meta = {"format": "mist-adaptor", "format_version": "1", "config": "{}", "classes": '["a"]',
            "feature_set": "{}"}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v != "<drop>"}


def test_feature_shard_is_not_a_checkpoint(tmp_path: Path) -> None:
    small_set(tmp_path, n=4)
    load_fails(shard_file(tmp_path, 0), "not a mist adaptor checkpoint")


def test_plain_safetensors_without_metadata_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"weight": np.zeros(3, np.float32)}, str(path))
    load_fails(path, "not a mist adaptor checkpoint")


@pytest.mark.parametrize("keep", [5, 100, -4])
def test_truncated_checkpoint(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_checkpoint({"step": 1}))
    path.write_bytes(path.read_bytes()[:keep])
    load_fails(path)


def test_checkpoint_from_a_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_file({"param.w": np.zeros(2, np.float32)}, str(path), metadata=good_metadata(format_version="3"))
    load_fails(path, "newer", "upgrade")


@pytest.mark.parametrize("metadata, fragment", [
    (good_metadata(format_version="one"), "format_version"),
    (good_metadata(config="<drop>"), "'config'"),
    (good_metadata(classes="[unquoted]"), "'classes' is not valid JSON"),
    (good_metadata(classes="1" * 5000), "'classes' is not valid JSON"),  # bare ValueError in json.loads
    (good_metadata(classes='{"a": 1}'), "wrong type"),
    (good_metadata(config="[1]"), "wrong type"),
    (good_metadata(train_state="{"), "'train_state' is not valid JSON"),
])
def test_bad_checkpoint_metadata(tmp_path: Path, metadata: dict[str, str], fragment: str) -> None:
    path = tmp_path / "c.safetensors"
    save_file({"param.w": np.zeros(2, np.float32)}, str(path), metadata=metadata)
    load_fails(path, fragment)


@pytest.mark.parametrize("tensors, fragment", [
    ({"param.w": np.zeros(2, np.int32)}, "expected a float type"),
    ({"param.w": np.zeros(2, np.float32), "optim.flag": np.zeros(2, bool)}, "expected a numeric type"),
    ({"param.w": np.zeros(2, np.float32), "extra": np.zeros(2, np.float32)}, "unexpected tensor 'extra'"),
    ({"optim.m.w": np.zeros(2, np.float32)}, "no weights"),
])
def test_bad_checkpoint_tensors(tmp_path: Path, tensors: dict[str, np.ndarray], fragment: str) -> None:
    path = tmp_path / "c.safetensors"
    save_file(tensors, str(path), metadata=good_metadata())
    load_fails(path, fragment)


class _Payload:
    """Unpickling this creates a directory: proof, if the directory appears, that something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pickle_and_pth_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"state_dict": _Payload(marker)})
    raw_pickle = tmp_path / "adaptor.pkl"
    raw_pickle.write_bytes(payload)
    # torch.save's format: a zip archive holding data.pkl.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    pth = tmp_path / "adaptor.pth"
    pth.write_bytes(buffer.getvalue())

    for path in (raw_pickle, pth):
        load_fails(path)
    assert not marker.exists()


def test_loading_never_calls_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    ckpt = make_checkpoint({"step": 1})
    save_checkpoint(path, ckpt)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load_checkpoint used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    assert_same(ckpt, load_checkpoint(path))


def test_missing_checkpoint(tmp_path: Path) -> None:
    load_fails(tmp_path / "absent.safetensors", "missing")
