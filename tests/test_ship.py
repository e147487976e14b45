"""Shipping feature sets: push, pull, ls and verify against a real S3 server (moto, on 127.0.0.1) and real
folders, through the real CLIs in subprocesses; a real kill -9, real tmpfs and FAT32 mounts where root may.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from digits_sets import write_digits_set
from format_fixtures import make_manifest, make_rows, small_set, write_set

from mist.cloud.cli import main as cloud_main
from mist.device.cli import main as device_main
from mist.formats.writer import MAX_SHARD_BYTES, capped_shard_rows
from mist.ship.copy import copy_set, fat_name_problem
from mist.ship.local import FAT32_MAX_FILE, LocalStore
from mist.ship.s3 import S3Store, s3_client

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BIN = Path(sys.executable).parent
BUCKET = "mist-sets"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("aws")
    saved = dict(os.environ)
    # Credentials the standard way (environment variables), and nothing from the host's ~/.aws.
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(home / "config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"), "AWS_EC2_METADATA_DISABLED": "true",
                       "MIST_S3_ENDPOINT_URL": url})
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint)


def cli(tool: str, *args, env: dict | None = None, real: bool = False) -> SimpleNamespace:
    """Run a CLI in-process (click's runner: boto3 stays loaded), or with ``real`` as a subprocess."""
    if real:
        r = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **(env or {})})
        return SimpleNamespace(returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)
    main = {"mist-device": device_main, "mist-cloud": cloud_main}[tool]
    r = CliRunner().invoke(main, list(map(str, args)), env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def ok(result: SimpleNamespace) -> SimpleNamespace:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def one_line_failure(result: SimpleNamespace, *fragments: str) -> str:
    """Exit status 1, no traceback, and the error itself on one line (progress lines may come before it)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in message, message
    return message


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def bigger_set(directory: Path, rows: int, shard_rows: int, tokens: int = 64, dim: int = 64,
               dtype: str = "float16", seed: int = 0):
    manifest = make_manifest(tokens=tokens, grid=None, dim=dim, dtype=dtype)
    return write_set(directory, manifest, *make_rows(manifest, rows, seed=seed), shard_rows=shard_rows, batch=50)


def push_in_process(local: Path, prefix: str, part_size: int = 64 << 20) -> None:
    copy_set(LocalStore(local), S3Store(BUCKET, prefix, s3_client(), part_size=part_size))


# ---- the round trip ---------------------------------------------------------------------------------------


def test_push_pull_round_trip_then_verify_and_train(endpoint, s3, tmp_path):
    source = write_digits_set(tmp_path / "digits", slice(0, 400), shard_rows=96)
    url = f"s3://{BUCKET}/sets/digits-train"
    pushed = ok(cli("mist-cloud", "push", source, url, real=True))
    assert "5 shards (5 copied, 0 already there)" in pushed.stdout
    assert pushed.stderr.count("copied, checksum matches") == 5  # one line per shard off a terminal

    repushed = ok(cli("mist-cloud", "push", source, url)).stdout  # resumes: objects read back, hashed, kept
    assert "(0 copied, 5 already there)" in repushed

    listing = ok(cli("mist-device", "ls", f"s3://{BUCKET}/sets")).stdout
    assert "sets/digits-train" in listing and "pixels-8x8" in listing and "complete" in listing
    ok(cli("mist-device", "verify", url))

    stick = tmp_path / "stick" / "digits-train"
    report = json.loads(ok(cli("mist-device", "pull", url, stick, "--json", real=True)).stdout)
    assert report["rows"] == 400 and report["bytes_copied"] == report["bytes"] > 0 and report["verified"]
    assert files_of(stick) == files_of(source)  # byte-identical, manifest included
    assert "checksums match" in ok(cli("mist-device", "verify", stick)).stdout

    again = json.loads(ok(cli("mist-device", "pull", url, stick, "--json")).stdout)
    assert [s["status"] for s in again["shards"]] == ["skipped"] * 5

    ok(cli("mist-device", "train", stick, "--out", tmp_path / "run", "--epochs", "1", "--rank", "4",
           "--heads", "2", "--batch-size", "64"))
    assert (tmp_path / "run" / "last.safetensors").exists()


def test_large_shards_upload_in_parts(endpoint, s3, tmp_path):
    source = tmp_path / "big"
    bigger_set(source, rows=100, shard_rows=96, tokens=64, dim=256, dtype="float32")  # a 12.6 MB shard
    url = f"s3://{BUCKET}/sets/big"
    ok(cli("mist-cloud", "push", source, url, "--part-size", "5M"))
    head = s3.head_object(Bucket=BUCKET, Key="sets/big/shard-00000.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB, 5 MiB and the rest
    manifest = json.loads((source / "manifest.json").read_text())
    assert head["Metadata"]["mist-sha256"] == manifest["shards"][0]["sha256"]
    ok(cli("mist-device", "pull", url, tmp_path / "back"))
    assert files_of(tmp_path / "back") == files_of(source)


# ---- interrupted, corrupted, wrong -----------------------------------------------------------------------


def test_pull_killed_mid_transfer_resumes_and_ends_byte_identical(endpoint, tmp_path):
    source = tmp_path / "set"
    bigger_set(source, rows=320, shard_rows=40)  # 8 shards of 640 KiB
    url = f"s3://{BUCKET}/sets/killed"
    push_in_process(source, "sets/killed")
    dest = tmp_path / "sd" / "set"
    proc = subprocess.Popen([str(BIN / "mist-device"), "pull", url, dest, "--max-rate", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (dest / "shard-00002.safetensors").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pull made no progress"
            time.sleep(0.01)
        time.sleep(0.2)  # into the next shard: a partial temp file on disk
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (dest / "manifest.json").exists()  # half-copied: it cannot look complete
    listing = ok(cli("mist-device", "ls", dest.parent)).stdout
    assert "incomplete: no manifest yet" in listing
    one_line_failure(cli("mist-device", "verify", dest), "missing manifest")

    done_before = sorted(p.name for p in dest.glob("shard-*.safetensors"))
    assert 3 <= len(done_before) < 8
    report = json.loads(ok(cli("mist-device", "pull", url, dest, "--json")).stdout)
    statuses = {s["file"]: s["status"] for s in report["shards"]}
    assert [f for f, s in statuses.items() if s == "skipped"] == done_before
    assert files_of(dest) == files_of(source)  # byte-identical, and no temp file left behind


def test_object_corrupted_in_the_bucket_is_detected_and_named(endpoint, s3, tmp_path):
    source = tmp_path / "set"
    small_set(source, n=40)
    push_in_process(source, "sets/corrupt")
    key = "sets/corrupt/shard-00001.safetensors"
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-3] ^= 0xFF  # behind mist's back: a flipped byte in the tensor data
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    url = f"s3://{BUCKET}/sets/corrupt"
    one_line_failure(cli("mist-device", "verify", url), f"s3://{BUCKET}/{key}", "checksum mismatch")
    dest = tmp_path / "dest"
    one_line_failure(cli("mist-device", "pull", url, dest), f"s3://{BUCKET}/{key}", "checksum mismatch")
    assert sorted(p.name for p in dest.iterdir()) == ["shard-00000.safetensors"]  # no manifest, no temp file


def set_auth(endpoint: str, unchecked_requests: bytes) -> None:
    """moto's switch: after this many more unchecked requests, it checks signatures and IAM policies."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=unchecked_requests,
                                                  method="POST", headers={"Content-Type": "text/plain"}))


