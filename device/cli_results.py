"""``mist-device evaluate``, ``predict``, ``export`` and ``report``: what a trained run gives."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mist.kit.cli import SectionedCommand
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
@trust_options("evaluate")
@threads_option
def evaluate(adaptor: str, test_set: str, as_json: bool, batch_size: int, no_verify: bool, progress: str) -> None:
    """Accuracy, per-class accuracy and confusion matrix of ADAPTOR (a run dir or checkpoint) on TEST_SET.

    TEST_SET may hold a subset of the training classes (matched by name); a class the adaptor was not
    trained on is refused, by name.
    """
    from .evaluation import evaluate_by_name
    from .progress import rows_progress

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
    click.echo("confusion (rows: true, columns: predicted)")
    for c, row in zip(shown, confusion):
        click.echo(f"  {c:<{width}}  " + " ".join(f"{v:5d}" for v in row))


@click.command(cls=SectionedCommand)
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
@click.option("--server-pin", "server_pins", multiple=True, callback=lambda ctx, p, v: _pins(ctx, v),
              metavar="sha256:HEX",
              help="With an https --server: accept only a server whose TLS certificate has this sha256 (serve "
                   "prints it); checked before the token or any image is sent. Repeat it to allow a new "
                   "certificate beside the old one.")
@progress_option
@memory_option
@trust_options("predict")
@threads_option
def predict(adaptor: str, feature_set: tuple[str, ...], top_k: int, fmt: str, as_json: bool, output: str | None,
            batch_size: int, no_verify: bool, server: str | None, token_file: str | None,
            ca_cert: str | None, server_pins: tuple[str, ...], progress: str) -> None:
    """Predict a class for every row of FEATURE_SET (labelled or not) with ADAPTOR.

    With --server URL, the arguments are image files instead: each is sent to the server, only its Gather*
    sums come back, and ADAPTOR classifies them here.
    """
    import numpy as np

    from .evaluation import evaluate_rows

    fmt = "json" if as_json else fmt
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
@click.argument("out", type=click.Path(dir_okay=False))
@sign_key_option("export", "the exported adaptor")
def export(adaptor: str, out: str, sign_key) -> None:
    """Write ADAPTOR's weights and metadata only (no optimizer state) to OUT, for inference, with a digest of
    every tensor and of the metadata; with --sign-key, signed."""
    from mist.formats import Checkpoint, save_checkpoint

    ckpt, _, path = load_adaptor(adaptor)
    if Path(out).resolve() == path.resolve():
        raise click.UsageError(f"{out} is the checkpoint being exported; choose another output file")
    from mist.formats.checkpoint import inference_record

    slim = Checkpoint(params=ckpt.params, config=ckpt.config, classes=ckpt.classes,
                      feature_set=inference_record(ckpt.feature_set), kind=ckpt.kind)
    save_checkpoint(out, slim, signer=sign_key)
    size = Path(out).stat().st_size
    signed = f", signed with key {sign_key.public.key_id}" if sign_key is not None else ""
    click.echo(f"exported {path} -> {out} ({size:,} bytes{signed})")



# ---- report -----------------------------------------------------------------------------------------------


@click.command(cls=SectionedCommand, short_help="Training curves, confusion matrix and per-class table of a run.",
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
@progress_option
@memory_option
@trust_options("report")
@threads_option
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

        trust = current_trust()
        ckpt, model, path = load_adaptor(run_dir, trust)
        fs = open_set(test_set, verify=not no_verify, trust=trust)
        check_set_against(ckpt, path, fs, classes=False)
        require_inference_memory(model, batch_size, int((fs.labels >= 0).sum()), len(ckpt.classes))
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
        if plots and len(ckpt.classes) > rep.MAX_PLOTTED_CLASSES:
            click.echo(f"confusion.png skipped: {len(ckpt.classes):,} classes is more than a readable picture "
                       f"holds ({rep.MAX_PLOTTED_CLASSES}); {rep.TABLE} has the whole matrix", err=True)
        elif plots:
            title = f"{path.name} on {Path(test_set).name}: accuracy {table['accuracy']:.3f}"
            written.append(rep.plot_confusion(confusion, ckpt.classes, out / rep.CONFUSION, title))
    else:
        click.echo("pass TEST_SET for the confusion matrix and the per-class precision/recall/F1 table")
    for p in written:
        click.echo(f"wrote {p}")


