"""``mist-device``: inspect feature sets, train the LAE adaptor, evaluate, predict and export.

NumPy is imported inside the commands, not at module level, so ``--threads`` can still set the BLAS
thread count through environment variables before NumPy loads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mist.kit.cli import CONTEXT, completion_help, one_line_errors, os_error_message, package_version, teach
from mist.kit.flags import SEED, finite_float, memory_option, require_memory
from mist.kit.text import csv_cell, json_text, terminal_text
from mist.ship import commands as ship_commands

from .threads import set_blas_threads


def _open_set(path: str, verify: bool = False):
    from mist.formats import FeatureSet

    return FeatureSet(path, verify=verify)


def _threads_option(f):
    def apply(ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
        if value is not None:
            try:
                set_blas_threads(value)
            except ValueError as e:
                raise click.BadParameter(str(e), ctx=ctx) from None
        return value

    return click.option("--threads", type=click.IntRange(1, 1024), default=None, callback=apply, expose_value=False,
                        is_eager=True, help="BLAS threads (a Raspberry Pi: 1-4). Default: the BLAS default.")(f)


def _progress_option(f):
    return click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto",
                        help="bar: a live bar on stderr (train: epoch k/N, running loss, lr, img/s); lines: "
                             "plain log lines; none: neither; auto: a bar on a terminal, else lines for train "
                             "and none for the others.")(f)


def _user_error_message(e: Exception) -> str | None:
    # Imported here, not at the top: mist.formats loads NumPy, which must wait for --threads.
    from mist.formats import FormatError

    from .train import TrainingError

    if isinstance(e, (FormatError, TrainingError)):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    return None


@click.group(cls=one_line_errors(_user_error_message), context_settings=CONTEXT)
@click.version_option(package_version(), prog_name="mist-device")
def main() -> None:
    """MIST on the device: train a NumPy low-rank attention adaptor (LAE) on summed backbone features.

    Feature sets come from `mist-cloud extract`; nothing here needs torch.
    """


# ---- info / verify ----------------------------------------------------------------------------------------


@main.command()
@click.argument("feature_set", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(feature_set: str, as_json: bool) -> None:
    """Summarise a feature set: backbone, Gather* groups, shapes, classes, shards."""
    fs = _open_set(feature_set)
    m = fs.manifest
    if as_json:
        click.echo(json_text(m.to_json()))
        return
    import numpy as np

    from mist.formats.quant import bytes_per_row

    nbytes = bytes_per_row(m.dtype, m.row_shape)
    float16_bytes = bytes_per_row("float16", m.row_shape)
    counts = np.bincount(fs.labels[fs.labels >= 0], minlength=len(m.classes)) if len(m.classes) else []
    lines = [
        f"feature set   {fs.directory}",
        f"backbone      {m.backbone.get('name')}  (weights: {m.backbone.get('weights_source')}, "
        f"sha256 {m.backbone.get('weights_sha256', '')[:12]})",
        f"gather        k={m.k} groups {_groups_text(m.groups)}  scale={m.scale}",
        f"tokens        T={m.tokens} (prefix {m.prefix_tokens}, grid {m.grid})  d={m.dim}  dtype={m.dtype}",
        f"per image     {nbytes:,} bytes shipped ({100 * nbytes / float16_bytes:.1f}% of float16)",
        f"rows          {len(fs):,} in {len(m.shards)} shards  split={m.split}",
        f"classes       {len(m.classes)}: " + ", ".join(
            f"{c} ({n})" for c, n in zip(m.classes, counts)),
        f"unlabelled    {int(np.sum(fs.labels < 0))}",
        f"input         {m.data_config.get('input_size')} {m.data_config.get('interpolation')} "
        f"mean={m.data_config.get('mean')} std={m.data_config.get('std')}",
    ]
    click.echo("\n".join(terminal_text(line) for line in lines))


def _groups_text(groups: list[list[int]]) -> str:
    def one(g: list[int]) -> str:
        return f"{g[0]}-{g[-1]}" if len(g) > 2 and g == list(range(g[0], g[-1] + 1)) else ",".join(map(str, g))

    return " | ".join(f"[{one(g)}]" for g in groups)


@main.command()
@click.argument("feature_set")
@ship_commands.endpoint_option("verify")
@ship_commands.PROGRESS
@ship_commands.JSON
@click.option("--deep", is_flag=True, help="Also read every feature: refuse NaN or inf, count labelled rows.")
def verify(feature_set: str, endpoint_url: str | None, progress: str, as_json: bool, deep: bool) -> None:
    """Check a feature set's manifest, every shard header and every shard checksum.

    FEATURE_SET is a folder or s3://bucket/prefix (there the shards stream and are hashed, nothing is stored).
    """
    from mist.formats import FormatError

    if "://" in feature_set:
        ship_commands.verify_url(feature_set, endpoint_url, as_json, progress)
        return
    if not Path(feature_set).is_dir():
        raise click.BadParameter(f"{feature_set}: not a folder", param_hint="'FEATURE_SET'")
    fs = _open_set(feature_set, verify=True)
    if len(fs) == 0:
        raise FormatError(f"{fs.directory}: empty feature set (0 rows in {len(fs.manifest.shards)} shards); "
                          "there is nothing to train on or evaluate")
    counts = fs.check_values() if deep else None
    if as_json:
        click.echo(json_text({"source": str(fs.directory), "rows": len(fs), "shards": len(fs.manifest.shards),
                              "verified": True, **({"values": counts} if counts else {})}, indent=None))
        return
    detail = ""
    if counts:
        detail = (f", all features finite, {counts['labelled']:,} labelled rows in {counts['classes_present']} of "
                  f"{fs.num_classes} classes, {counts['unlabelled']:,} unlabelled")
    click.echo(terminal_text(f"ok: {fs.directory} ({len(fs):,} rows, {len(fs.manifest.shards)} shards, "
                             f"checksums match{detail})"))


# ---- train ------------------------------------------------------------------------------------------------


@main.command()
@click.argument("train_set", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "run_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory: checkpoints (last, best) and metrics.jsonl.")
@click.option("--val", "val_set", type=click.Path(exists=True, file_okay=False), default=None,
              help="A validation feature set (must be compatible with the training set).")
@click.option("--val-split", type=finite_float(0, 0.9), default=0.0,
              help="Hold out this fraction of each class of TRAIN_SET for validation (ignored with --val).")
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
              help="Images per step. Memory per image: k*T*d*6 bytes (the float32 batch and the fp16 one read "
                   "ahead) + blocks*heads*T*T*4 (attention maps) + small; measured at ViT-B/16 (k=1, T=197, "
                   "d=768, 1 block): about 2.3 MB per image over a 60 MB base, so 32 peaks near 135 MB.")
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
@_progress_option
@click.option("--log-every", type=click.IntRange(0), default=0, metavar="N",
              help="Also print a progress line every N steps (0: once per epoch), for long epochs.")
@click.option("--step-metrics", is_flag=True,
              help="Also append a per-step record ({\"kind\": \"step\", ...}) to RUN_DIR/metrics.jsonl, "
                   "every step or every --log-every N.")
@click.option("--model", "model_kind", type=click.Choice(["lae", "probe", "auto"]), default="lae",
              help="lae: the adaptor; probe: standardised logistic regression (pooled and flattened, several L2) "
              "chosen on validation; auto: probes and adaptors (--grid) in one validated search, keeping the best.")
@click.option("--grid", default=None,
              help="Train every combination of 'KEY=V1,V2 KEY=...' (or a file holding that text) in one pass over "
              "the data, keys lr, wd, ls, blocks, rank, heads, pos; pick the best on validation (grid.json). Memory "
              "grows with the number of combinations (each holds ~5x its weights), not with the data.")
@click.option("--probe-features", type=click.Choice(["both", "pooled", "flat"]), default="both",
              help="With --model probe|auto: probes on the pooled maps (k*d values), the flattened maps, or both.")
@click.option("--pos-embed", is_flag=True, help="Learn a position embedding for the tokens (zero at start).")
@click.option("--patience", type=click.IntRange(0), default=0,
              help="With --grid/--model auto: stop a member after N epochs without a better validation accuracy.")
@click.option("--memory-limit", type=finite_float(1), default=None,
              help="MiB the grid may use (default: half the machine's memory); a grid estimated above it is refused.")
@memory_option
@_threads_option
def train(train_set: str, run_dir: str, val_set: str | None, val_split: float, rank: int, heads: int,
          blocks_per_group: int, pool: str, input_scale: float, epochs: int, batch_size: int, lr: float,
          min_lr: float, weight_decay: float, warmup: float, label_smoothing: float, grad_clip: float,
          seed: int, save_every: int, resume: bool, overwrite: bool, no_verify: bool, warmup_fraction: float,
          val_seed: int | None, progress: str, log_every: int, step_metrics: bool, model_kind: str,
          grid: str | None, probe_features: str, pos_embed: bool, patience: int,
          memory_limit: float | None) -> None:
    """Train the LAE adaptor on TRAIN_SET, a feature set written by `mist-cloud extract`.

    Minibatches stream from the shards, so memory stays bounded whatever the set's size. Each epoch
    appends a line to RUN_DIR/metrics.jsonl and rewrites RUN_DIR/last.safetensors atomically;
    RUN_DIR/best.safetensors keeps the best validation accuracy. After a crash, rerun with --resume.
    """
    from mist.formats import check_compatible

    from .train import Trainer, TrainOptions, build_config

    train_fs = _open_set(train_set, verify=not no_verify)
    val_fs = None
    if val_set is not None:
        val_fs = _open_set(val_set, verify=not no_verify)
        check_compatible(train_fs.manifest, val_fs.manifest)
    try:
        cfg = build_config(train_fs, rank=rank, heads=heads, blocks_per_group=blocks_per_group, pool=pool,
                           input_scale=input_scale, pos_embed=pos_embed)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from .memory import training_bytes

    require_memory(training_bytes(cfg, min(batch_size, len(train_fs))),
                   f"training {cfg.num_blocks} blocks of rank {cfg.rank} with --batch-size {batch_size}")
    opts = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                        warmup_epochs=warmup, label_smoothing=label_smoothing, grad_clip=grad_clip, seed=seed,
                        val_split=0.0 if val_fs is not None else val_split, save_every=save_every,
                        warmup_fraction=warmup_fraction, val_seed=val_seed)
    if grid is not None or model_kind != "lae":
        from .grid import run_grid

        try:
            run_grid(run_dir, train_fs, val_fs, cfg, opts, model_kind, grid, patience, memory_limit, resume,
                     overwrite, log=click.echo, probe_features=probe_features)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        return
    trainer = Trainer(run_dir, train_fs, val_fs, cfg, opts, log=click.echo)
    if trainer.warmup_warning:
        click.echo(f"warning: {trainer.warmup_warning}", err=True)
    from .lae import count_params

    click.echo(f"training LAE: k={cfg.groups} T={cfg.tokens} d={cfg.dim} rank={cfg.rank} heads={cfg.heads} "
               f"-> {cfg.num_classes} classes, {count_params(trainer.model.params):,} parameters; "
               f"{len(trainer.train_rows)} train / {len(trainer.val_rows)} val rows")
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    from .progress import TrainProgress

    bar = TrainProgress(trainer, progress, log_every=log_every, step_records=step_metrics, log=click.echo)
    summary = trainer.fit(resume=resume, overwrite=overwrite, progress=bar)
    click.echo(f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f}s; checkpoints in {run_dir}")


# ---- evaluate / predict / export --------------------------------------------------------------------------


def _load_adaptor(path: str):
    """A checkpoint file, or a run directory (its best checkpoint, else its last)."""
    from mist.formats import FormatError, load_checkpoint

    from .models import model_from_checkpoint

    p = Path(path)
    if p.is_dir():
        candidates = [p / "best.safetensors", p / "last.safetensors"]
        p = next((c for c in candidates if c.exists()), None)
        if p is None:
            raise FormatError(f"{path}: run directory holds no best.safetensors or last.safetensors")
    ckpt = load_checkpoint(p)
    return ckpt, model_from_checkpoint(ckpt, p), p


def _require_inference_memory(model, batch_size: int, rows: int) -> None:
    from .lae import LAEConfig
    from .memory import inference_bytes

    if not isinstance(model.cfg, LAEConfig):  # a probe is one matrix: nothing to estimate
        return
    require_memory(inference_bytes(model.cfg, min(batch_size, max(rows, 1)), rows),
                   f"running {model.cfg.num_blocks} blocks over {rows} rows with --batch-size {batch_size}")


def _check_set_against(ckpt, ckpt_path: Path, fs, classes: bool = True) -> None:
    from mist.formats import check_compatible
    from mist.formats.checkpoint import training_layout

    check_compatible(training_layout(ckpt.feature_set, str(ckpt_path)), fs.manifest, classes=classes)


@main.command()
@click.argument("adaptor", type=click.Path(exists=True))
@click.argument("test_set", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--batch-size", type=click.IntRange(1), default=128,
              help="Rows per forward pass, capped so each pass holds at most 16 MB of float32 features "
                   "(27 rows at ViT-B/16's k=1, T=197, d=768): memory stays bounded at any value.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards.")
@_progress_option
@memory_option
@_threads_option
def evaluate(adaptor: str, test_set: str, as_json: bool, batch_size: int, no_verify: bool, progress: str) -> None:
    """Accuracy, per-class accuracy and confusion matrix of ADAPTOR (a run dir or checkpoint) on TEST_SET.

    TEST_SET may hold a subset of the training classes (matched by name); a class the adaptor was not
    trained on is refused, by name.
    """
    from .evaluation import evaluate_by_name
    from .progress import rows_progress

    ckpt, model, path = _load_adaptor(adaptor)
    fs = _open_set(test_set, verify=not no_verify)
    _check_set_against(ckpt, path, fs, classes=False)
    _require_inference_memory(model, batch_size, int((fs.labels >= 0).sum()))
    bar = rows_progress(int((fs.labels >= 0).sum()), progress, "evaluating", log=lambda m: click.echo(m, err=True))
    report = {"checkpoint": str(path), "test_set": test_set,
              **evaluate_by_name(model, ckpt.classes, fs, batch_size=batch_size, progress=bar)}
    rows, per_class = range(report["rows"]), list(report["per_class_accuracy"].values())
    confusion = report["confusion"]
    if as_json:
        click.echo(json_text(report))
        return
    click.echo(terminal_text(f"accuracy {report['accuracy']:.4f} on {len(rows)} rows ({path})"))
    shown = [terminal_text(c) for c in ckpt.classes]
    width = max(len(c) for c in shown)
    for c, a in zip(shown, per_class):
        click.echo(f"  {c:<{width}}  " + ("    -  (no test rows)" if a is None else f"{a:.3f}"))
    click.echo("confusion (rows: true, columns: predicted)")
    for c, row in zip(shown, confusion):
        click.echo(f"  {c:<{width}}  " + " ".join(f"{v:5d}" for v in row))


@main.command()
@click.argument("adaptor", type=click.Path(exists=True))
@click.argument("feature_set", nargs=-1, required=True, metavar="FEATURE_SET | --server URL IMAGE...")
@click.option("--top-k", type=click.IntRange(1), default=1, help="How many classes to list per row.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write here instead of stdout.")
@click.option("--batch-size", type=click.IntRange(1), default=128,
              help="Rows per forward pass, capped so each pass holds at most 16 MB of float32 features "
                   "(27 rows at ViT-B/16's k=1, T=197, d=768): memory stays bounded at any value.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards.")
@click.option("--server", default=None,
              help="A `mist-cloud serve` URL: classify the IMAGE files, the backbone running there (docs/serve.md).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="With --server: file holding its bearer token. Default: $MIST_SERVE_TOKEN.")
@click.option("--ca-cert", type=click.Path(dir_okay=False), default=None,
              help="With an https --server: a PEM certificate to trust (e.g. a self-signed one).")
@_progress_option
@memory_option
@_threads_option
def predict(adaptor: str, feature_set: tuple[str, ...], top_k: int, fmt: str, as_json: bool, output: str | None,
            batch_size: int, no_verify: bool, server: str | None, token_file: str | None,
            ca_cert: str | None, progress: str) -> None:
    """Predict a class for every row of FEATURE_SET (labelled or not) with ADAPTOR.

    With --server URL, the arguments are image files instead: each is sent to the server, only its Gather*
    sums come back, and ADAPTOR classifies them here.
    """
    import numpy as np

    from .train import evaluate_rows

    fmt = "json" if as_json else fmt
    ckpt, model, path = _load_adaptor(adaptor)
    if server is not None:
        from . import remote

        text, count = remote.run(ckpt, model, path, server, list(feature_set), remote.read_token(token_file),
                                 ca_cert, min(top_k, len(ckpt.classes)), fmt)
        _write_text(text, count, output)
        return
    if len(feature_set) != 1:
        raise click.UsageError(f"expected one FEATURE_SET, got {len(feature_set)} arguments "
                               "(image files go with --server URL)")
    if not Path(feature_set[0]).is_dir():
        raise click.UsageError(f"FEATURE_SET {feature_set[0]}: not a feature-set directory "
                               "(image files go with --server URL)")
    feature_set = feature_set[0]
    fs = _open_set(feature_set, verify=not no_verify)
    _check_set_against(ckpt, path, fs, classes=False)
    _require_inference_memory(model, batch_size, len(fs))
    top_k = min(top_k, len(ckpt.classes))
    from .progress import rows_progress

    bar = rows_progress(len(fs), progress, "predicting", log=lambda m: click.echo(m, err=True))
    logits = evaluate_rows(model, fs, np.arange(len(fs)), batch_size=batch_size, progress=bar)["logits"]
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    records = []
    for i in range(len(fs)):
        label = int(fs.labels[i])
        records.append({"id": int(fs.ids[i]), "label": fs.manifest.classes[label] if label >= 0 else None,
                        "prediction": ckpt.classes[top[i, 0]],
                        "top": [{"class": ckpt.classes[c], "p": round(float(probs[i, c]), 6)} for c in top[i]]})
    if fmt == "json":
        text = json_text(records, indent=1) + "\n"
    else:
        header = ["id", "label", "prediction"] + [f"{kind}{j + 1}" for j in range(top_k) for kind in ("class", "p")]
        lines = [",".join(header)]
        for r in records:
            cells = [str(r["id"]), _csv(r["label"] or ""), _csv(r["prediction"])]
            for t in r["top"]:
                cells += [_csv(t["class"]), f"{t['p']:.6f}"]
            lines.append(",".join(cells))
        text = "\n".join(lines) + "\n"
    _write_text(text, len(records), output)


def _write_text(text: str, count: int, output: str | None) -> None:
    if output:
        from mist.formats.atomic import atomic_write_bytes

        atomic_write_bytes(output, text.encode())
        click.echo(f"wrote {count} predictions to {output}", err=True)
    else:
        if sys.stdout.isatty():  # quoted CSV may hold control characters; a terminal must not run them
            text = "\n".join(terminal_text(line) for line in text.split("\n"))
        click.echo(text, nl=False, color=True)  # color=True: click would strip ESC sequences out of the data


def _csv(value: str) -> str:
    return csv_cell(value)


@main.command()
@click.argument("adaptor", type=click.Path(exists=True))
@click.argument("out", type=click.Path(dir_okay=False))
def export(adaptor: str, out: str) -> None:
    """Write ADAPTOR's weights and metadata only (no optimizer state) to OUT, for inference."""
    from mist.formats import Checkpoint, save_checkpoint

    ckpt, _, path = _load_adaptor(adaptor)
    if Path(out).resolve() == path.resolve():
        raise click.UsageError(f"{out} is the checkpoint being exported; choose another output file")
    from mist.formats.checkpoint import inference_record

    slim = Checkpoint(params=ckpt.params, config=ckpt.config, classes=ckpt.classes,
                      feature_set=inference_record(ckpt.feature_set), kind=ckpt.kind)
    save_checkpoint(out, slim)
    size = Path(out).stat().st_size
    click.echo(f"exported {path} -> {out} ({size:,} bytes)")



