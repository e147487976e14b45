"""The accuracy study's setting (b), the full training split streamed from fp16 stored layers, and row 6, the
NumPy trainer against the PyTorch twin. `benchmarks/accuracy.py full|twin` runs them; the helpers they share
with setting (a) are accuracy.py's."""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
from accuracy import (
    OUT,
    RECIPE,
    REPO,
    Study,
    accuracy,
    configs,
    fit_probe,
    gather,
    load,
    make_cfg,
    search_and_train,
    split_80_20,
    train_numpy,
)
from accuracy_plots import _line, _merge_row, _save

# ---- setting (b): the full training split, streamed from fp16 stored layers --------------------------------


class GatherView:
    """Stored layers (N, m, T, d), any dtype, seen as Gather* maps (N, k, T, d) in float32, one batch at a time:
    ``view[rows]`` sums the chosen rows' layers in float32, so only the fp16 stored layers sit in memory."""

    def __init__(self, per_layer: np.ndarray, layers: list[int], groups: list[list[int]], scale: str,
                 index: np.ndarray | None = None):
        self.per_layer, self.layers, self.groups, self.scale = per_layer, layers, groups, scale
        self.index = np.arange(len(per_layer)) if index is None else index
        self.shape = (len(self.index), len(groups), *per_layer.shape[2:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return gather(self.per_layer[self.index[rows]].astype(np.float32), self.layers, self.groups, self.scale)

    def subset(self, index: np.ndarray) -> GatherView:
        """The same view over the rows ``index`` (e.g. the 80 % of an 80/20 split), without copying."""
        return GatherView(self.per_layer, self.layers, self.groups, self.scale, self.index[index])


def head_features(sets: list[tuple[np.ndarray, list[int]]], bs: int = 500) -> list[np.ndarray]:
    """Mean-pooled layer 17 (bn2, the 1280-d head) recomputed from the stored last stage-5 block (layer 15):
    blocks.6 -> conv_head -> bn2 of the same Lite0 weights, so the head needs no second extraction pass.
    ``sets`` are (stored layers, their layer numbers) pairs; the backbone is built once for all of them."""
    import torch

    from mist.cloud.backbones import create_backbone

    model = create_backbone("tf_efficientnet_lite0", "pretrained", log=lambda *_: None).model
    features = []
    for per_layer, layers in sets:
        pos, out = layers.index(15), []
        with torch.no_grad():
            for i in range(0, len(per_layer), bs):
                x = torch.from_numpy(per_layer[i:i + bs, pos].astype(np.float32))  # (B, 49, 192) tokens
                x = x.transpose(1, 2).reshape(len(x), -1, 7, 7)  # back to NCHW
                out.append(model.bn2(model.conv_head(model.blocks[6](x))).mean((2, 3)).numpy())
        features.append(np.concatenate(out))
    return features


def run_full(study: Study, small: Study, seeds: list[int], epochs: int, search_epochs: int, grid_lr: list[float],
             grid_rank: list[int], only: list[str] | None, rows: int | None, probe_iter: int = 1000) -> dict:
    """Setting (b): train on the extracted 60k (or its first ``rows``) and test on the whole 10k test split, both
    stored as fp16 layers. Hyperparameters are chosen per row on an 80/20 split of the training images (seed 0),
    with ``search_epochs`` epochs per candidate to fit the time; then each row trains ``epochs`` epochs on all
    training images with every seed. The NumPy trainer (mist.device) does all the training."""
    from mist.formats import FeatureSet

    def recipe_for(n_epochs: int) -> dict:  # 10% of the run as warm-up, then cosine decay
        return {**RECIPE, "epochs": n_epochs, "warmup_epochs": 0.1 * n_epochs}

    recipe = recipe_for(epochs)
    fs = FeatureSet(OUT / study.name / "train", allow_incomplete=True)  # a partial extraction: its whole shards
    n = min(rows or len(fs), len(fs))
    t0 = time.time()
    xtr_all = fs.read(np.arange(n), dtype=np.float16)  # 60k x 4 x 49 x 192 fp16 = 4.5 GB; summed in fp32 per batch
    ytr = np.asarray(fs.labels[:n], np.int64)
    test = FeatureSet(OUT / study.name / "test")
    xte_all, yte = test.read(np.arange(len(test)), dtype=np.float16), np.asarray(test.labels, np.int64)
    T, d = test.manifest.tokens, test.manifest.dim
    print(f"{study.name}: train {xtr_all.shape} fp16, test {xte_all.shape} fp16 ({time.time() - t0:.0f}s)",
          flush=True)
    result = {"backbone": study.name, "train_images": n, "train_extracted": len(fs), "extraction_complete":
              fs.manifest.complete, "train_class_counts": np.bincount(ytr, minlength=10).tolist(),
              "test_images": len(yte), "tokens": T, "dim": d, "layers": study.layers, "stored_dtype": "float16",
              "recipe": recipe, "search": {"split": "80/20 per class, seed 0", "recipe": recipe_for(search_epochs),
                                           "lr": grid_lr, "rank": grid_rank}, "seeds": seeds}
    tr, va = split_80_20(ytr)
    path = OUT / f"{study.name}.json"

    rows_by_name = {c["row"][2:]: c for c in [{"row": "1 linear probe"}, *configs(study)]}
    for name in only or list(rows_by_name):  # exact row names, run in the order given
        c, ts = rows_by_name[name], time.time()
        if name == "linear probe":
            # check: the head recomputed for setting (a)'s test images against their extracted layer 17
            ftr, fte, check = head_features([(xtr_all, study.layers), (xte_all, study.layers),
                                             (load(small, "test")[0], small.layers)])
            stored = load(small, "test_probe")[0][:, 0].mean(1)
            grid, C, acc, iterations = fit_probe(ftr, ytr, fte, yte, probe_iter)
            row = {"row": "1 linear probe", "groups": [[17]], "scale": "none",
                   "features": f"mean-pooled layer 17, {ftr.shape[1]}-d, recomputed from stored layer 15",
                   "head_check_max_abs_diff": float(np.abs(check - stored).max()),
                   "bytes_per_image": ftr.shape[1] * 2, "params": ftr.shape[1] * 10 + 10, "val_grid": grid,
                   "chosen": {"C": C}, "lbfgs_iterations": iterations, "lbfgs_max_iter": probe_iter,
                   "test_acc": [acc] * len(seeds), "mean": acc, "std": 0.0,
                   "note": "deterministic (lbfgs): identical for every seed"}
        else:
            xtr = GatherView(xtr_all, study.layers, c["groups"], c["scale"])
            xte = GatherView(xte_all, study.layers, c["groups"], c["scale"])
            row = {**c, **search_and_train(xtr, ytr, xte, yte, (tr, va), c.get("blocks_per_group", 1), grid_lr,
                                            grid_rank, seeds, recipe, recipe_for(search_epochs), T * d * 2,
                                            log=lambda m, n=name: print(f"  {n} {m}", flush=True))}
        row["seconds"] = round(time.time() - ts, 1)
        print(_line(row), f"{row['seconds']:.0f}s", flush=True)
        _merge_row(path, result, row)  # incremental: a killed run keeps its finished rows
    return json.loads(path.read_text()) if path.is_file() else result


# ---- row 6: the NumPy trainer against the PyTorch twin ------------------------------------------------------


def run_twin(study: Study, seed: int, lr: float, rank: int, epochs: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "tests"))
    from torch_lae import TorchLAE, adamw_param_groups, load_numpy_params

    from mist.device.lae import init_params
    from mist.device.optim import lr_schedule

    torch.set_num_threads(1)
    recipe = {**RECIPE, "epochs": epochs}
    xtr_all, ytr, _ = load(study, "train")
    xte_all, yte, _ = load(study, "test")
    L = study.layers
    xtr, xte = gather(xtr_all, L, [L], "none"), gather(xte_all, L, [L], "none")
    cfg = make_cfg(xtr, rank)

    t0 = time.time()
    np_model, np_first = train_numpy(xtr, ytr, cfg, lr, seed, recipe, record_first=True)
    np_acc, np_s = accuracy(np_model, xte, yte), time.time() - t0

    t0 = time.time()
    tm = TorchLAE(cfg.to_dict())
    load_numpy_params(tm, init_params(cfg, seed))  # the same initial weights
    opt = torch.optim.AdamW(adamw_param_groups(tm, recipe["weight_decay"]), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    bs, n = recipe["batch_size"], len(ytr)
    spe = math.ceil(n / bs)
    total, warm = spe * epochs, int(round(recipe["warmup_epochs"] * spe))
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    step, t_first = 0, []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)  # the same data order
        for b in range(spe):
            rows = torch.from_numpy(order[b * bs:(b + 1) * bs])
            loss = F.cross_entropy(tm(xt[rows]), yt[rows], label_smoothing=recipe["label_smoothing"])
            if step < 5:
                t_first.append(float(loss))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), recipe["grad_clip"])
            for g in opt.param_groups:
                g["lr"] = lr_schedule(step, total, lr, warm)
            opt.step()
            step += 1
    with torch.no_grad():
        t_acc = float((tm(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    t_s = time.time() - t0
    diffs = [abs(a - b) for a, b in zip(np_first, t_first)]
    res = {"backbone": study.name, "config": "Gather* k=1, scale none", "seed": seed, "lr": lr, "rank": rank,
           "recipe": recipe, "numpy_acc": np_acc, "torch_acc": t_acc, "acc_diff_points": 100 * abs(np_acc - t_acc),
           "first_losses_numpy": np_first, "first_losses_torch": t_first, "first_step_loss_diff": diffs[0],
           "first5_max_loss_diff": max(diffs), "numpy_seconds": round(np_s, 1), "torch_seconds": round(t_s, 1)}
    _save(res, OUT / f"{study.name}_twin.json")
    print(json.dumps(res, indent=1))
    return res
