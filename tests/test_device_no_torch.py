"""The device side must never need torch: prove it in a fresh interpreter where torch cannot load."""

from __future__ import annotations

import subprocess
import sys

from digits_sets import write_digits_set

# A meta-path finder that makes `import torch` (or timm) fail loudly, then the real CLI runs.
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True)


def test_imports_load_neither_torch_nor_timm():
    result = run_python(
        "import mist.device, mist.formats, mist.device.cli, mist.device.train\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')]\n"
        "assert not bad, bad\n"
    )
    assert result.returncode == 0, result.stderr


def test_help_and_a_whole_training_run_without_torch(tmp_path):
    train = write_digits_set(tmp_path / "train", slice(0, 300))
    code = (
        "from mist.device.cli import main\n"
        "import sys\n"
        f"sys.argv = ['mist-device', 'train', {str(train)!r}, '--out', {str(tmp_path / 'run')!r},"
        " '--epochs', '1', '--rank', '4', '--heads', '2']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')]\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "last.safetensors").exists()
    help_result = subprocess.run([sys.executable, "-m", "mist.device", "--help"], capture_output=True, text=True)
    assert help_result.returncode == 0 and "train" in help_result.stdout
