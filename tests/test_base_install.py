"""The base install (`pip install .`, no extras) is the device side: numpy, click, safetensors, no torch.

A fresh virtual environment installs the project from this checkout and runs `mist-device info` and
`mist-device verify` on a set written here. Needs the package index (CI has it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from digits_sets import write_digits_set

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_base_install_runs_device_cli_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    result = subprocess.run([*pip, str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert {"numpy", "click", "safetensors", "mist-tuning"} <= installed
    assert not installed & {"torch", "timm", "torchvision", "pillow", "pynacl", "cffi"}, installed

    feature_set = write_digits_set(tmp_path / "set", slice(0, 300))
    info = subprocess.run([str(venv / "bin" / "mist-device"), "info", str(feature_set)],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "300 in" in info.stdout and "k=1" in info.stdout
    verify = subprocess.run([str(venv / "bin" / "mist-device"), "verify", str(feature_set)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "checksums match" in verify.stdout

    # signatures are the [sign] extra: a signed set still verifies here under the default policy (unchecked, and
    # said so); asked to check it, the device names the extra instead of a traceback
    pytest.importorskip("nacl.signing")
    from mist.formats.signing import generate_key, write_key_pair
    from mist.formats.writer import sign_feature_set

    key = generate_key("test")
    write_key_pair(tmp_path / "k", key)
    sign_feature_set(feature_set, key)
    warned = subprocess.run([str(venv / "bin" / "mist-device"), "verify", str(feature_set)],
                            capture_output=True, text=True)
    assert warned.returncode == 0 and "the signature was not checked" in warned.stderr
    checked = subprocess.run([str(venv / "bin" / "mist-device"), "verify", str(feature_set), "--trusted-key",
                              str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert checked.returncode == 1 and "pip install 'mist-tuning[sign]'" in checked.stderr
    assert "Traceback" not in checked.stderr and len(checked.stderr.strip().splitlines()) == 1
