"""What ``train``, ``evaluate``, ``predict`` and ``report`` do with a segmentation set or a dense run.

The commands stay the ones of device/cli_train.py and device/cli_results.py: each asks ``dense_checkpoint``
(or the set's manifest) first and hands over here, so a user runs the same four commands for both tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from mist.formats import FormatError, check_compatible, load_checkpoint
from mist.formats.checkpoint import training_layout
from mist.kit.text import json_text, terminal_text

from .dense import DENSE_KINDS, from_checkpoint
from .dense_train import BEST_NAME, SUMMARY_NAME, DenseOptions, predict_rows, scores, train_dense
from .errors import TrainingError
from .png import label_palette, write_png

REPORT_PICTURES = 6  # test images drawn in the report, true mask beside predicted
PICTURE_SCALE = 4  # each label pixel drawn as a 4x4 block, so a 56x56 map is 224 px wide


def dense_checkpoint(adaptor: str) -> tuple[Any, Path] | None:
    """(checkpoint, path) when ADAPTOR (a run directory or a file) holds a dense model, else None."""
    path = Path(adaptor)
    if path.is_dir():
        path = path / BEST_NAME
    if not path.is_file():
        return None
    from mist.ship.trust import current_trust

    try:  # under --signatures require, an unsigned or forged dense checkpoint is refused like any other
        ckpt = load_checkpoint(path, current_trust())
    except FormatError:
        return None  # not ours to report: the classification path says what is wrong with it
    return (ckpt, path) if ckpt.kind in DENSE_KINDS else None


def train(train_fs, val_fs, run_dir: str, model_kind: str, opts: DenseOptions, settings: dict[str, Any],
          overwrite: bool) -> None:
    if model_kind not in ("lae", "probe", "auto"):
        raise click.UsageError(f"--model {model_kind}: a segmentation set trains lae (the dense LAE), probe (the "
                               "dense probe) or auto (both, the better on validation kept)")
    m = train_fs.manifest
    click.echo(f"segmentation set: {len(m.classes)} classes, {m.grid[0]}x{m.grid[1]} tokens, label maps "
               f"{m.label_size[0]}x{m.label_size[1]}; training {model_kind} on {len(train_fs)} images")
    try:
        train_dense(run_dir, train_fs, val_fs, model_kind, opts, settings, overwrite, log=click.echo)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _open_against(ckpt, path: Path, test_set: str, no_verify: bool):
    from mist.ship.trust import current_trust

    from .cli_options import open_set

    fs = open_set(test_set, verify=not no_verify, trust=current_trust())
    layout = training_layout(ckpt.feature_set, str(path))
    check_compatible(layout, fs.manifest, classes=False)
    if fs.manifest.label_size is not None and fs.manifest.label_size != layout.label_size:
        raise FormatError(f"{test_set}: label maps of {fs.manifest.label_size}, the model predicts {layout.label_size}")
    return fs


def _scored(ckpt, path: Path, test_set: str, batch_size: int, no_verify: bool, each=None):
    fs = _open_against(ckpt, path, test_set, no_verify)
    if fs.manifest.label_size is None:
        raise FormatError(f"{test_set}: a classification set; a dense model is scored on a segmentation set")
    if fs.manifest.classes != ckpt.classes:
        raise FormatError(f"{test_set}: classes differ from the model's ({len(fs.manifest.classes)} vs "
                          f"{len(ckpt.classes)}); a label map's values are class indices")
    model = from_checkpoint(ckpt, str(path))
    matrix = predict_rows(model, fs, np.arange(len(fs)), batch_size, each)
    return {"checkpoint": str(path), "test_set": test_set, "model": ckpt.kind, "images": len(fs),
            **scores(matrix, ckpt.classes), "confusion": matrix.tolist()}


def evaluate(found: tuple[Any, Path], test_set: str, as_json: bool, batch_size: int, no_verify: bool) -> None:
    ckpt, path = found
    result = _scored(ckpt, path, test_set, batch_size, no_verify)
    if as_json:
        click.echo(json_text(result))
        return
    click.echo(f"mIoU {result['miou']:.4f}  pixel accuracy {result['pixel_accuracy']:.4f} on {result['images']} "
               f"images, {result['pixels']:,} labelled pixels ({ckpt.kind}, {path})")
    click.echo("\n".join(_class_lines(result["per_class"])))


def _class_lines(per_class: list[dict]) -> list[str]:
    shown = [terminal_text(c["class"]) for c in per_class]
    width = max(len(c) for c in shown)
    lines = [f"  {'class':<{width}}  IoU     pixels"]
    for name, c in zip(shown, per_class):
        iou = "    -" if c["iou"] is None else f"{c['iou']:.3f}"
        lines.append(f"  {name:<{width}}  {iou}  {c['pixels']:>9,}")
    return lines


def predict(found: tuple[Any, Path], feature_set: str, out_dir: str | None, overwrite: bool, batch_size: int,
            no_verify: bool) -> None:
    """One palette PNG label map per row of FEATURE_SET, named by the row's source id, into --out DIR."""
    ckpt, path = found
    out = _mask_folder(out_dir, overwrite)
    fs = _open_against(ckpt, path, feature_set, no_verify)
    model = from_checkpoint(ckpt, str(path))
    out.mkdir(parents=True, exist_ok=True)
    palette = label_palette()
    for begin in range(0, len(fs), batch_size):
        rows = np.arange(begin, min(begin + batch_size, len(fs)))
        from .data import read_rows

        predicted = model.forward(read_rows(fs, rows), keep_cache=False).argmax(axis=-1).astype(np.uint8)
        for row, mask in zip(rows, predicted):
            write_png(out / f"{int(fs.ids[row]):06d}.png", mask, palette)
    click.echo(f"wrote {len(fs)} masks ({model.cfg.label_size[0]}x{model.cfg.label_size[1]} palette PNGs, "
               f"pixel value = class index as in {', '.join(ckpt.classes[:3])}...) to {out}", err=True)


