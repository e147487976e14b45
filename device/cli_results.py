"""``mist-device evaluate``, ``predict``, ``export`` and ``report``: what a trained run gives."""

from __future__ import annotations

from pathlib import Path

import click

from mist.kit.cli import SectionedCommand, refuse_to_replace
from mist.kit.flags import memory_option
from mist.kit.text import json_text, terminal_text
from mist.ship.trust import current_trust, sign_key_option, trust_options

from .cli_options import (
    check_set_against,
    load_adaptor,
    open_set,
    progress_option,
    require_inference_memory,
    threads_option,
    write_text,
)
from .predictions import format_predictions, top_classes

MAX_PRINTED_CONFUSION = 50  # classes; a wider matrix wraps into noise on a terminal


def _pins(ctx: click.Context, values: tuple[str, ...]) -> tuple[str, ...]:
    from mist.formats.served import parse_pin

    try:
        return tuple(parse_pin(v) for v in values)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param_hint="'--server-pin'") from None


@click.command(cls=SectionedCommand)
@click.argument("adaptor", type=click.Path(exists=True))
@click.argument("test_set", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--batch-size", type=click.IntRange(1), default=128,
              help="Rows per forward pass, capped so each pass holds at most 16 MB of float32 features "
                   "(27 rows at ViT-B/16's k=1, T=197, d=768): memory stays bounded at any value.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards.")
@progress_option
@memory_option
@trust_options
@threads_option
def evaluate(adaptor: str, test_set: str, as_json: bool, batch_size: int, no_verify: bool, progress: str) -> None:
    """Accuracy, per-class accuracy and confusion matrix of ADAPTOR (a run dir or checkpoint) on TEST_SET.

    TEST_SET may hold a subset of the training classes (matched by name); a class the adaptor was not
    trained on is refused, by name.
    """
    from . import dense_cli
    from .evaluation import evaluate_by_name
    from .progress import rows_progress

    dense = dense_cli.dense_checkpoint(adaptor)
    if dense is not None:  # a segmentation model: mIoU, pixel accuracy, per-class IoU
        dense_cli.evaluate(dense, test_set, as_json, batch_size, no_verify)
        return
    trust = current_trust()
    ckpt, model, path = load_adaptor(adaptor, trust)
    fs = open_set(test_set, verify=not no_verify, trust=trust)
    check_set_against(ckpt, path, fs, classes=False)
    require_inference_memory(model, batch_size, int((fs.labels >= 0).sum()), len(ckpt.classes))
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
    if len(shown) > MAX_PRINTED_CONFUSION:
        click.echo(f"confusion: {len(shown):,} x {len(shown):,}, too large to print; --json holds it")
        return
    # Columns are numbered like the rows (names would make the matrix as wide as the longest name, ten times).
    number = len(str(len(shown) - 1))
    cell = max(5, number, *(len(str(v)) for row in confusion for v in row)) if confusion else 5
    click.echo("confusion (rows: true class, columns: predicted class, numbered as the rows)")
    click.echo(f"  {'':>{number}} {'':<{width}}  " + " ".join(f"{j:>{cell}}" for j in range(len(shown))))
    for i, (c, row) in enumerate(zip(shown, confusion)):
        click.echo(f"  {i:>{number}} {c:<{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))


@click.command(cls=SectionedCommand)
@click.argument("adaptor", type=click.Path(exists=True))
@click.argument("feature_set", nargs=-1, required=True, metavar="FEATURE_SET | --server URL IMAGE...")
@click.option("--top-k", type=click.IntRange(1), default=1, help="How many classes to list per row.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--out", "output", type=click.Path(), default=None,
              help="Write the predictions to this file instead of stdout (a segmentation model: the folder for "
                   "its mask PNGs).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists.")
@click.option("--batch-size", type=click.IntRange(1), default=128,
              help="Rows per forward pass, capped so each pass holds at most 16 MB of float32 features "
                   "(27 rows at ViT-B/16's k=1, T=197, d=768): memory stays bounded at any value.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards.")
@click.option("--server", default=None,
              help="A `mist-cloud serve` URL: classify the IMAGE files, the backbone running there (README: "
                   "\"Classifying new images\").")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="With --server: file holding its bearer token. Default: $MIST_SERVE_TOKEN.")
