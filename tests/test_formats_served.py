"""The bytes of a served answer: a feature shard that round-trips, and one-line refusals of anything else."""

from __future__ import annotations

import numpy as np
import pytest

from mist.formats import FormatError, Manifest
from mist.formats.served import TOKEN_ENV, decode_features, encode_features, read_token, served_layout

LAYOUT = served_layout(Manifest(
    backbone={"name": "test_vit", "weights_sha256": "a" * 64, "weights_source": "file:w.safetensors"},
    groups=[[0, 1, 2]], scale="mean", tokens=5, prefix_tokens=1, grid=[2, 2], dim=8, dtype="float16",
    data_config={"input_size": [3, 64, 64]}, classes=["a", "b"], split="train", dataset={"hash": "x"}))


def features(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *LAYOUT.row_shape)).astype(np.float32)


def test_round_trip_in_the_storage_dtype():
    x = features(3)
    body = encode_features(x, LAYOUT)
    got = decode_features(body, LAYOUT, 3, "srv")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    wide = served_layout(Manifest(**{**LAYOUT.__dict__, "dtype": "float32"}))
    np.testing.assert_array_equal(decode_features(encode_features(x, wide), wide, 3, "srv"), x)


def test_the_served_layout_carries_no_classes_or_dataset():
    assert LAYOUT.classes == [] and LAYOUT.dataset == {"source": "serve"} and LAYOUT.split == "serve"
    assert Manifest.from_json(LAYOUT.to_json()).layout_fingerprint() == LAYOUT.layout_fingerprint()


@pytest.mark.parametrize("mangle, message", [
    (lambda body: body[:-10], "not a safetensors feature shard"),
    (lambda body: b"garbage", "not a safetensors feature shard"),
    (lambda body: b"", "not a safetensors feature shard"),
])
def test_damaged_bodies_are_refused(mangle, message):
    with pytest.raises(FormatError, match=message):
        decode_features(mangle(encode_features(features(2), LAYOUT)), LAYOUT, 2, "srv")


def test_another_layout_or_count_is_refused():
    body = encode_features(features(2), LAYOUT)
    other = served_layout(Manifest(**{**LAYOUT.__dict__, "scale": "none"}))
    with pytest.raises(FormatError, match="layout fingerprint"):
        decode_features(body, other, 2, "srv")
    with pytest.raises(FormatError, match=r"expected float16 \(3, 1, 5, 8\)"):
        decode_features(body, LAYOUT, 3, "srv")
    with pytest.raises(ValueError, match="do not fit"):
        encode_features(np.zeros((1, 1, 4, 8), np.float32), LAYOUT)
    nan = features(1)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(FormatError, match="non-finite"):
        decode_features(encode_features(nan, LAYOUT), LAYOUT, 1, "srv")


@pytest.mark.parametrize("dtype, bound", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_quantised_answers_round_trip_within_half_a_step(dtype, bound):
    layout = served_layout(Manifest(**{**LAYOUT.__dict__, "dtype": dtype}))
    x = features(3)
    got = decode_features(encode_features(x, layout), layout, 3, "srv")
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    # per token: |x - x_hat| <= scale / 2, and the fp16 scale is at most one fp16 step above absmax / qmax
    assert np.all(np.abs(got - x) <= bound * absmax * (1 + 2**-9) + 1e-7)


def test_a_quantised_answer_with_a_bad_scale_is_refused():
    from safetensors.numpy import load, save

    layout = served_layout(Manifest(**{**LAYOUT.__dict__, "dtype": "int8"}))
    tensors = load(encode_features(features(2), layout))
    tensors["scales"][1, 0, 2] = 0
    body = save(tensors, metadata={"format": "mist-feature-shard", "set_layout": layout.layout_fingerprint(),
                                   "shard_index": "0"})
    with pytest.raises(FormatError, match="zero scale|scale"):
        decode_features(body, layout, 2, "srv")


def test_one_token_rule_for_server_and_client(tmp_path, monkeypatch):
    """The first line of --token-file, else $MIST_SERVE_TOKEN, else no token; at least 16 printable ASCII
    characters without spaces, or one line naming where the token came from."""
    good = "a-test-token-0123456789abcdef"
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, f"  {good} \n")
    assert read_token(None) == good
    path = tmp_path / "token"
    path.write_text(f"{good}\nsecond line\n")
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert read_token(str(path)) == good  # the file wins over the environment
    for value, message in (("short", "at least 16 characters"), ("", "at least 16 characters"),
                           ("x" * 16 + " y", "printable ASCII without spaces"),
                           ("é" * 16, "printable ASCII without spaces")):
        monkeypatch.setenv(TOKEN_ENV, value)
        with pytest.raises(FormatError, match=message) as e:
            read_token(None)
        assert str(e.value).startswith(f"${TOKEN_ENV}: ") and "\n" not in str(e.value)
        path.write_text(value + "\n")
        with pytest.raises(FormatError, match=message) as e:
            read_token(str(path))
        assert str(e.value).startswith(f"--token-file {path}: ") and "\n" not in str(e.value)
    with pytest.raises(FormatError, match="unreadable"):
        read_token(str(tmp_path / "missing"))


def test_both_sides_turn_a_refused_token_into_their_own_one_line_error(tmp_path, monkeypatch):
    import click

    from mist.cloud.errors import CloudError
    from mist.cloud.serve_guard import read_token as server_token
    from mist.device.remote import read_token as client_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "token"
    path.write_text("short\n")
    with pytest.raises(FormatError) as rule:
        read_token(str(path))
    for side, error in ((server_token, CloudError), (client_token, click.ClickException)):
        with pytest.raises(error) as e:
            side(str(path))
        assert str(e.value) == str(rule.value)
        assert side(None) is None
