"""What the ``mist-device`` commands share: the --threads and --progress options, opening sets and
checkpoints, the memory check before an evaluation, and writing a command's text output.

click only at module level: NumPy loads inside the functions, after ``--threads`` has set the BLAS thread
count.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mist.kit.flags import LazyChoice, require_memory
from mist.kit.text import terminal_text

from .threads import set_blas_threads


def _kind_names() -> list[str]:
    from .kinds import KINDS

    return [*KINDS, "auto"]


KIND_CHOICE = LazyChoice(_kind_names)  # --model: a registered model kind (device/kinds.py) or auto


def open_set(path: str, verify: bool = False, trust: Any = None):
    """The feature set at ``path``; with ``trust`` (``mist.ship.trust.current_trust()``) its signature is checked
    before anything else is read."""
    from mist.formats import FeatureSet

    if trust is not None and trust.hashes_shards and not verify:
        raise click.UsageError("--no-verify cannot be combined with --signatures require: a signature vouches for "
                               "the shards only through the checksums it pins")
    return FeatureSet(path, verify=verify, trust=trust)


def threads_option(f):
    def apply(ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
        if value is not None:
            try:
                set_blas_threads(value)
            except ValueError as e:
                raise click.BadParameter(str(e), ctx=ctx) from None
        return value

    return click.option("--threads", type=click.IntRange(1, 1024), default=None, callback=apply, expose_value=False,
                        is_eager=True, help="BLAS threads (a Raspberry Pi: 1-4). Default: the BLAS default.")(f)


def progress_option(f):
    return click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto",
                        help="bar: a live bar on stderr (train: epoch k/N, running loss, lr, img/s); lines: "
                             "plain log lines; none: neither; auto: a bar on a terminal, else lines for train "
                             "and none for the others.")(f)


def load_adaptor(path: str, trust: Any = None) -> tuple[Any, Any, Path]:
    """A checkpoint file, or a run directory (its best checkpoint, else its last): (checkpoint, model, path).

    Its digests are checked on every load; with ``trust``, its signature too (before any field is used)."""
    from mist.formats import FormatError, load_checkpoint

    from .kinds import model_from_checkpoint

    p = Path(path)
    if p.is_dir():
        candidates = [p / "best.safetensors", p / "last.safetensors"]
        p = next((c for c in candidates if c.exists()), None)
        if p is None:
            raise FormatError(f"{path}: run directory holds no best.safetensors or last.safetensors")
    ckpt = load_checkpoint(p, trust)
    return ckpt, model_from_checkpoint(ckpt, p), p


def require_inference_memory(model: Any, batch_size: int, rows: int, scored_classes: int = 0) -> None:
    """Refuse before allocating when running ``model`` over ``rows`` rows (and, when scoring, a confusion matrix
    of ``scored_classes`` classes) would exceed --max-memory."""
    from .kinds import describe
    from .memory import confusion_bytes, inference_bytes

    scoring = confusion_bytes(scored_classes) if scored_classes else 0
    what = f"running the {describe(model)} over {rows} rows with --batch-size {batch_size}"
    if scored_classes:
        what += f" and scoring {scored_classes:,} classes"
    require_memory(inference_bytes(model, min(batch_size, max(rows, 1)), rows) + scoring, what)


def check_set_against(ckpt: Any, ckpt_path: Path, fs: Any, classes: bool = True) -> None:
    from mist.formats import check_compatible
    from mist.formats.checkpoint import training_layout

    check_compatible(training_layout(ckpt.feature_set, str(ckpt_path)), fs.manifest, classes=classes)


def write_text(text: str, count: int, output: str | None) -> None:
    """Predictions to ``output`` (atomically), else to stdout, made harmless on a terminal."""
    if output:
        from mist.formats.atomic import atomic_write_bytes

        atomic_write_bytes(output, text.encode())
        click.echo(f"wrote {count} predictions to {output}", err=True)
    else:
        if sys.stdout.isatty():  # quoted CSV may hold control characters; a terminal must not run them
            text = "\n".join(terminal_text(line) for line in text.split("\n"))
        click.echo(text, nl=False, color=True)  # color=True: click would strip ESC sequences out of the data
