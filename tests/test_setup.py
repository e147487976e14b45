"""The set-up scripts: a busy package manager is waited for (bounded, with a clear line) instead of failing,
and packages come from the machine's configured index and Debian mirror, never from a host named in the
repository. The lock is apt's real lock, taken the way another apt would take it."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("/var/lib/dpkg/lock-frontend")

needs_apt = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None or not LOCK.exists(),
                               reason="needs root and Debian's apt-get (the lock is dpkg's)")


def apt_get(args: str, wait: int) -> tuple[subprocess.CompletedProcess, float]:
    """scripts/apt.sh's apt_get, as setup.sh calls it (set -euo pipefail, stdout discarded)."""
    script = f"set -euo pipefail; . scripts/apt.sh; apt_get {args} >/dev/null; echo done"
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env={**os.environ, "MIST_APT_WAIT": str(wait)},
                          capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


class HeldLock:
    """dpkg's frontend lock, held by this process as a running apt would hold it (an fcntl write lock)."""

    def __enter__(self) -> HeldLock:
        self.fd = os.open(LOCK, os.O_RDWR)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            pytest.skip("another apt or dpkg is running on this machine now")
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the fcntl lock
            self.fd = -1

    def __exit__(self, *exc: object) -> None:
        self.release()


@needs_apt
@pytest.mark.slow
def test_a_busy_package_manager_is_waited_for_then_the_command_runs() -> None:
    with HeldLock() as lock:
        threading.Timer(4.0, lock.release).start()
        done, seconds = apt_get("check", wait=60)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert seconds >= 3.5, "it ran while the lock was still held"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the package manager is busy" in lines[0] and "MIST_APT_WAIT" in lines[0], lines
    assert f"held by process {os.getpid()}" in lines[0], "the line names who holds the lock"


@needs_apt
@pytest.mark.slow
def test_a_package_manager_busy_past_the_deadline_fails_with_one_clear_line() -> None:
    with HeldLock():
        done, seconds = apt_get("check", wait=2)
    assert done.returncode == 100 and "done" not in done.stdout
    assert seconds < 30
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("setup: the package manager is still busy after 2s")
    assert f"held by process {os.getpid()}" in last and "MIST_APT_WAIT" in last


@needs_apt
def test_other_apt_failures_pass_through_at_once() -> None:
    done, seconds = apt_get("no-such-operation", wait=60)
    assert done.returncode == 100 and "busy" not in done.stderr and "no-such-operation" in done.stderr
    assert seconds < 20


def test_a_bad_wait_is_refused() -> None:
    done, _ = apt_get("check", wait="soon")  # type: ignore[arg-type]
    assert done.returncode == 2 and "MIST_APT_WAIT must be a number of seconds" in done.stderr


# ---- no named hosts -----------------------------------------------------------------------------------------

INSTALLERS = ["scripts/setup.sh", "scripts/apt.sh", "scripts/pi-check.sh", "scripts/pi/pi_check.py",
              "scripts/main-job.sh", "scripts/test.sh"]
HOST = re.compile(r"\b(?:https?|ftp)://(?!127\.0\.0\.1|localhost)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def test_installs_use_the_machines_configured_index_and_mirror() -> None:
    for name in INSTALLERS:
        found = HOST.findall((ROOT / name).read_text())
        assert not found, f"{name} names {found}: use the index and mirror this machine is configured with"
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"--(?:extra-)?index-url\s+\S*://", readme), "the README names a package index"


def test_the_mirror_is_the_one_apt_is_configured_with() -> None:
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
               *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    text = "\n".join(p.read_text(errors="replace") for p in sources if p.is_file())
    configured = set(re.findall(r"https?://\S+", text))
    if not configured:
        pytest.skip("no http(s) apt source configured here")
    done = subprocess.run(["python3", str(ROOT / "scripts/pi/pi_check.py"), "mirror", "bookworm"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in {u.rstrip("/") for u in configured}