def test_wrong_credentials_missing_bucket_and_refused_endpoint(endpoint, s3, tmp_path):
    source = tmp_path / "set"
    small_set(source)
    push_in_process(source, "sets/creds")
    url = f"s3://{BUCKET}/sets/creds"

    one_line_failure(cli("mist-device", "pull", "s3://no-such-bucket-here/x", tmp_path / "a"),
                     "s3://no-such-bucket-here", "no such bucket")
    one_line_failure(cli("mist-device", "pull", f"s3://{BUCKET}/sets/none", tmp_path / "a"),
                     f"s3://{BUCKET}/sets/none/manifest.json", "missing manifest")

    begin = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    one_line_failure(cli("mist-device", "pull", url, tmp_path / "a", "--endpoint-url", dead, real=True),
                     "cannot reach the object store")
    assert time.monotonic() - begin < 15

    one_line_failure(cli("mist-device", "pull", url, tmp_path / "a",
                         env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}), "no AWS credentials")

    # Make the server check signatures: a real IAM user may read, a made-up key may not.
    iam = boto3.client("iam", endpoint_url=endpoint)
    iam.create_user(UserName="pi")
    key = iam.create_access_key(UserName="pi")["AccessKey"]
    iam.put_user_policy(UserName="pi", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    set_auth(endpoint, b"0")  # from now on every request must be signed by a known key
    try:
        wrong = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "nope"}
        one_line_failure(cli("mist-device", "pull", url, tmp_path / "b", env=wrong), url, "access denied")
        right = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        ok(cli("mist-device", "pull", url, tmp_path / "b", env=right))
    finally:
        set_auth(endpoint, b"inf")
    assert not (tmp_path / "a").exists()


