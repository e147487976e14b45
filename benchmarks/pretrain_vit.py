"""Pretrain a small ViT on Fashion-MNIST, here, so the ViT path of MIST runs on real pretrained weights.

No pretrained ViT installs offline (docs: offline-assets), so this script makes one. It trains timm's
registered ``test_vit`` architecture (patch 16, width 64, depth 6, 2 heads, a class token) at 64 px, on the
60k Fashion-MNIST training images, preprocessed by exactly the cloud's own eval transform
(``cloud.backbones.make_transform``: resize + centre crop to 64 px, grey replicated to RGB, mean = std = 0.5).
At 64 px a ViT with patch 16 has 16 patch tokens + 1 class token = T = 17, and z_0..z_6 are 7 layers.

The weights are saved as fp16 safetensors under ``${MIST_CACHE:-~/.cache/mist}/vit-fmnist/`` together with a
JSON record (arguments, seed, test accuracy, sha256), and copied to ``benchmarks/weights/vit_fmnist.safetensors``.
A rerun with the cache present does nothing (``--force`` retrains).

The classifier is saved padded to timm's default 1000 classes (rows 10..999: zero weight, bias -1e4), so the
file loads strictly, by name, into ``timm.create_model("test_vit", img_size=64)``, which is what
``mist-cloud extract --model test_vit --weights FILE --img-size 64`` builds; argmax over 1000 logits is the
argmax over the 10 trained ones.

    nice -n 10 .venv/bin/python benchmarks/pretrain_vit.py            # ~10-15 min on 2 cores

``--depth N`` (default 6, the registered ``test_vit``) builds the same ViT with N blocks, i.e. z_0..z_N is N + 1
taps; it is saved as ``vit_fmnist_d{N}.safetensors`` and loads with ``--model-kwargs '{"depth": N}'``.

    nice -n 10 .venv/bin/python benchmarks/pretrain_vit.py --depth 12 --epochs 6   # ~15 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
MODEL = "test_vit"
IMG = 64
DEFAULT_DEPTH = 6  # test_vit's registered depth


def file_stem(depth: int) -> str:
    return "vit_fmnist" if depth == DEFAULT_DEPTH else f"vit_fmnist_d{depth}"


def model_kwargs(depth: int) -> dict:
    return {} if depth == DEFAULT_DEPTH else {"depth": depth}


def cache_dir() -> Path:
    return Path(os.environ.get("MIST_CACHE") or Path.home() / ".cache" / "mist") / "vit-fmnist"


def preprocess(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images through the cloud's own eval transform; returns channel 0 (the 3 are equal)."""
    import torch

    from mist.cloud.backbones import create_backbone, make_transform
    from mist.cloud.datasets import open_source

    src = open_source("fashion-mnist", split)
    cfg = create_backbone(MODEL, "random-init", img_size=IMG, log=lambda s: None).data_config
    tf = make_transform(cfg)
    out = np.empty((len(src), IMG, IMG), np.float16)
    for i in range(len(src)):
        x = tf(src.load(i))
        assert torch.equal(x[0], x[1])
        out[i] = x[0].numpy()
    return out, src.labels.astype(np.int64)