# ---- report -----------------------------------------------------------------------------------------------


@main.command(short_help="Training curves, confusion matrix and per-class table of a run.",
              epilog="""\b
Examples:
  mist-device report run feats/test             # curves.png, confusion.png, report.json in run/report
  mist-device report run                        # the training curves only
  mist-device report run feats/test --out plots

The PNG files need matplotlib: pip install 'mist-tuning[plots]'. Without it the table is still printed.""")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False), metavar="RUN_DIR")
@click.argument("test_set", type=click.Path(exists=True, file_okay=False), required=False, metavar="[TEST_SET]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              show_default="RUN_DIR/report", help="Where curves.png, confusion.png and report.json go.")
@click.option("--batch-size", type=click.IntRange(1), default=128, help="Rows per forward pass.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards.")
@_progress_option
@_threads_option
def report(run_dir: str, test_set: str | None, out_dir: str | None, batch_size: int, no_verify: bool,
           progress: str) -> None:
    """Plot RUN_DIR's training curves (loss, accuracy, lr) and, on TEST_SET, its confusion matrix; print a
    per-class precision/recall/F1 table. The adaptor is RUN_DIR's best checkpoint (else its last)."""
    import numpy as np

    from . import report as rep

    run_path = Path(run_dir)
    epochs = rep.read_epochs(run_path)
    out = Path(out_dir) if out_dir else run_path / "report"
    plots = rep.have_matplotlib()
    if not plots:
        click.echo(f"plots skipped: matplotlib is not installed ({rep.PLOTS_HINT} to get them)", err=True)
    written = []
    if plots:
        out.mkdir(parents=True, exist_ok=True)
        written.append(rep.plot_curves(epochs, out / rep.CURVES, f"{run_path.resolve().name}: {len(epochs)} epochs"))
    last = epochs[-1]
    click.echo(f"{len(epochs)} epochs: train loss {last['train_loss']:.4f}, train acc {last['train_acc']:.3f}"
               + (f", val acc {last['val_acc']:.3f} (best {max(r.get('val_acc', 0) for r in epochs):.3f})"
                  if "val_acc" in last else ""))
    if test_set is not None:
        from .evaluation import evaluate_by_name
        from .progress import rows_progress

        ckpt, model, path = _load_adaptor(run_dir)
        fs = _open_set(test_set, verify=not no_verify)
        _check_set_against(ckpt, path, fs, classes=False)
        bar = rows_progress(int((fs.labels >= 0).sum()), progress, "evaluating", log=lambda m: click.echo(m, err=True))
        result = evaluate_by_name(model, ckpt.classes, fs, batch_size=batch_size, progress=bar)
        confusion = np.array(result["confusion"])
        table = rep.classification_table(confusion, ckpt.classes)
        click.echo(f"on {test_set} ({result['rows']} rows, {path.name}):")
        click.echo(rep.format_table(table))
        out.mkdir(parents=True, exist_ok=True)
        from mist.formats.atomic import atomic_write_bytes

        body = {"run_dir": run_dir, "checkpoint": str(path), "test_set": test_set, "epochs": epochs,
                "confusion": result["confusion"], "classes": ckpt.classes, "table": table}
        atomic_write_bytes(out / rep.TABLE, (json.dumps(body, indent=1) + "\n").encode())
        written.append(out / rep.TABLE)
        if plots:
            title = f"{path.name} on {Path(test_set).name}: accuracy {table['accuracy']:.3f}"
            written.append(rep.plot_confusion(confusion, ckpt.classes, out / rep.CONFUSION, title))
    else:
        click.echo("pass TEST_SET for the confusion matrix and the per-class precision/recall/F1 table")
    for p in written:
        click.echo(f"wrote {p}")


# ---- help that teaches: summaries, examples, environment variables, metavars, option groups -----------------

_SHORT_HELP = {
    "info": "Summarise a feature set: backbone, groups, shapes, classes.",
    "verify": "Check a feature set's manifest, headers and checksums.",
    "train": "Train the LAE adaptor on a feature set.",
    "evaluate": "Accuracy and confusion matrix of an adaptor on a test set.",
    "predict": "Predict classes for a feature set, or for images via --server.",
    "export": "Write an adaptor's weights only, for inference.",
}

_EPILOGS = {
    "info": """\b
Examples:
  mist-device info feats/train
  mist-device info feats/train --json > manifest.json""",
    "verify": """\b
Examples:
  mist-device verify feats/train && mist-device verify feats/test
  mist-device verify s3://mist-sets/fmnist/train""",
    "train": """\b
Examples:
  mist-device train feats/train --out run --val-split 0.2
  mist-device train feats/train --out run --val feats/val --epochs 50 --lr 3e-3
  mist-device train feats/train --out run --resume          # after a crash or Ctrl-C
  mist-device train feats/train --out run --progress lines --log-every 100 --step-metrics
  MIST_TRAIN_EPOCHS=5 mist-device train feats/train --out run --overwrite
Then: mist-device evaluate run feats/test; mist-device report run feats/test.""",
    "evaluate": """\b
Examples:
  mist-device evaluate run feats/test
  mist-device evaluate run/last.safetensors feats/test --json > evaluate.json""",
    "predict": """\b
Examples:
  mist-device predict run feats/new --top-k 3
  mist-device predict adaptor.safetensors feats/new --format json --output predictions.json
  mist-device predict run --server http://127.0.0.1:8750 --token-file token photo.jpg --top-k 3""",
    "export": """\b
Examples:
  mist-device export run adaptor.safetensors""",
}

_SECTIONS = {
    "train": {
        "Data": ["run_dir", "val_set", "val_split", "val_seed", "no_verify"],
        "Adaptor": ["rank", "heads", "blocks_per_group", "pool", "input_scale"],
        "Optimisation": ["epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup", "warmup_fraction",
                         "label_smoothing", "grad_clip", "seed"],
        "Checkpoints and progress": ["save_every", "resume", "overwrite", "progress", "log_every", "step_metrics",
                                     "threads"],
    },
}

_METAVARS = {"run_dir": "RUN_DIR", "val_set": "FEATURE_SET", "output": "FILE", "out_dir": "DIR"}

_OPTION_HELP = {
    "epochs": "Passes over the training rows.",
    "batch_size": "Rows per step (train) or per forward pass (evaluate, predict).",
    "label_smoothing": "Label smoothing of the cross-entropy loss.",
    "format": "csv: one row per line with id, label, prediction and top-k; json: a list of records.",
    "fmt": "csv: one row per line with id, label, prediction and top-k; json: a list of records.",
}

main.epilog = """\b
Start here:
  mist-device info feats/train                    # what arrived from the cloud
  mist-device train feats/train --out run --val-split 0.2
  mist-device evaluate run feats/test
  mist-device report run feats/test               # PNG curves and confusion matrix
Run `mist-device COMMAND --help` for a command's options and examples.

\b
Every option also reads an environment variable, MIST_<COMMAND>_<OPTION>, e.g. MIST_TRAIN_EPOCHS=50
(each command's --help names them).

""" + completion_help("mist-device")

main.add_command(ship_commands.pull)
main.add_command(ship_commands.ls)

teach(main, _SHORT_HELP, _EPILOGS, _SECTIONS, _METAVARS, _OPTION_HELP)