def test_s3_without_the_extra_says_how_to_install_it(tmp_path):
    block = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('boto3', 'botocore'):\n            raise ImportError(name)\n"
             "sys.meta_path.insert(0, Block())\nfrom mist.device.cli import main\n"
             f"sys.argv = ['mist-device', 'pull', 's3://b/p', {str(tmp_path / 'x')!r}]\nmain()\n")
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=60)
    one_line_failure(result, "s3://b/p", "pip install 'mist-tuning[s3]'")


def test_bad_sources_and_a_different_set_at_the_destination(endpoint, tmp_path):
    one_line_failure(cli("mist-device", "pull", tmp_path / "nothing", tmp_path / "d"), "missing manifest")
    partial = tmp_path / "partial"
    small_set(partial, n=40)
    text = json.loads((partial / "manifest.json").read_text())
    text["complete"] = False
    (partial / "manifest.json").write_text(json.dumps(text))
    one_line_failure(cli("mist-cloud", "push", partial, tmp_path / "d"), "incomplete")

    # A manifest from another set: same shard names, other checksums.
    a, b = tmp_path / "a", tmp_path / "b"
    small_set(a, n=40)
    manifest_b = make_manifest(split="other")
    write_set(b, manifest_b, *make_rows(manifest_b, 40, seed=1))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in a.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "manifest.json").write_bytes((b / "manifest.json").read_bytes())
    one_line_failure(cli("mist-device", "pull", mixed, tmp_path / "d"),
                     str(mixed / "shard-00000.safetensors"), "checksum mismatch")

    # The destination holds a valid, different set: refused and left alone, unless --overwrite.
    before = files_of(a)
    one_line_failure(cli("mist-device", "pull", b, a), "holds a different feature set", "--overwrite")
    assert files_of(a) == before
    ok(cli("mist-device", "pull", b, a, "--overwrite"))
    assert files_of(a) == files_of(b)
    listing = ok(cli("mist-device", "ls", tmp_path, "--json")).stdout
    states = {Path(s["location"]).name: s["status"] for s in json.loads(listing)}
    assert states["a"] == "complete" and states["partial"] == "incomplete: still being written"


# ---- USB sticks: FAT32, full, read-only -------------------------------------------------------------------


def _mount(*args: str) -> str | None:
    if os.geteuid() != 0:
        return "mounting needs root"
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if result.returncode == 0 else f"mount {' '.join(args)}: {result.stderr.strip()}"


def _umount(point: Path) -> None:
    subprocess.run(["umount", str(point)], check=False)


