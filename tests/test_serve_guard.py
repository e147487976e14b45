"""Separated inference over real HTTP, the refusals: `mist-cloud serve` as a subprocess on a loopback port, real
images, real sockets, `mist-device predict --server` as a subprocess. Nothing is mocked.

On the ViT pretrained here (benchmarks/weights) and real Fashion-MNIST images: bad requests each get their
status while good ones succeed, and slow clients their 408; a checkpoint trained on another layout is refused,
naming the field; TLS with a self-signed certificate; the token rule on both sides.

The shared helpers and the served ViT (`vit`) are in serve_helpers.py.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time

import pytest
from serve_helpers import TOKEN, VIT_ARGS, Server, cli

pytestmark = pytest.mark.slow


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
                          # the innermost field is named, not 'data_config' with its text cut off before it
                          ("data_config.input_size",
                           lambda layout: layout["data_config"].update(input_size=[3, 224, 224])),
                          ("data_config.crop_pct", lambda layout: layout["data_config"].update(crop_pct=0.5))):
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


def urllib_get(url: str) -> bytes:
    import ssl
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return response.read()


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
        # a pinned certificate: serve prints its pin; the device needs no CA then, and refuses any other one
        pin = server.log.read_text().split("TLS certificate ", 1)[1].split()[0]
        fingerprint = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
                                     capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
        assert pin == "sha256:" + fingerprint.replace(":", "").lower()
        for given in (pin, fingerprint):  # as serve prints it, or as openssl does
            pinned = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, image,
                         "--server-pin", given, "--token-file", str(token_file), "--json")
            assert json.loads(pinned.stdout) == json.loads(ok.stdout)
        forwards = json.loads(urllib_get(server.url + "/healthz"))["forwards"]
        wrong = cli("mist.device", "predict", str(vit["ckpt"]), "--server", server.url, image,
                    "--server-pin", "sha256:" + "0" * 64, "--token-file", str(token_file), check=False)
        assert wrong.returncode == 1 and "is not a pinned one" in wrong.stderr, wrong.stderr
        assert json.loads(urllib_get(server.url + "/healthz"))["forwards"] == forwards
    finally:
        server.stop()
    bad = cli("mist.cloud", "serve", *VIT_ARGS, "--tls-cert", str(cert), check=False)
    assert bad.returncode == 1 and "--tls-cert and --tls-key go together" in bad.stderr
    short = cli("mist.cloud", "serve", *VIT_ARGS, check=False, MIST_SERVE_TOKEN="short")
    assert short.returncode == 1 and "at least 16 characters" in short.stderr