def predict_server(found: tuple[Any, Path], url: str, images: list[str], token_file: str | None,
                   ca_cert: str | None, pins: tuple[str, ...], out_dir: str | None, overwrite: bool) -> None:
    """``predict --server`` with a dense model: each image's sums come from ``mist-cloud serve``, the mask is
    computed here and written as OUT/NAME.png (the image's file name, its extension replaced)."""
    from . import remote

    ckpt, path = found
    out = _mask_folder(out_dir, overwrite)
    stems = [Path(name).stem for name in images]
    if len(set(stems)) != len(stems):
        raise click.UsageError("two images share a file name; their masks would overwrite each other")
    server = remote.RemoteBackbone(url, remote.read_token(token_file), ca_cert, pins=pins)
    remote.check_server(server, training_layout(ckpt.feature_set, str(path)), path)
    model = from_checkpoint(ckpt, str(path))
    palette = label_palette()
    out.mkdir(parents=True, exist_ok=True)
    for names, features in remote.served_features(server, images):
        predicted = model.forward(features, keep_cache=False).argmax(axis=-1).astype(np.uint8)
        for name, mask in zip(names, predicted):
            write_png(out / f"{Path(name).stem}.png", mask, palette)
    click.echo(f"wrote {len(images)} masks to {out} (features from {url})", err=True)


def _mask_folder(out_dir: str | None, overwrite: bool) -> Path:
    if out_dir is None:
        raise click.UsageError("a dense model writes one mask PNG per image: pass --out DIR")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise click.UsageError(f"--out {out}: not empty; pass --overwrite to write into it")
    return out


def report(found: tuple[Any, Path], run_dir: str, test_set: str | None, out_dir: str | None, overwrite: bool,
           batch_size: int, no_verify: bool) -> None:
    """The candidates and the choice (dense.json); on TEST_SET the scores and a picture of a few images."""
    import json

    ckpt, path = found
    run = Path(run_dir)
    summary_path = run / SUMMARY_NAME
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{summary_path}: unreadable dense run summary ({e.__class__.__name__})") from None
    out = Path(out_dir) if out_dir else run / "report"
    targets = [out / "report.json", out / "masks.png"]
    if any(p.exists() for p in targets) and not overwrite:
        raise click.UsageError(f"{out}: already holds a report; pass --overwrite or --out another folder")
    chosen = summary.get("chosen_name", summary["chosen"])
    click.echo(f"segmentation run: chose {chosen} on {summary['val_rows']} validation images "
               f"({summary['train_rows']} trained on)")
    click.echo(f"  {'model':<22} {'val mIoU':>8} {'pixel acc':>9} {'epoch':>5} {'params':>9} {'train s':>8}")
    for c in summary["candidates"]:
        miou = "-" if c.get("val_miou") is None else f"{c['val_miou']:.4f}"
        acc = "-" if c.get("val_pixel_accuracy") is None else f"{c['val_pixel_accuracy']:.4f}"
        click.echo(f"  {c.get('name', c['kind']):<22} {miou:>8} {acc:>9} {c['best_epoch']:>5} {c['parameters']:>9,} "
                   f"{c['seconds']:>8.1f}")
    body = {"run_dir": run_dir, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    if test_set is not None:
        drawn: list[tuple[np.ndarray, np.ndarray]] = []

        def keep(rows: np.ndarray, predicted: np.ndarray) -> None:
            if len(drawn) < REPORT_PICTURES:
                truth = fs_masks(rows)
                drawn.extend(list(zip(truth, predicted))[:REPORT_PICTURES - len(drawn)])

        fs = _open_against(ckpt, path, test_set, no_verify)
        fs_masks = fs.read_masks
        result = _scored(ckpt, path, test_set, batch_size, no_verify, keep)
        click.echo(f"{summary['chosen']} on {test_set}: mIoU {result['miou']:.4f}, pixel accuracy "
                   f"{result['pixel_accuracy']:.4f} ({result['images']} images)")
        click.echo("\n".join(_class_lines(result["per_class"])))
        body["test"] = result
        write_png(out / "masks.png", _picture(drawn))
        click.echo(f"wrote {out / 'masks.png'}: {len(drawn)} test images, true mask (left) beside predicted (right)")
    else:
        click.echo("pass TEST_SET for mIoU, per-class IoU and the picture of true and predicted masks")
    from mist.formats.atomic import atomic_write_bytes

    atomic_write_bytes(out / "report.json", (json_text(body, indent=1) + "\n").encode())
    click.echo(f"wrote {out / 'report.json'}")


def _picture(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One RGB picture: a row per image, its true mask and its predicted mask side by side, in the palette."""
    palette = label_palette()
    gap = 4
    rows = []
    for truth, predicted in pairs:
        big = [np.kron(m, np.ones((PICTURE_SCALE, PICTURE_SCALE), np.uint8)) for m in (truth, predicted)]
        h = big[0].shape[0]
        spacer = np.full((h, gap), 255, np.uint8)
        rows.append(palette[np.concatenate([big[0], spacer, big[1]], axis=1)])
        rows.append(np.full((gap, rows[-1].shape[1], 3), 128, np.uint8))
    return np.concatenate(rows[:-1], axis=0) if rows else np.zeros((1, 1, 3), np.uint8)
