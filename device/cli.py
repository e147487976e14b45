"""``mist-device``: the group, ``info`` and ``verify``, and the help that teaches every command.

The other commands live in cli_train.py (train), cli_results.py (evaluate, predict, export, report) and the
shipping commands' module (pull, ls). NumPy is imported inside the commands, not at module level, so
``--threads`` can still set the BLAS thread count through environment variables before NumPy loads.
"""

from __future__ import annotations

from pathlib import Path

import click

from mist.kit.cli import CONTEXT, completion_help, one_line_errors, os_error_message, package_version, teach
from mist.kit.text import counted, json_text, terminal_text
from mist.ship import commands as ship_commands
from mist.ship import trust as ship_trust

from . import cli_results, cli_train
from .cli_options import open_set


def _user_error_message(e: Exception) -> str | None:
    # Imported here, not at the top: mist.formats loads NumPy, which must wait for --threads.
    from mist.formats import FormatError

    from .errors import TrainingError

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
    from .allocator import fix_mmap_threshold

    fix_mmap_threshold()  # before any array: freed temporaries must not stay in the heap (allocator.py)


# ---- info / verify ----------------------------------------------------------------------------------------


@main.command()
@click.argument("feature_set", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(feature_set: str, as_json: bool) -> None:
    """Summarise a feature set: backbone, Gather* groups, shapes, classes, shards."""
    fs = open_set(feature_set)
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
        f"rows          {len(fs):,} in {counted(len(m.shards), 'shard')}  split={m.split}",
        f"classes       {len(m.classes)}: " + ", ".join(
            f"{c} ({n})" for c, n in zip(m.classes, counts)),
        f"unlabelled    {int(np.sum(fs.labels < 0))}",
        *([f"task          segmentation: a {m.label_size[0]}x{m.label_size[1]} label map per image "
           f"({m.label_size[0] * m.label_size[1]:,} bytes), 255 = ignore"] if m.task is not None else []),
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
@ship_trust.trust_options
def verify(feature_set: str, endpoint_url: str | None, progress: str, as_json: bool, deep: bool) -> None:
    """Check a feature set's manifest, every shard header and every shard checksum.

    FEATURE_SET is a folder or s3://bucket/prefix (there the shards stream and are hashed, nothing is stored).
    """
    from mist.formats import FormatError

    if "://" in feature_set:
        ship_commands.verify_url(feature_set, endpoint_url, as_json, progress, trust=ship_trust.current_trust())
        return
    if not Path(feature_set).is_dir():
        raise click.BadParameter(f"{feature_set}: not a folder", param_hint="'FEATURE_SET'")
    trust = ship_trust.current_trust()
    fs = open_set(feature_set, verify=True, trust=trust)
    signed_by = trust.checked.get(str(fs.directory / "manifest.json"))
    if len(fs) == 0:
        raise FormatError(f"{fs.directory}: empty feature set (0 rows in {counted(len(fs.manifest.shards), 'shard')}); "
                          "there is nothing to train on or evaluate")
    counts = fs.check_values() if deep else None
    if as_json:
        click.echo(json_text({"source": str(fs.directory), "rows": len(fs), "shards": len(fs.manifest.shards),
                              "verified": True, "signed_by": signed_by, **({"values": counts} if counts else {})},
                             indent=None))
        return
    detail = ""
    if counts:
        detail = (f", all features finite, {counts['labelled']:,} labelled rows in {counts['classes_present']} of "
                  f"{fs.num_classes} classes, {counts['unlabelled']:,} unlabelled")
    signature = f", signed by trusted key {signed_by}" if signed_by else ""
    click.echo(terminal_text(f"ok: {fs.directory} ({counted(len(fs), 'row')}, "
                             f"{counted(len(fs.manifest.shards), 'shard')}, checksums match{signature}{detail})"))


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
  mist-device verify s3://mist-sets/fmnist/train
  mist-device verify feats/train --signatures require --trusted-key cloud.key.pub""",
    "train": """\b
Examples:
  mist-device train feats/train --out run --model auto --val-split 0.2   # probes and the adaptor, best kept
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
  mist-device predict adaptor.safetensors feats/new --format json --out predictions.json
  mist-device predict run --server http://127.0.0.1:8750 --token-file token photo.jpg --top-k 3""",
    "export": """\b
Examples:
  mist-device export run --out adaptor.safetensors
  mist-device export run --out adaptor.safetensors --sign-key owner.key   # devices that trust owner.key.pub
                                                                          # can refuse any other adaptor""",
}

# train --help opens with what a newcomer chooses first; every option sits in a section (a test checks it).
_SECTIONS = {
    "train": {
        "Start here: model, search, validation, epochs": ["run_dir", "model_kind", "grid", "val_split", "val_set",
                                                          "epochs"],
        "Search and validation": ["budget", "refit_all", "probe_features", "patience", "val_seed"],
        "Adaptor": ["rank", "heads", "blocks_per_group", "pool", "pos_embed", "input_scale"],
        "Optimisation": ["batch_size", "lr", "min_lr", "weight_decay", "warmup", "warmup_fraction",
                         "label_smoothing", "grad_clip", "seed"],
        "Checkpoints, progress and resources": ["resume", "overwrite", "save_every", "progress", "log_every",
                                                "step_metrics", "no_verify", "max_memory", "threads"],
        "Trust": ["signatures", "trusted_keys"],
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
Every option also reads an environment variable, MIST_<COMMAND>_<OPTION>, the
flag in capitals: MIST_TRAIN_EPOCHS=50, MIST_TRAIN_OUT=run (each --help names
them). Outputs are --out; sizes take binary units (512M, 2G); nothing is
replaced without --overwrite.

""" + completion_help("mist-device")

for command in (cli_train.train, cli_results.evaluate, cli_results.predict, cli_results.export, cli_results.report,
                ship_commands.pull, ship_commands.ls, ship_trust.keygen, ship_trust.sign):
    main.add_command(command)

teach(main, _SHORT_HELP, _EPILOGS, _SECTIONS, _METAVARS, _OPTION_HELP)