def test_pull_onto_a_fat32_stick(endpoint, tmp_path):
    import shutil

    if shutil.which("mkfs.vfat") is None:
        pytest.skip("mkfs.vfat is missing (Debian dosfstools; scripts/setup.sh installs it as root)")
    image, stick = tmp_path / "stick.img", tmp_path / "stick"
    with open(image, "wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "MISTSTICK", str(image)], check=True, capture_output=True)
    stick.mkdir()
    why = _mount("-o", "loop", str(image), str(stick))
    if why:
        pytest.skip(f"cannot loop-mount the FAT32 image here: {why}")
    try:
        source = tmp_path / "set"
        bigger_set(source, rows=200, shard_rows=64)
        push_in_process(source, "sets/fat")
        ok(cli("mist-device", "pull", f"s3://{BUCKET}/sets/fat", stick / "fmnist-train"))
        ok(cli("mist-device", "verify", stick / "fmnist-train"))
        assert files_of(stick / "fmnist-train") == files_of(source)
    finally:
        _umount(stick)
    check = subprocess.run(["fsck.vfat", "-n", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_full_and_read_only_destinations_fail_cleanly(endpoint, tmp_path):
    source = tmp_path / "set"
    bigger_set(source, rows=75, shard_rows=25)  # 3 shards of 400 KiB: more than the 1 MiB stick holds
    full = tmp_path / "full"
    full.mkdir()
    why = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full))
    if why:
        pytest.skip(f"cannot mount a small tmpfs here: {why}")
    try:
        (full / "notes.txt").write_text("keep me")
        one_line_failure(cli("mist-device", "pull", source, full / "set"), str(full / "set"), "free")
        # Sparse stand-ins of the right size get past the up-front check; then the stick fills mid-copy.
        (full / "set").mkdir()
        for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
            with open(full / "set" / name, "wb") as f:
                f.truncate((source / name).stat().st_size)
        one_line_failure(cli("mist-device", "pull", source, full / "set"), str(full / "set"),
                         "No space left on device")
        assert (full / "notes.txt").read_text() == "keep me"
        assert not list((full / "set").glob("*.tmp")) and not (full / "set" / "manifest.json").exists()
    finally:
        _umount(full)

    # read-only, roomy or also too small for the set: either way the one line says read-only, not "free"
    for size in ("16m", "64k"):
        ro = tmp_path / f"ro-{size}"
        ro.mkdir()
        why = _mount("-t", "tmpfs", "-o", f"size={size},ro", "tmpfs", str(ro))
        if why:
            pytest.skip(f"cannot mount a read-only tmpfs here: {why}")
        try:
            one_line_failure(cli("mist-device", "pull", source, ro / "set"), str(ro / "set"), "Read-only file system")
        finally:
            _umount(ro)


# ---- the rules, without a server ----------------------------------------------------------------------------


def test_fat_names():
    assert fat_name_problem("shard-00000.safetensors") is None
    assert fat_name_problem("manifest.json") is None
    for bad in ("a:b", "x?", "trailing.", "CON.txt", "tab\tname", ""):
        assert fat_name_problem(bad), bad


def test_extract_shards_stay_under_fat32s_limit():
    # ViT-B/16 with every block its own group, float32: 13 x 197 x 768 x 4 bytes a row. 1024 rows would
    # make a 7.5 GiB shard, which no FAT32 stick can hold; the cap keeps whole batches under 1 GiB.
    row_bytes = 13 * 197 * 768 * 4
    rows = capped_shard_rows(1024, row_bytes, multiple=16)
    assert rows % 16 == 0 and rows * row_bytes <= MAX_SHARD_BYTES < FAT32_MAX_FILE
    assert capped_shard_rows(512, 1000, multiple=16) == 512  # small rows: the request stands
    assert capped_shard_rows(512, 2 * MAX_SHARD_BYTES, multiple=16) == 16  # one batch is the floor
    assert np.isclose(FAT32_MAX_FILE, 4 * 2**30 - 1)
