"""``mist-device train``: one adaptor, or a search (--grid, --model probe|auto), through device/train.py."""

from __future__ import annotations

import click

from mist.kit.cli import SectionedCommand
from mist.kit.flags import SEED, finite_float, memory_option, require_memory
from mist.kit.text import counted
from mist.ship.trust import current_trust, trust_options

from .cli_options import KIND_CHOICE, open_set, progress_option, threads_option


@click.command(cls=SectionedCommand)
@click.argument("train_set", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "run_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory: checkpoints (last, best) and metrics.jsonl.")
@click.option("--val", "val_set", type=click.Path(exists=True, file_okay=False), default=None,
              help="A validation feature set (must be compatible with the training set).")
@click.option("--val-split", type=finite_float(0, 0.9), default=None,
              help="Hold out this fraction of each class of TRAIN_SET for validation (ignored with --val). "
              "Default: 0.2 for a search (--model probe|auto, --grid), which chooses on it; 0 for one adaptor.")
@click.option("--rank", type=click.IntRange(1), default=32, help="Low-rank width r of the attention.")
@click.option("--heads", type=click.IntRange(1), default=4, help="Attention heads; must divide --rank.")
@click.option("--blocks-per-group", type=click.IntRange(0), default=1,
              help="LAE blocks after each Gather* map; 0 leaves no attention: a linear probe on the same features.")
@click.option("--pool", type=click.Choice(["mean", "cls"]), default="mean",
              help="Token pooling before the head: mean over tokens, or the class token.")
@click.option("--input-scale", type=finite_float(0, min_open=True), default=1.0,
              help="Multiply features by this on the device.")
@click.option("--epochs", type=click.IntRange(1), default=30)
@click.option("--batch-size", type=click.IntRange(1), default=32,
              help="Images per step. Memory grows by k*T*d*6 + blocks*heads*T*T*4 bytes per image (ViT-B/16, "
                   "1 block: about 2.3 MB per image over a 60 MB base).")
@click.option("--lr", type=finite_float(0, min_open=True), default=1e-3, help="Peak learning rate (AdamW).")
@click.option("--min-lr", type=finite_float(0), default=0.0, help="Learning rate at the end of the cosine.")
@click.option("--weight-decay", type=finite_float(0), default=1e-4,
              help="Decoupled weight decay; not applied to norms and biases.")
@click.option("--warmup", type=finite_float(0), default=None, metavar="EPOCHS",
              help="Linear warm-up length in epochs; more than half the run is clamped, with a warning. "
                   "Default: --warmup-fraction of the run.")
@click.option("--warmup-fraction", type=finite_float(0, 0.5), default=0.1,
              help="Warm-up as a fraction of the run, when --warmup is not given.")
@click.option("--label-smoothing", type=finite_float(0, 1, max_open=True), default=0.1)
@click.option("--grad-clip", type=finite_float(0), default=1.0, help="Global gradient-norm clip; 0 disables.")
@click.option("--seed", type=SEED, default=0,
              help="Fixes the initialisation and the shuffle (and the val split, unless --val-seed).")
@click.option("--val-seed", type=SEED, default=None,
              help="Seeds the --val-split draw alone, so --seed can vary the initialisation on a fixed split. "
                   "Default: --seed.")
@click.option("--save-every", type=click.IntRange(0), default=0,
              help="Also save a resumable checkpoint every N steps within an epoch (0: epoch ends only).")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.safetensors with the same options.")
@click.option("--overwrite", is_flag=True, help="Start again in a RUN_DIR that already holds a run.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards before training.")
@progress_option
@click.option("--log-every", type=click.IntRange(0), default=0, metavar="N",
              help="Also print a progress line every N steps (0: once per epoch), for long epochs.")
@click.option("--step-metrics", is_flag=True,
              help="Also append a per-step record ({\"kind\": \"step\", ...}) to RUN_DIR/metrics.jsonl, "
                   "every step or every --log-every N.")
@click.option("--model", "model_kind", type=KIND_CHOICE, default="lae",
              help="lae: the adaptor; probe: standardised logistic regression (pooled and flattened, several L2) "
              "chosen on validation; auto: probes and adaptors in one validated search, keeping the best (without "
              "--grid: adaptors of lr 1e-3,3e-3 x blocks 1,2,4 by successive halving within --budget), refitted "
              "on every training row.")
@click.option("--budget", default="4x", show_default=True, metavar="Nx|Ns",
              help="--model auto without --grid: the adaptors' training time, as a multiple of one plain run "
              "(mist's default adaptor for --epochs, measured on its first epoch) or in seconds ('90s'); the "
              "worst adaptors stop early to keep to it, and grid.json lists them.")
@click.option("--refit/--no-refit", "refit_all", default=True, show_default=True,
              help="After a search chooses on --val-split rows, train the chosen model again on every training "
              "row (the chosen adaptor for the epochs it trained); --no-refit keeps its best epoch.")
@click.option("--grid", default=None,
              help="Search adaptor settings: every combination of 'KEY=V1,V2 KEY=...' (or a file holding that "
              "text), keys lr, wd, ls, blocks, rank, heads, pos, trained in one pass over the data; the best on "
              "validation is kept (grid.json).")
@click.option("--probe-features", type=click.Choice(["both", "pooled", "flat"]), default="both",
              help="With --model probe|auto: probes on the pooled maps (k*d values), the flattened maps, or both.")
@click.option("--pos-embed", is_flag=True, help="Learn a position embedding for the tokens (zero at start).")
@click.option("--patience", type=click.IntRange(0), default=0,
              help="Stop training a model (the adaptor, or each one of a search) after N epochs without a better "
                   "validation accuracy.")
