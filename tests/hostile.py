"""Helpers for the hostile-input tests: run a CLI as a real subprocess, snapshot files, forge metadata."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from mist.formats import Manifest, sha256_file
from mist.formats.manifest import MANIFEST_NAME
from mist.formats.safetensors_check import read_header, write_safetensors

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1"}


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(program: str, *args: Any, timeout: float = 120, shell_tail: str | None = None,
            env: dict[str, str] | None = None) -> Result:
    """``python -m mist.device|mist.cloud ARGS`` as a subprocess; with ``shell_tail`` (e.g. '| head -1') through
    bash with pipefail, so the status is the CLI's own. ``env`` adds variables."""
    command = [sys.executable, "-m", f"mist.{program}", *map(str, args)]
    environment = {**ENV, **(env or {})}
    if shell_tail:
        line = " ".join(_quote(c) for c in command) + " " + shell_tail
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, env=environment,
                              timeout=timeout)
    else:
        done = subprocess.run(command, capture_output=True, env=environment, timeout=timeout)
    return Result(done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def assert_one_line_error(result: Result, code: int | tuple[int, ...], contains: str = "") -> None:
    """Exit status, no traceback, exactly one 'Error:' line and it is stderr's last line."""
    codes = code if isinstance(code, tuple) else (code,)
    where = f"status {result.code}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    assert result.code in codes, where
    assert "Traceback" not in result.stderr + result.stdout, where
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], where
    assert contains in errors[0], where


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``: compared before and after each hostile input."""
    digests = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def reseal(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` with the checkpoint digests recomputed for ``tensors``, as a forger who knows the format
    would: the digests then pass, and only the checks behind them (or a signature) can notice."""
    from mist.formats.checkpoint import METADATA_DIGEST, TENSOR_DIGESTS, metadata_digest
    from mist.formats.safetensors_check import DTYPE_NAMES, stored_array

    if TENSOR_DIGESTS not in metadata:
        return metadata
    stored = {name: stored_array(value) for name, value in tensors.items()}
    metadata = {**metadata, TENSOR_DIGESTS: json.dumps(
        {n: hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest() for n, a in stored.items()}, sort_keys=True)}
    metadata[METADATA_DIGEST] = metadata_digest(metadata, {n: [DTYPE_NAMES[a.dtype], list(a.shape)]
                                                           for n, a in stored.items()})
    return metadata


def forge_checkpoint(source: Path, target: Path, sealed: bool = True, **metadata_changes: Any) -> Path:
    """Copy a checkpoint with metadata fields replaced: a str is stored as it is, anything else JSON-encoded;
    with ``sealed`` the digests are recomputed to match."""
    header = read_header(source)
    tensors = load_file(str(source))
    metadata = dict(header.metadata)
    for key, value in metadata_changes.items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    write_safetensors(target, tensors, reseal(tensors, metadata) if sealed else metadata)
    return target


def forge_tensors(source: Path, target: Path, sealed: bool = True, **tensors_changed: np.ndarray) -> Path:
    """Copy a checkpoint with some tensors replaced (names with '.' passed as '__'); with ``sealed`` the
    digests are recomputed to match."""
    header = read_header(source)
    tensors = load_file(str(source))
    for key, value in tensors_changed.items():
        tensors[key.replace("__", ".")] = value
    metadata = dict(header.metadata)
    write_safetensors(target, tensors, reseal(tensors, metadata) if sealed else metadata)
    return target


def reseal_shard(directory: Path, index: int, **metadata_changes: str) -> None:
    """Rewrite shard ``index`` with changed metadata and update its checksum in the manifest, so only the
    metadata checks can notice."""
    manifest = Manifest.load(directory / MANIFEST_NAME)
    path = directory / manifest.shards[index].file
    header = read_header(path)
    tensors = load_file(str(path))
    write_safetensors(path, {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                      {**header.metadata, **metadata_changes})
    obj = json.loads((directory / MANIFEST_NAME).read_text())
    obj["shards"][index]["sha256"] = sha256_file(path)
    (directory / MANIFEST_NAME).write_text(json.dumps(obj))