@click.option("--ca-cert", type=click.Path(dir_okay=False), default=None,
              help="With an https --server: a PEM certificate to trust (e.g. a self-signed one).")
@click.option("--server-pin", "server_pins", multiple=True, callback=lambda ctx, p, v: _pins(ctx, v),
              metavar="sha256:HEX",
              help="With an https --server: accept only a server whose TLS certificate has this sha256 (serve "
                   "prints it); checked before the token or any image is sent. Repeat it to allow a new "
                   "certificate beside the old one.")
@progress_option
@memory_option
@trust_options
@threads_option
def predict(adaptor: str, feature_set: tuple[str, ...], top_k: int, fmt: str, as_json: bool, output: str | None,
            overwrite: bool, batch_size: int, no_verify: bool, server: str | None, token_file: str | None,
            ca_cert: str | None, server_pins: tuple[str, ...], progress: str) -> None:
    """Predict a class for every row of FEATURE_SET (labelled or not) with ADAPTOR.

    With --server URL, the arguments are image files instead: each is sent to the server, only its Gather*
    sums come back, and ADAPTOR classifies them here.
    """
    import numpy as np

    from . import dense_cli
    from .evaluation import evaluate_rows

    dense = dense_cli.dense_checkpoint(adaptor)
    if dense is not None and server is not None:  # a segmentation model: one palette PNG mask per image
        dense_cli.predict_server(dense, server, list(feature_set), token_file, ca_cert, server_pins, output, overwrite)
        return
    if dense is not None:
        dense_cli.predict(dense, feature_set[0] if len(feature_set) == 1 else "", output, overwrite, batch_size,
                          no_verify)
        return
    fmt = "json" if as_json else fmt
    if output is not None and Path(output).is_dir():
        raise click.UsageError(f"--out {output}: a folder; a classifier's predictions go to a file")
    if output is not None:
        refuse_to_replace(output, overwrite)
    trust = current_trust()
    ckpt, model, path = load_adaptor(adaptor, trust)
    if server is not None:
        from . import remote

        text, count = remote.run(ckpt, model, path, server, list(feature_set), remote.read_token(token_file),
                                 ca_cert, min(top_k, len(ckpt.classes)), fmt, pins=server_pins)
        write_text(text, count, output)
        return
    if len(feature_set) != 1:
        raise click.UsageError(f"expected one FEATURE_SET, got {len(feature_set)} arguments "
                               "(image files go with --server URL)")
    if not Path(feature_set[0]).is_dir():
        raise click.UsageError(f"FEATURE_SET {feature_set[0]}: not a feature-set directory "
                               "(image files go with --server URL)")
    feature_set = feature_set[0]
    fs = open_set(feature_set, verify=not no_verify, trust=trust)
    check_set_against(ckpt, path, fs, classes=False)
    require_inference_memory(model, batch_size, len(fs))
    top_k = min(top_k, len(ckpt.classes))
    from .progress import rows_progress

    bar = rows_progress(len(fs), progress, "predicting", log=lambda m: click.echo(m, err=True))
    logits = evaluate_rows(model, fs, np.arange(len(fs)), batch_size=batch_size, progress=bar)["logits"]
    records = []
    for i, top in enumerate(top_classes(logits, ckpt.classes, top_k)):
        label = int(fs.labels[i])
        records.append({"id": int(fs.ids[i]), "label": fs.manifest.classes[label] if label >= 0 else None, **top})
    text = format_predictions(records, ["id", "label"], top_k, fmt)
    write_text(text, len(records), output)