@memory_option
@trust_options
@threads_option
def train(train_set: str, run_dir: str, val_set: str | None, val_split: float | None, rank: int, heads: int,
          blocks_per_group: int, pool: str, input_scale: float, epochs: int, batch_size: int, lr: float,
          min_lr: float, weight_decay: float, warmup: float, label_smoothing: float, grad_clip: float,
          seed: int, save_every: int, resume: bool, overwrite: bool, no_verify: bool, warmup_fraction: float,
          val_seed: int | None, progress: str, log_every: int, step_metrics: bool, model_kind: str,
          grid: str | None, probe_features: str, pos_embed: bool, patience: int, budget: str,
          refit_all: bool) -> None:
    """Train on TRAIN_SET, a feature set written by `mist-cloud extract`: the LAE adaptor (--model lae),
    linear probes (--model probe), or all of them in one validated search that keeps the best (--model auto).

    Minibatches stream from the shards, so memory stays bounded whatever the set's size. Each epoch
    appends to RUN_DIR/metrics.jsonl and rewrites the run's state atomically; RUN_DIR/best.safetensors is
    the model to use (a search adds grid.json). After a crash, rerun with --resume.
    """
    from mist.formats import check_compatible

    from .grid import run_search, search_plan
    from .memory import training_bytes
    from .search import DEFAULT_SPACE, parse_budget
    from .train import Trainer, TrainOptions, build_config

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    trust = current_trust()
    train_fs = open_set(train_set, verify=not no_verify, trust=trust)
    val_fs = None
    if val_set is not None:
        val_fs = open_set(val_set, verify=not no_verify, trust=trust)
        check_compatible(train_fs.manifest, val_fs.manifest)
    if val_split is None:
        val_split = 0.2 if model_kind != "lae" or grid is not None else 0.0
    if train_fs.manifest.task is not None:  # a segmentation set: the dense models (device/dense_cli.py)
        from . import dense_cli

        unsupported = [flag for flag, given in (("--resume", resume), ("--grid", grid), ("--patience", patience))
                       if given]
        if unsupported:
            raise click.UsageError(f"{unsupported[0]} does not apply to a segmentation set yet")
        from .dense_train import DenseOptions

        opts = DenseOptions(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                            warmup_fraction=warmup_fraction, grad_clip=grad_clip, seed=seed,
                            val_split=val_split, val_seed=val_seed)
        settings = {"rank": rank, "heads": heads, "blocks_per_group": blocks_per_group, "pos_embed": pos_embed}
        dense_cli.train(train_fs, val_fs, run_dir, model_kind, opts, settings, overwrite)
        return
    if model_kind == "probe":  # the probe reads only the set's sizes from the adaptor config: no rank to check
        rank = heads = 1
    halving = model_kind == "auto" and grid is None
    try:
        budget_spec = parse_budget(budget) if halving else None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        cfg = build_config(train_fs, rank=rank, heads=heads, blocks_per_group=blocks_per_group, pool=pool,
                           input_scale=input_scale, pos_embed=pos_embed)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    opts = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                        warmup_epochs=warmup, label_smoothing=label_smoothing, grad_clip=grad_clip, seed=seed,
                        val_split=0.0 if val_fs is not None else val_split, save_every=save_every,
                        warmup_fraction=warmup_fraction, val_seed=val_seed)
    try:
        members, fitted = search_plan(model_kind, cfg, opts, {"grid": DEFAULT_SPACE if halving else grid,
                                                              "probe_features": probe_features})
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    # One adaptor and nothing else is a plain run (last/best/metrics); anything more is a search.
    search = len(members) != 1 or bool(fitted) or grid is not None
    val_rows = int((val_fs.labels >= 0).sum()) if val_fs is not None else round(val_split * len(train_fs))
    estimate = training_bytes([c for c, _ in members.values()], fitted, min(batch_size, len(train_fs)),
                              len(train_fs), val_rows, train_fs.manifest.row_shape, train_fs.read_dtype.itemsize,
                              search)
    what = (f"the search ({counted(len(members), 'adaptor')}, {counted(len(fitted), 'probe')}) with --batch-size "
            f"{batch_size}" if search
            else f"training {cfg.num_blocks} blocks of rank {cfg.rank} with --batch-size {batch_size}")
    require_memory(estimate, what)
    if search:
        run_search(run_dir, train_fs, val_fs, cfg, members, fitted, opts, patience, estimate, resume, overwrite,
                   log=click.echo, budget=budget_spec, refit_all=refit_all, progress=progress,
                   log_every=log_every)
        return
    trainer = Trainer(run_dir, train_fs, val_fs, cfg, opts, log=click.echo, patience=patience)
    if trainer.warmup_warning:
        click.echo(f"warning: {trainer.warmup_warning}", err=True)
    from .lae import count_params

    click.echo(f"training LAE: k={cfg.groups} T={cfg.tokens} d={cfg.dim} rank={cfg.rank} heads={cfg.heads} "
               f"-> {cfg.num_classes} classes, {count_params(trainer.model.params):,} parameters; "
               f"{len(trainer.train_rows)} train / {len(trainer.val_rows)} val rows; memory estimate "
               f"{estimate / 2**20:,.1f} MiB")
    from .progress import TrainProgress

    bar = TrainProgress(trainer, progress, log_every=log_every, step_records=step_metrics, log=click.echo)
    summary = trainer.fit(resume=resume, overwrite=overwrite, progress=bar)
    click.echo(f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f}s; checkpoints in {run_dir}")