def train(args: argparse.Namespace) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    xtr, ytr = preprocess("train")
    xte, yte = preprocess("test")
    if args.limit:
        xtr, ytr = xtr[: args.limit], ytr[: args.limit]
    print(f"preprocessed {len(xtr)} train / {len(xte)} test images in {time.time() - t0:.0f}s", flush=True)

    model = timm.create_model(MODEL, img_size=IMG, num_classes=10, drop_rate=0.0, **model_kwargs(args.depth))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n
                                                                and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(xtr) // args.batch_size
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch  # one epoch of linear warm-up, then cosine to 0

    def lr_at(s: int) -> float:
        if s < warm:
            return args.lr * (s + 1) / warm
        return 0.5 * args.lr * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm)))

    gen = np.random.default_rng(args.seed)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xte), 500):
                xb = torch.from_numpy(xte[i:i + 500]).float()[:, None].expand(-1, 3, -1, -1)
                correct += int((model(xb).argmax(1).numpy() == yte[i:i + 500]).sum())
        model.train()
        return correct / len(xte)

    step = 0
    model.train()
    for epoch in range(args.epochs):
        order = gen.permutation(len(xtr))
        te = time.time()
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = torch.from_numpy(order[b * args.batch_size:(b + 1) * args.batch_size])
            xb = xtr_t[idx].float()
            # augmentation: random horizontal flip and a random shift of up to 4 px (pad with the background)
            flip = torch.from_numpy(gen.random(len(idx)) < 0.5)
            xb[flip] = xb[flip].flip(-1)
            dx, dy = (int(v) for v in gen.integers(-4, 5, size=2))
            xb = F.pad(xb, (4, 4, 4, 4), value=-1.0)[:, 4 + dy:4 + dy + IMG, 4 + dx:4 + dx + IMG]
            xb = xb[:, None].expand(-1, 3, -1, -1)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), ytr_t[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += float(loss.detach())
            step += 1
        acc = evaluate() if (epoch == args.epochs - 1 or args.eval_every) else float("nan")
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / steps_per_epoch:.4f} test acc {acc:.4f} "
              f"({time.time() - te:.0f}s)", flush=True)
    test_acc = evaluate()
    return {"model": model, "test_acc": test_acc, "params": n_params, "train_seconds": time.time() - t0}


def save(model, path: Path) -> None:
    """fp16 safetensors, classifier padded to timm's default 1000 classes so it loads strictly by name."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    w, b = state["head.weight"], state["head.bias"]
    pad_w = torch.zeros(1000, w.shape[1], dtype=torch.float16)
    pad_b = torch.full((1000,), -1e4, dtype=torch.float16)
    pad_w[:10], pad_b[:10] = w, b
    state["head.weight"], state["head.bias"] = pad_w, pad_b
    save_file(state, str(path), metadata={"model": MODEL, "img_size": str(IMG), "classes": "fashion-mnist (10)"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="number of transformer blocks")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke test)")
    p.add_argument("--eval-every", action="store_true")
    p.add_argument("--force", action="store_true", help="retrain even if the cache holds the weights")
    p.add_argument("--no-copy", action="store_true", help="do not copy into benchmarks/weights/")
    args = p.parse_args(argv)

    out_dir = cache_dir()
    stem = file_stem(args.depth)
    out, record_path = out_dir / f"{stem}.safetensors", out_dir / f"{stem}.json"
    if out.is_file() and record_path.is_file() and not args.force:
        print(f"cached: {out} ({json.loads(record_path.read_text())['test_acc']:.4f} test acc); nothing to do")
    else:
        sys.path.insert(0, str(REPO))
        res = train(args)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        save(res["model"], tmp)
        tmp.replace(out)
        kwargs = model_kwargs(args.depth)
        load_with = f"mist-cloud extract --model {MODEL} --weights {out} --img-size {IMG}"
        if kwargs:
            load_with += f" --model-kwargs '{json.dumps(kwargs)}'"
        record = {"model": MODEL, "model_kwargs": kwargs, "img_size": IMG, "args": vars(args), "seed": args.seed,
                  "test_acc": res["test_acc"], "params": res["params"],
                  "train_seconds": round(res["train_seconds"], 1),
                  "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "bytes": out.stat().st_size,
                  "load_with": load_with}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    if not args.no_copy and out.stat().st_size <= 20 * 2**20:
        dst = REPO / "benchmarks" / "weights" / out.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.read_bytes() != out.read_bytes():
            shutil.copyfile(out, dst)
            shutil.copyfile(record_path, dst.with_suffix(".json"))
            print(f"copied to {dst} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
