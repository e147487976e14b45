"""Signed feature sets and adaptors, through the real CLIs in subprocesses (formats/signing.py, ship/trust.py).

Real keys (`keygen`), real sets (sklearn digits), real files edited the way an attacker with write access to a
bucket or a stick would: a shard replaced and its line in the manifest recomputed. Every refusal is one line,
exit 1 or 2, no traceback, and every valid file byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from digits_sets import write_digits_set
from hostile import assert_one_line_error, forge_tensors, run_cli, snapshot

from mist.formats import FormatError, load_checkpoint
from mist.formats.manifest import MANIFEST_NAME

pytest.importorskip("nacl.signing")

TRAIN = ["--rank", "8", "--heads", "2", "--epochs", "2", "--batch-size", "64"]


def ok(result):
    assert result.code == 0 and "Traceback" not in result.stderr, result
    return result


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signed")
    keys = root / "keys"
    keys.mkdir()
    for name in ("old", "new", "stranger"):
        ok(run_cli("cloud", "keygen", keys / name, "--comment", name))
    train = write_digits_set(root / "train", slice(0, 300), shard_rows=128)
    test = write_digits_set(root / "test", slice(300, 400), split="test")
    unsigned = write_digits_set(root / "unsigned", slice(0, 300), shard_rows=128)
    ok(run_cli("cloud", "sign", train, "--key", keys / "old"))
    ok(run_cli("cloud", "sign", test, "--key", keys / "new"))  # a rotation: the test set comes later
    run_dir = root / "run"
    ok(run_cli("device", "train", train, "--out", run_dir, *TRAIN))
    ok(run_cli("device", "export", run_dir, "--out", root / "owner.safetensors", "--sign-key", keys / "new"))
    ok(run_cli("device", "export", run_dir, "--out", root / "stranger.safetensors", "--sign-key", keys / "stranger"))
    trusted = root / "trusted"  # the device's folder of public keys: both of the owner's, after the rotation
    trusted.mkdir()
    for name in ("old", "new"):
        shutil.copy(keys / f"{name}.pub", trusted / f"{name}.pub")
    return {"root": root, "keys": keys, "train": train, "test": test, "unsigned": unsigned, "run": run_dir,
            "trusted": trusted}


def require(fx, *keys: Path) -> list:
    return ["--signatures", "require", *[a for k in (keys or (fx["trusted"],)) for a in ("--trusted-key", k)]]


def tamper(directory: Path) -> Path:
    """What a writer to the bucket does: change a shard and recompute its sha256 in the manifest."""
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    shard = directory / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x40  # a feature of the shard's last row
    shard.write_bytes(bytes(data))
    manifest["shards"][1]["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return directory


def test_keygen_writes_a_private_secret_and_never_overwrites(signed, tmp_path):
    secret = signed["keys"] / "old"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.read_text().startswith("mist-ed25519-secret ") and "old" in secret.read_text()
    assert (signed["keys"] / "old.pub").read_text().startswith("mist-ed25519 ")
    before = snapshot(signed["keys"])
    assert_one_line_error(run_cli("cloud", "keygen", secret), 1, "already exists")
    # a public key is not a signing key, and a secret key is not a trusted one
    assert_one_line_error(run_cli("cloud", "sign", signed["unsigned"], "--key", signed["keys"] / "old.pub"), 1,
                          "that is a public key")
    assert_one_line_error(run_cli("device", "verify", signed["train"], "--trusted-key", secret), 1,
                          "keep this one off the device")
    assert snapshot(signed["keys"]) == before


def test_signed_set_verifies_and_names_its_key(signed):
    result = ok(run_cli("device", "verify", signed["train"], *require(signed)))
    from mist.formats.signing import read_public_keys

    key_id = read_public_keys([signed["keys"] / "old.pub"])[0].key_id
    assert f"signed by trusted key {key_id}" in result.stdout


def test_tampered_shard_with_a_recomputed_digest_is_refused_under_require(signed, tmp_path):
    forged = tamper(shutil.copytree(signed["train"], tmp_path / "forged"))
    assert ok(run_cli("device", "verify", forged, "--signatures", "off")).stdout.startswith("ok:")  # sha256 fooled
    before = snapshot(signed["root"], forged)
    for command in (["verify", forged], ["train", forged, "--out", tmp_path / "r", *TRAIN],
                    ["evaluate", signed["root"] / "owner.safetensors", forged],
                    ["predict", signed["root"] / "owner.safetensors", forged],
                    ["pull", forged, tmp_path / "pulled"]):
        result = run_cli("device", *command, *require(signed))
        assert_one_line_error(result, 1, "does not match the feature set (modified after it was signed)")
    assert snapshot(signed["root"], forged) == before
    assert not (tmp_path / "r").exists() and not (tmp_path / "pulled").exists()  # refused before any work
    # when-present checks a signature that is there, the same way
    assert_one_line_error(run_cli("device", "verify", forged, "--trusted-key", signed["trusted"]), 1,
                          "modified after it was signed")
    # and the cloud will not sign a set whose shards no longer match their manifest... unless the manifest was
    # rewritten too, as here: sign hashes every shard, so it vouches for exactly the bytes it saw
    broken = shutil.copytree(signed["unsigned"], tmp_path / "broken")
    shard = sorted(broken.glob("shard-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    assert_one_line_error(run_cli("cloud", "sign", broken, "--key", signed["keys"] / "old"), 1, "checksum mismatch")


def test_unsigned_set_refused_under_require_and_warned_when_present(signed, tmp_path):
    before = snapshot(signed["unsigned"])
    assert_one_line_error(run_cli("device", "verify", signed["unsigned"], *require(signed)), 1,
                          "unsigned feature set, refused under --signatures require")
    assert_one_line_error(run_cli("device", "train", signed["unsigned"], "--out", tmp_path / "r", *TRAIN,
                                  *require(signed)), 1, "unsigned feature set")
    warned = ok(run_cli("device", "verify", signed["unsigned"], "--trusted-key", signed["trusted"]))
    assert "warning:" in warned.stderr and "unsigned feature set" in warned.stderr
    quiet = ok(run_cli("device", "verify", signed["unsigned"]))  # no key trusted: nothing to warn about
    assert quiet.stderr == ""
    assert snapshot(signed["unsigned"]) == before
    # under require a signature vouches for rows only through their checksums: --no-verify cannot go with it
    assert_one_line_error(run_cli("device", "train", signed["train"], "--out", tmp_path / "r", *TRAIN,
                                  "--no-verify", *require(signed)), 2, "--no-verify cannot be combined")
    assert_one_line_error(run_cli("device", "verify", signed["train"], "--signatures", "require"), 1,
                          "needs at least one trusted public key")


def test_rotated_keys_are_accepted_and_a_retired_key_refused(signed, tmp_path):
    # the folder trusts old and new: the train set (old key) and the test set (new key) both pass
    for feature_set in (signed["train"], signed["test"]):
        ok(run_cli("device", "verify", feature_set, *require(signed)))
    # the same through $MIST_TRUSTED_KEYS and $MIST_SIGNATURES, two files separated by ':'
    env = {"MIST_SIGNATURES": "require",
           "MIST_TRUSTED_KEYS": f"{signed['keys'] / 'new.pub'}{os.pathsep}{signed['keys'] / 'old.pub'}"}
    ok(run_cli("device", "evaluate", signed["root"] / "owner.safetensors", signed["test"], env=env))
    # the old key retired: only new.pub is trusted, and the set signed by the old key is refused by name
    result = run_cli("device", "verify", signed["train"], *require(signed, signed["keys"] / "new.pub"))
    assert_one_line_error(result, 1, "which is not a trusted key")
    # re-signing with the new key is the cure
    resigned = shutil.copytree(signed["train"], tmp_path / "resigned")
    ok(run_cli("cloud", "sign", resigned, "--key", signed["keys"] / "new"))
    ok(run_cli("device", "verify", resigned, *require(signed, signed["keys"] / "new.pub")))


def test_adaptor_signed_by_another_key_or_unsigned_is_refused(signed, tmp_path):
    before = snapshot(signed["root"])
    stranger = signed["root"] / "stranger.safetensors"
    for command in (["predict", stranger, signed["test"]], ["evaluate", stranger, signed["test"]]):
        assert_one_line_error(run_cli("device", *command, *require(signed)), 1, "which is not a trusted key")
    assert_one_line_error(run_cli("device", "evaluate", signed["run"], signed["test"], *require(signed)), 1,
                          "unsigned adaptor, refused under --signatures require (export it signed")
    owner = ok(run_cli("device", "predict", signed["root"] / "owner.safetensors", signed["test"], *require(signed)))
    plain = ok(run_cli("device", "predict", signed["run"], signed["test"]))
    assert owner.stdout == plain.stdout  # the signature changes nothing the adaptor computes
    assert snapshot(signed["root"]) == before


def test_flipped_weight_is_refused_on_every_load(signed, tmp_path):
    from safetensors.numpy import load_file

    path = signed["run"] / "best.safetensors"
    weights = load_file(str(path))
    name = next(n for n in sorted(weights) if n.startswith("param.") and weights[n].size > 1)
    flipped = weights[name].copy()
    raw = flipped.reshape(-1).view(np.uint8)
    raw[3] ^= 0x01  # one bit of one finite weight: still finite, still plausible
    assert np.all(np.isfinite(flipped))
    forged = forge_tensors(path, tmp_path / "flipped.safetensors", sealed=False,
                           **{name.replace(".", "__"): flipped})
    with pytest.raises(FormatError, match="does not match its digest"):
        load_checkpoint(forged)
    for command in (["evaluate", forged, signed["test"]], ["predict", forged, signed["test"]],
                    ["export", forged, "--out", tmp_path / "out.safetensors"]):
        assert_one_line_error(run_cli("device", *command), 1, f"tensor {name!r} does not match its digest")
    assert not (tmp_path / "out.safetensors").exists()
    # metadata edited (another class order) is caught too, by the metadata digest
    from hostile import forge_checkpoint

    renamed = forge_checkpoint(path, tmp_path / "renamed.safetensors", sealed=False,
                               classes=[str(9 - i) for i in range(10)])
    assert_one_line_error(run_cli("device", "evaluate", renamed, signed["test"]), 1,
                          "metadata does not match its digest")
    # a forger who recomputes the digests too gets past them; a signature is what stops that one
    resealed = forge_tensors(signed["root"] / "owner.safetensors", tmp_path / "resealed.safetensors",
                             **{name.replace(".", "__"): flipped})
    ok(run_cli("device", "evaluate", resealed, signed["test"], "--signatures", "off"))
    assert_one_line_error(run_cli("device", "evaluate", resealed, signed["test"], *require(signed)), 1,
                          "does not match the adaptor (modified after it was signed)")


def test_signature_survives_pull_byte_for_byte(signed, tmp_path):
    pulled = tmp_path / "pulled"
    ok(run_cli("device", "pull", signed["train"], pulled, *require(signed)))
    assert snapshot(pulled) == {str(pulled / Path(k).name): v for k, v in snapshot(signed["train"]).items()}
    ok(run_cli("device", "train", pulled, "--out", tmp_path / "run", *TRAIN, *require(signed)))


def test_convert_and_extract_sign_what_they_write(signed, tmp_path):
    from test_cloud_datasets import make_folder

    out = tmp_path / "int8"
    ok(run_cli("cloud", "convert", signed["unsigned"], "--dtype", "int8", "--out", out,
               "--sign-key", signed["keys"] / "new"))
    ok(run_cli("device", "verify", out, *require(signed)))
    data = make_folder(tmp_path / "images", bad=False)
    extracted = tmp_path / "extracted"
    ok(run_cli("cloud", "extract", "--model", "test_vit", "--random-init", "--img-size", "32", "--workers", "0",
               "--threads", "1", "--progress", "none", "--groups", "last", "--data", data, "--out", extracted,
               "--sign-key", signed["keys"] / "old"))
    assert "signature" in json.loads((extracted / MANIFEST_NAME).read_text())
    ok(run_cli("device", "verify", extracted, *require(signed)))