@click.command(cls=SectionedCommand)
@click.argument("adaptor", type=click.Path(exists=True))
@click.argument("old_out", required=False, metavar="", expose_value=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The checkpoint file to write (required).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists.")
@sign_key_option("the exported adaptor")
def export(adaptor: str, old_out: str | None, out: str | None, overwrite: bool, sign_key) -> None:
    """Write ADAPTOR's weights and metadata only (no optimizer state) to --out, for inference, with a digest
    of every tensor and of the metadata; with --sign-key, signed."""
    from mist.formats import Checkpoint, save_checkpoint

    if old_out is not None:  # the form before one output-flag convention: say the new one, never guess
        raise click.UsageError(f"the output file goes with --out: mist-device export {adaptor} --out {old_out}")
    if out is None:
        raise click.UsageError("Missing option '--out' (the checkpoint file to write)")
    ckpt, _, path = load_adaptor(adaptor)
    if Path(out).resolve() == path.resolve():
        raise click.UsageError(f"{out} is the checkpoint being exported; choose another output file")
    refuse_to_replace(out, overwrite)
    from mist.formats.checkpoint import inference_record

    slim = Checkpoint(params=ckpt.params, config=ckpt.config, classes=ckpt.classes,
                      feature_set=inference_record(ckpt.feature_set), kind=ckpt.kind)
    save_checkpoint(out, slim, signer=sign_key)
    size = Path(out).stat().st_size
    signed = f", signed with key {sign_key.public.key_id}" if sign_key is not None else ""
    click.echo(f"exported {path} -> {out} ({size:,} bytes{signed})")



# ---- report -----------------------------------------------------------------------------------------------


@click.command(cls=SectionedCommand, short_help="Curves, search chart, confusion matrix and per-class table of a run.",
              epilog="""\b
Examples:
  mist-device report run feats/test             # curves.png, confusion.png, report.json in run/report
  mist-device report auto-run feats/test        # a search: also search.png, every configuration's accuracy
  mist-device report run                        # the training curves only
  mist-device report run feats/test --out plots --overwrite

The PNG files need matplotlib: pip install 'mist-tuning[plots]'. Without it the table is still printed.""")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False), metavar="RUN_DIR")
@click.argument("test_set", type=click.Path(exists=True, file_okay=False), required=False, metavar="[TEST_SET]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              show_default="RUN_DIR/report", help="Where curves.png, search.png, confusion.png and report.json go.")
@click.option("--overwrite", is_flag=True, help="Replace report files already in the --out folder.")
@click.option("--batch-size", type=click.IntRange(1), default=128, help="Rows per forward pass.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the shards.")
@progress_option
@memory_option
@trust_options
@threads_option
def report(run_dir: str, test_set: str | None, out_dir: str | None, overwrite: bool, batch_size: int,
           no_verify: bool, progress: str) -> None:
    """Report on RUN_DIR, any run of `mist-device train`: a plain run, --model probe|auto, or --grid.

    Draws the chosen model's training curves (loss, accuracy, lr; the kept epoch marked), for a search every
    configuration's validation accuracy, and on TEST_SET the chosen model's confusion matrix; prints a
    per-class precision/recall/F1 table. The model is RUN_DIR's best.safetensors (else its last).
    """
    from . import dense_cli
    from . import report as rep

    dense = dense_cli.dense_checkpoint(run_dir)
    if dense is not None:  # a segmentation run: its candidates, and on TEST_SET mIoU and a picture of masks
        dense_cli.report(dense, run_dir, test_set, out_dir, overwrite, batch_size, no_verify)
        return
    run_path = Path(run_dir)
    record = rep.read_run(run_path)
    out = Path(out_dir) if out_dir else run_path / "report"
    plots = rep.have_matplotlib()
    planned = [rep.TABLE] + [name for name, wanted in ((rep.CURVES, record.epochs), (rep.SEARCH, record.search),
                                                         (rep.CONFUSION, test_set)) if plots and wanted]
    present = [out / name for name in planned if (out / name).exists()]
    if present and not overwrite:
        raise click.UsageError(f"{present[0]} already exists; pass --overwrite to replace the report, "
                               "or --out another folder")
    if not plots:
        click.echo(f"plots skipped: matplotlib is not installed ({rep.PLOTS_HINT} to get them)", err=True)
    name = terminal_text(run_path.resolve().name)
    for line in _run_summary(record):
        click.echo(terminal_text(line))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plots and record.search:
        title = f"{name}: {len(record.search['members'])} configurations, chosen {record.chosen}"
        written.append(rep.plot_search(record.search, out / rep.SEARCH, title))
    if plots and record.epochs:
        whose = "" if record.kind == "plain" else f" of {record.curves_of}"
        if record.kind == "search" and record.curves_of != record.chosen:
            whose += f" (the best adaptor trained by epochs; the chosen {record.chosen} was fitted once)"
        written.append(rep.plot_curves(record, out / rep.CURVES, f"{name}: training curves{whose}, "
                                                                f"{len(record.epochs)} epochs"))
    body = {"run_dir": run_dir, "kind": record.kind, "chosen": record.chosen, "curves_of": record.curves_of,
            "kept_epoch": record.kept_epoch, "kept_rule": record.kept_rule, "epochs": record.epochs,
            **({"search": record.search} if record.search else {})}
    if test_set is not None:
        table, confusion, classes, path = _score(run_dir, test_set, batch_size, no_verify, progress)
        click.echo(f"{record.chosen} on {test_set} ({confusion.sum()} rows, {path.name}):")
        click.echo("\n".join(terminal_text(line) for line in rep.format_table(table).split("\n")))
        body.update(checkpoint=str(path), test_set=test_set, confusion=confusion.tolist(), classes=classes,
                    table=table)
        if plots and len(classes) > rep.MAX_PLOTTED_CLASSES:
            click.echo(f"confusion.png skipped: {len(classes):,} classes is more than a readable picture "
                       f"holds ({rep.MAX_PLOTTED_CLASSES}); {rep.TABLE} has the whole matrix", err=True)
        elif plots:
            title = f"{record.chosen} ({path.name}) on {Path(test_set).name}: accuracy {table['accuracy']:.3f}"
            written.append(rep.plot_confusion(confusion, classes, out / rep.CONFUSION, title))
    else:
        click.echo("pass TEST_SET for the confusion matrix and the per-class precision/recall/F1 table")
    from mist.formats.atomic import atomic_write_bytes

    atomic_write_bytes(out / rep.TABLE, (json_text(body, indent=1) + "\n").encode())
    written.append(out / rep.TABLE)
    for p in written:
        click.echo(terminal_text(f"wrote {p}"))


def _run_summary(record) -> list[str]:
    """What the run was and what it kept, in a line or two."""
    lines = []
    if record.search:
        members = record.search["members"]
        kinds = {}
        for m in members:
            kinds[str(m.get("kind"))] = kinds.get(str(m.get("kind")), 0) + 1
        counted = ", ".join(f"{k}: {n}" for k, n in kinds.items())
        lines.append(f"search of {len(members)} configurations ({counted}) on {record.search.get('val_rows', '?')} "
                     f"validation rows; chosen {record.chosen}: {record.search.get('reason', '')}")
    if record.epochs:
        last = record.epochs[-1]
        whose = "" if record.kind == "plain" else f"{record.curves_of}: "
        val = f", val acc {last['val_acc']:.3f}" if "val_acc" in last else ""
        lines.append(f"{whose}{len(record.epochs)} epochs, last: train loss {last['train_loss']:.4f}, train acc "
                     f"{last['train_acc']:.3f}{val}; kept epoch {record.kept_epoch} ({record.kept_rule})")
        if record.curves_of != record.chosen and record.kind == "search":
            lines.append(f"curves: {record.curves_of}, the best model trained by epochs ({record.chosen} was "
                         "fitted once and has none)")
    elif record.search and any(m.get("best_epoch") for m in record.search["members"]):
        lines.append("no curves: metrics.jsonl holds no per-epoch lines of this search's adaptors (a search run "
                     "by a mist older than its report)")
    elif record.search:
        lines.append("no curves: every model of this search was fitted once")
    return lines


def _score(run_dir: str, test_set: str, batch_size: int, no_verify: bool, progress: str):
    """The chosen model on TEST_SET: (per-class table, confusion matrix, classes, checkpoint path)."""
    import numpy as np

    from . import report as rep
    from .evaluation import evaluate_by_name
    from .progress import rows_progress

    trust = current_trust()
    ckpt, model, path = load_adaptor(run_dir, trust)
    fs = open_set(test_set, verify=not no_verify, trust=trust)
    check_set_against(ckpt, path, fs, classes=False)
    rows = int((fs.labels >= 0).sum())
    require_inference_memory(model, batch_size, rows, len(ckpt.classes))
    bar = rows_progress(rows, progress, "evaluating", log=lambda m: click.echo(m, err=True))
    result = evaluate_by_name(model, ckpt.classes, fs, batch_size=batch_size, progress=bar)
    confusion = np.array(result["confusion"])
    return rep.classification_table(confusion, ckpt.classes), confusion, ckpt.classes, path
