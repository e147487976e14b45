"""The accuracy study's result files: rows merged into runs/accuracy/*.json, the figure and the tables of
docs/results.md (`benchmarks/accuracy.py plot|table`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from accuracy import DOCS, OUT


def _put(result: dict, row: dict) -> None:
    """Replace the row of the same name, else append; keep the table in row order."""
    result["rows"] = sorted([r for r in result["rows"] if r["row"] != row["row"]] + [row],
                            key=lambda r: (r["row"][0], r["bytes_per_image"], r["row"]))


def _line(r: dict) -> str:
    return (f"{r['row']:<24} acc {100 * r['mean']:6.2f} +- {100 * r['std']:4.2f}  bytes/img {r['bytes_per_image']:>8}"
            f"  params {r['params']:>7}  chosen {r['chosen']}")


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _merge_row(path: Path, result: dict, row: dict) -> None:
    """Add one row to the JSON at ``path``, under a lock, keeping the rows other processes wrote for the same
    data, recipe and seeds, so one table's rows can run in several processes (one per core)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keep = [k for k in result if k != "rows"]
        old = json.loads(path.read_text()) if path.is_file() else {}
        same = all(old.get(k) == result[k] for k in keep)
        if old and not same:  # other data, recipe or seeds: start a new table, but keep the old one beside it
            path.replace(path.with_suffix(f".{int(time.time())}.json"))
        merged = {**result, "rows": old.get("rows", []) if same else []}
        _put(merged, row)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
        tmp.replace(path)


# ---- plots --------------------------------------------------------------------------------------------------


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(parents=True, exist_ok=True)
    titles = {"lite0": "EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, 1k-shot",
              "vit": "test_vit (pretrained here on Fashion-MNIST) -> MNIST digits, 1k-shot",
              "vit12": "test_vit, depth 12 (pretrained here on Fashion-MNIST) -> MNIST digits, 1k-shot",
              "lite0_full": "EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, full training split"}
    for name, title in titles.items():
        path = OUT / f"{name}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        fig, ax = plt.subplots(figsize=(8, 4.8))
        markers = "osD^v<>PXh*"
        for i, r in enumerate(res["rows"]):  # a legend, not labels on the points: several rows share the bytes
            ax.errorbar(r["bytes_per_image"], 100 * r["mean"], yerr=100 * r["std"], fmt=markers[i % len(markers)],
                        capsize=3, label=f"{r['row'][2:]}: {100 * r['mean']:.1f}")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per image shipped (fp16, log scale)")
        seeds = f"mean +- std, {len(res['seeds'])} seeds" if len(res["seeds"]) > 1 else f"seed {res['seeds'][0]}"
        ax.set_ylabel(f"test accuracy, % ({seeds})")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(DOCS / f"{name}_accuracy_vs_bytes.png", dpi=110)
        plt.close(fig)
        print("wrote", DOCS / f"{name}_accuracy_vs_bytes.png")


def table(name: str) -> str:
    res = json.loads((OUT / f"{name}.json").read_text())
    one = len(res["seeds"]) == 1  # one seed: no std to show
    acc_head = f"seed {res['seeds'][0]}" if one else "mean ± std"
    lines = [f"| row | groups | bytes/image | trainable params | chosen | test acc % ({acc_head}) |",
             "|---|---|---:|---:|---|---|"]
    for r in res["rows"]:
        groups = ",".join("-".join(map(str, (g[0], g[-1]))) if len(g) > 1 else str(g[0]) for g in r["groups"])
        chosen = ", ".join(f"{k} {v:g}" for k, v in r["chosen"].items())
        if None in r["val_grid"].values():
            chosen += " (fixed, not searched)"
        acc = f"{100 * r['mean']:.2f}" + ("" if one else f" ± {100 * r['std']:.2f}")
        lines.append(f"| {r['row'][2:]} | {groups} | {r['bytes_per_image']:,} | {r['params']:,} | {chosen} | {acc} |")
    return "\n".join(lines)
