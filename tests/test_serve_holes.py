"""`mist-cloud serve` keeps the promises its docs make: one image decoder with extract, the documented status codes
with one-line JSON bodies, and a quiet stop on Ctrl-C. Real server subprocesses on loopback, real sockets.

The decoder cases are the ones that used to differ: a 16-bit grey PNG (served all white), a PNG with
transparency (not composited over white), a JPEG whose EXIF says "rotate" (ignored).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ATOL, RTOL, TOKEN, VIT_ARGS, Server, cli, write_list

pytestmark = pytest.mark.slow


def hard_images(folder: Path) -> list[Path]:
    """The three files whose pixels once depended on the path they took, cut from a real photograph (sklearn's
    sample image): 16-bit grey, RGBA with transparent regions, an EXIF-rotated JPEG."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    folder.mkdir(parents=True, exist_ok=True)
    photo = np.ascontiguousarray(load_sample_image("china.jpg")[::3, ::3][:128, :128])  # 128 x 128 x 3
    grey16 = (photo.mean(axis=2) * 257).astype("<u2")
    Image.frombytes("I;16", (128, 128), grey16.tobytes()).save(folder / "grey16.png")
    rgba = np.dstack([photo, np.where(np.arange(128)[None, :] < 64, 0, 255).repeat(128, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(photo[:, :96]).save(folder / "rotated.jpg", exif=exif, quality=95)
    return [folder / "grey16.png", folder / "alpha.png", folder / "rotated.jpg"]


def test_serve_decodes_as_extract_does(tmp_path):
    import torch
    from PIL import Image

    from mist.cloud.backbones import make_transform
    from mist.cloud.datasets import open_source
    from mist.cloud.serve_guard import decode_image

    paths = hard_images(tmp_path / "img")
    transform = make_transform({"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3,
                                "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"})
    source = open_source(str(write_list(tmp_path / "list.csv", [(p, 0) for p in paths])))
    for i, path in enumerate(paths):
        served = decode_image(path.read_bytes(), transform, 25_000_000, path.name)
        extracted = transform(source.load(i))
        assert torch.equal(served, extracted), path.name
        with Image.open(path) as image:  # the old serve decode: other pixels, for every one of these files
            assert not torch.equal(transform(image.convert("RGB")), extracted), path.name


def test_the_same_file_gives_the_same_sums_through_extract_and_serve(vit, tmp_path):
    from mist.device.remote import RemoteBackbone
    from mist.formats import FeatureSet

    paths = hard_images(tmp_path / "img")
    listing = write_list(tmp_path / "list.csv", [(p, 0) for p in paths])
    cli("mist.cloud", "extract", *VIT_ARGS, "--data", str(listing), "--out", str(tmp_path / "set"), "--progress",
        "none")
    extracted = FeatureSet(tmp_path / "set").read(np.arange(len(paths)))
    backbone = RemoteBackbone(vit["server"].url, TOKEN)
    for i, path in enumerate(paths):  # one request each, and then all in one
        served = backbone.features([(path.name, path.read_bytes())])
        np.testing.assert_allclose(served[0], extracted[i], rtol=RTOL, atol=ATOL, err_msg=path.name)
    together = backbone.features([(p.name, p.read_bytes()) for p in paths])
    np.testing.assert_allclose(together, extracted, rtol=RTOL, atol=ATOL)


def one_line_json(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), raw[:200]
    assert b"content-type: application/json" in head.lower(), head
    answer = json.loads(body)
    assert answer["status"] == status and answer["error"] and b"\n" not in body
    return answer


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_documented_status_codes_and_json_bodies(vit):
    from mist.device.remote import multipart

    server = vit["server"]  # --max-images 8
    image = vit["images"][0].read_bytes()
    for count in (9, 40):  # one over the limit, and far over (the multipart parser's own limit)
        body, kind = multipart([(f"{i}.png", image) for i in range(count)])
        status, _, answer = server.request("POST", "/v1/features", body, {"Content-Type": kind})
        assert status == 413 and "at most 8" in json.loads(answer)["error"], answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # a Content-Length h11 refuses
        s.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n")
        one_line_json(receive_all(s), 400)
    # more connections than --max-connections (64): the next one gets a 503 in JSON, the server goes on
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(64)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert "--max-connections" in one_line_json(receive_all(s), 503)["error"]
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert server.health()["status"] == "ok"


def test_ctrl_c_stops_serve_quietly(tmp_path):
    pytest.importorskip("uvicorn")
    server = Server(tmp_path / "stop.log", "--model", "test_vit", "--random-init", "--img-size", "32",
                    "--threads", "1", token=None)
    server.proc.send_signal(signal.SIGINT)
    code = server.proc.wait(timeout=30)
    server.stderr.close()
    log = (tmp_path / "stop.log").read_text()
    assert code == 0, log
    assert "serve: stopped" in log and "rerun" not in log and "Error" not in log and "Traceback" not in log
