"""Helpers for scripts/pi-check.sh. Standard library only: it runs on the host's system Python, inside the
arm64 chroot and in the device venvs alike.

    pi_check.py copy-source REPO DEST          the files a wheel build needs (git's view of the tree)
    pi_check.py mirror [SUITE]                 the Debian mirror apt uses on this machine
    pi_check.py pip-conf CA_PATH               a pip.conf for the chroot: only settings that work there
    pi_check.py probe                          JSON: this interpreter's platform, versions, packages
    pi_check.py compare --host DIR --pi DIR --out REPORT [--set K=V] [--time K=S]
                                               check the two runs agree, write the report, print a table
"""

from __future__ import annotations

import argparse
import configparser
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# ---- copy-source -----------------------------------------------------------------------------------------

SKIP_DIRS = {".git", ".venv", "build", "dist", "runs", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache"}


def copy_source(repo: Path, dest: Path) -> None:
    """Copy what git would ship (tracked and untracked-but-not-ignored files) into DEST, so the wheel is
    built from the working tree without writing build/ or *.egg-info into it."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"],
                             check=True, capture_output=True).stdout
        files = [Path(p) for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(repo) for p in repo.rglob("*")
                 if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(repo).parts)]
    copied = 0
    for rel in files:
        src = repo / rel
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copied += 1
    if not (dest / "pyproject.toml").is_file():
        sys.exit(f"copy-source: {repo} has no pyproject.toml")
    print(f"copied {copied} files", file=sys.stderr)


# ---- mirror ----------------------------------------------------------------------------------------------


def apt_mirror(suite: str) -> str:
    """The Debian mirror this machine's apt is configured with: the first enabled http(s) `deb` source whose
    suites include SUITE, else the first Debian archive (a mirror carries every suite), from
    sources.list(.d) in either format. No mirror is named here; with none configured it says so and exits."""
    candidates: list[tuple[str, list[str]]] = []
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0] in " \t" and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
        elif path.name.endswith(".list") or path == Path("/etc/apt/sources.list"):
            for line in text.splitlines():
                line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] == "deb":
                    candidates.append((line[1], [line[2]]))
    web = [(uri, suites) for uri, suites in candidates if uri.startswith(("http://", "https://"))]
    for uri, suites in web:
        if suite in suites:
            return uri.rstrip("/")
    for uri, _suites in web:  # a Debian archive (its path is .../debian on every mirror) serves every suite
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    sys.exit(f"mirror: no http(s) Debian source in /etc/apt/sources.list(.d) to take {suite} from; "
             "set PI_MIRROR to a Debian mirror that carries arm64")


# ---- pip-conf --------------------------------------------------------------------------------------------

# Settings that mean the same inside the chroot. Everything else (find-links, constraint, requirement files,
# no-index, ...) names this machine's local paths or would change what gets installed, so it is dropped.
KEEP = ("index-url", "extra-index-url", "trusted-host", "timeout", "retries", "proxy")
ENV_KEEP = {"PIP_INDEX_URL": "index-url", "PIP_EXTRA_INDEX_URL": "extra-index-url",
            "PIP_TRUSTED_HOST": "trusted-host", "PIP_DEFAULT_TIMEOUT": "timeout", "PIP_TIMEOUT": "timeout",
            "PIP_RETRIES": "retries", "PIP_PROXY": "proxy", "https_proxy": "proxy", "HTTPS_PROXY": "proxy"}


def host_ca_bundle() -> str:
    """The CA bundle the host's pip uses (pip.conf `cert`, PIP_CERT, SSL_CERT_FILE), else Debian's."""
    parser = _host_pip_config()
    for candidate in (os.environ.get("PIP_CERT"), parser.get("global", "cert", fallback=None),
                      os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("pip-conf: no CA bundle found on the host")


def _host_pip_config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(["/etc/xdg/pip/pip.conf", "/etc/pip.conf"])  # pip's own order: later files win
    return parser


def pip_conf(ca_path: str) -> str:
    parser = _host_pip_config()
    kept: dict[str, str] = {}
    dropped = []
    for section in ("global", "install"):
        if not parser.has_section(section):
            continue
        for key, value in parser.items(section):
            if key in KEEP and not value.strip().startswith("file:"):
                kept[key] = value
            elif key != "cert":
                dropped.append(f"[{section}] {key}")
    for env, key in ENV_KEEP.items():
        if os.environ.get(env) and not os.environ[env].startswith("file:"):
            kept[key] = os.environ[env]
    kept["cert"] = ca_path
    kept["disable-pip-version-check"] = "true"
    kept["no-input"] = "true"
    if dropped:
        print("pip-conf: left out of the chroot's pip.conf (host-only): " + ", ".join(dropped), file=sys.stderr)
    return "[global]\n" + "".join(f"{k} = {v}\n" for k, v in kept.items())


# ---- probe -----------------------------------------------------------------------------------------------

ALWAYS_THERE = {"pip", "setuptools", "wheel"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def probe() -> dict:
    import platform
    from importlib import metadata, util

    info: dict = {"machine": platform.machine(), "python": platform.python_version(),
                  "implementation": platform.python_implementation(), "libc": "-".join(platform.libc_ver()),
                  "qemu_cpu": os.environ.get("QEMU_CPU")}
    packages = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    info["packages"] = dict(sorted(packages.items()))
    requires = metadata.requires("mist-tuning") or []
    base = sorted({_norm(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r})
    info["base_requires"] = base
    info["unexpected_packages"] = sorted(set(packages) - set(base) - ALWAYS_THERE - {"mist-tuning"})
    info["torch_importable"] = util.find_spec("torch") is not None
    try:
        import numpy as np

        info["numpy"] = np.__version__
        try:
            features = np._core._multiarray_umath.__cpu_features__
        except AttributeError:
            features = np.core._multiarray_umath.__cpu_features__
        info["numpy_cpu_features"] = sorted(k for k, v in features.items() if v)
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            info["blas"] = f"{blas.get('name')} {blas.get('version')}"
        except Exception:
            info["blas"] = None
    except ImportError:
        info["numpy"] = None
    return info


# ---- compare ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _timings(path: Path) -> dict[str, float]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, seconds = line.split()
            out[name] = round(float(seconds), 2)
    return out


def _prediction_accuracy(path: Path) -> tuple[int, int]:
    """(correct, labelled rows) recomputed from a `mist-device predict --format csv` file."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    labelled = [r for r in rows if r["label"] != ""]
    return sum(r["label"] == r["prediction"] for r in labelled), len(labelled)


def _side(directory: Path) -> dict:
    evaluation = json.loads((directory / "evaluate.json").read_text())
    exported = json.loads((directory / "evaluate-export.json").read_text())
    correct, labelled = _prediction_accuracy(directory / "predictions.csv")
    with open(directory / "predictions.csv", newline="") as f:
        predictions = {r["id"]: r["prediction"] for r in csv.DictReader(f)}
    return {"probe": json.loads((directory / "probe.json").read_text()),
            "metrics": _read_jsonl(directory / "run" / "metrics.jsonl"),
            "evaluation": evaluation, "export_accuracy": exported["accuracy"],
            "prediction_correct": correct, "prediction_rows": labelled, "predictions": predictions,
            "timings": _timings(directory / "timings.txt")}


def compare(host_dir: Path, pi_dir: Path, out: Path, meta: dict, loss_rtol: float, acc_tol: float,
            agree_min: float) -> int:
    failures: list[str] = []
    sides = {}
    for name, directory in (("x86_64", host_dir), ("arm64", pi_dir)):
        try:
            sides[name] = _side(directory)
        except (OSError, KeyError, ValueError) as e:
            failures.append(f"{name}: run output missing or unreadable ({e})")
    tolerances = {"loss_rtol": loss_rtol, "accuracy_abs": acc_tol, "prediction_agreement_min": agree_min}
    report: dict = {"ok": False, "failures": failures, **meta, "tolerances": tolerances}
    if len(sides) < 2:
        return _finish(report, out)

    arch = {}
    for name, s in sides.items():
        p, ev = s["probe"], s["evaluation"]
        accuracy, rows = ev["accuracy"], ev["rows"]
        num_classes = len(ev["classes"])
        losses = [m["train_loss"] for m in s["metrics"]]
        arch[name] = {
            "machine": p["machine"], "python": p["python"], "numpy": p.get("numpy"), "blas": p.get("blas"),
            "libc": p.get("libc"), "qemu_cpu": p.get("qemu_cpu"), "numpy_cpu_features": p.get("numpy_cpu_features"),
            "packages": p["packages"], "accuracy": accuracy, "test_rows": rows, "test_loss": ev["loss"],
            "accuracy_from_predictions": s["prediction_correct"] / max(s["prediction_rows"], 1),
            "exported_accuracy": s["export_accuracy"], "train_loss": losses,
            "train_acc": [m["train_acc"] for m in s["metrics"]], "timings_s": s["timings"],
        }
        if p.get("torch_importable") or "torch" in p["packages"]:
            failures.append(f"{name}: torch is installed in the device venv")
        if p.get("unexpected_packages"):
            failures.append(f"{name}: the base install pulled packages beyond {p['base_requires']}: "
                            f"{p['unexpected_packages']}")
        if s["prediction_rows"] != rows or abs(s["prediction_correct"] / max(rows, 1) - accuracy) > 1e-12:
            failures.append(f"{name}: evaluate says {accuracy:.4f} on {rows} rows, but the prediction file gives "
                            f"{s['prediction_correct']}/{s['prediction_rows']}")
        if s["export_accuracy"] != accuracy:
            failures.append(f"{name}: the exported adaptor scores {s['export_accuracy']:.4f}, "
                            f"the checkpoint {accuracy:.4f}")
        if len(losses) < 2 or not losses[-1] < losses[0]:
            failures.append(f"{name}: training loss did not go down: {losses}")
        if not accuracy > 2.0 / num_classes:
            failures.append(f"{name}: accuracy {accuracy:.3f} is not above twice chance ({2.0 / num_classes:.3f})")
    h, a = sides["x86_64"], sides["arm64"]
    hl, al = arch["x86_64"]["train_loss"], arch["arm64"]["train_loss"]
    if len(hl) != len(al):
        failures.append(f"epochs differ: x86_64 logged {len(hl)}, arm64 {len(al)}")
    rel = [abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(hl, al)]
    max_rel = max(rel) if rel else math.nan
    if not max_rel <= loss_rtol:
        failures.append(f"training loss curves differ: max relative difference {max_rel:.2e} > {loss_rtol:g} "
                        f"(x86_64 {hl}, arm64 {al})")
    acc_diff = abs(arch["x86_64"]["accuracy"] - arch["arm64"]["accuracy"])
    if not acc_diff <= acc_tol:
        failures.append(f"accuracy differs by {acc_diff:.4f} > {acc_tol:g} "
                        f"(x86_64 {arch['x86_64']['accuracy']:.4f}, arm64 {arch['arm64']['accuracy']:.4f})")
    ids = h["predictions"].keys() & a["predictions"].keys()
    agree = sum(h["predictions"][i] == a["predictions"][i] for i in ids) / max(len(ids), 1)
    if len(ids) != len(h["predictions"]) or len(ids) != len(a["predictions"]):
        failures.append("the prediction files cover different rows")
    if not agree >= agree_min:
        failures.append(f"predictions agree on only {agree:.3f} of rows (< {agree_min:g})")
    report.update(arch=arch, comparison={
        "epochs": len(hl), "train_loss_max_rel_diff": max_rel, "train_loss_max_abs_diff":
        max((abs(x - y) for x, y in zip(hl, al)), default=math.nan), "accuracy_abs_diff": acc_diff,
        "prediction_agreement": agree, "emulation_slowdown_train":
        round(a["timings"].get("train", math.nan) / max(h["timings"].get("train", math.nan), 1e-9), 1)})
    report["ok"] = not failures
    _table(report)
    return _finish(report, out)


def _finish(report: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")
    for f in report["failures"]:
        print(f"pi-check: FAIL: {f}", file=sys.stderr)
    return 0 if report["ok"] else 1


def _table(report: dict) -> None:
    h, a, c = report["arch"]["x86_64"], report["arch"]["arm64"], report["comparison"]

    def row(label: str, x: object, y: object, note: str = "") -> str:
        return f"  {label:<22}{x!s:<22}{y!s:<22}{note}"

    t = lambda side, k: f"{side['timings_s'][k]:.1f} s" if k in side["timings_s"] else "-"  # noqa: E731
    lines = [
        row("", "x86_64 (host)", f"arm64 (qemu {a['qemu_cpu']})"),
        row("python", h["python"], a["python"]),
        row("numpy", h["numpy"], a["numpy"]),
        row("venv + pip install", t(report, "host_install") if "timings_s" in report else "-",
            t(report, "pi_install") if "timings_s" in report else "-"),
        row(f"train ({c['epochs']} epochs)", t(h, "train"), t(a, "train"), f"x{c['emulation_slowdown_train']}"),
        row("final train loss", f"{h['train_loss'][-1]:.6f}", f"{a['train_loss'][-1]:.6f}",
            f"max rel diff {c['train_loss_max_rel_diff']:.1e} (<= {report['tolerances']['loss_rtol']:g})"),
        row("test accuracy", f"{h['accuracy']:.4f}", f"{a['accuracy']:.4f}",
            f"|diff| {c['accuracy_abs_diff']:.4f} (<= {report['tolerances']['accuracy_abs']:g})"),
        row("accuracy from predict", f"{h['accuracy_from_predictions']:.4f}", f"{a['accuracy_from_predictions']:.4f}",
            f"predictions agree {c['prediction_agreement']:.3f}"),
        row("exported adaptor", f"{h['exported_accuracy']:.4f}", f"{a['exported_accuracy']:.4f}"),
    ]
    print("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("copy-source")
    p.add_argument("repo", type=Path)
    p.add_argument("dest", type=Path)
    p = sub.add_parser("mirror")
    p.add_argument("suite", nargs="?", default="bookworm")
    sub.add_parser("ca-bundle")
    p = sub.add_parser("pip-conf")
    p.add_argument("ca_path")
    sub.add_parser("probe")
    p = sub.add_parser("compare")
    p.add_argument("--host", type=Path, required=True)
    p.add_argument("--pi", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a string for the report")
    p.add_argument("--time", action="append", default=[], metavar="NAME=SECONDS", help="a stage's wall time")
    p.add_argument("--loss-rtol", type=float, default=1e-3)
    p.add_argument("--acc-tol", type=float, default=0.01)
    p.add_argument("--agree-min", type=float, default=0.98)
    args = ap.parse_args()
    if args.cmd == "copy-source":
        copy_source(args.repo.resolve(), args.dest)
    elif args.cmd == "mirror":
        print(apt_mirror(args.suite))
    elif args.cmd == "ca-bundle":
        print(host_ca_bundle())
    elif args.cmd == "pip-conf":
        sys.stdout.write(pip_conf(args.ca_path))
    elif args.cmd == "probe":
        print(json.dumps(probe(), indent=2))
    elif args.cmd == "compare":
        meta: dict = dict(kv.split("=", 1) for kv in args.set)
        meta["timings_s"] = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.time)}
        return compare(args.host, args.pi, args.out, meta, args.loss_rtol, args.acc_tol, args.agree_min)
    return 0


if __name__ == "__main__":
    sys.exit(main())
