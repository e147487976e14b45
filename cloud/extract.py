"""``mist-cloud extract``: images -> frozen backbone -> Gather* group sums -> a feature set on disk.

Resume is exact. Rows are batched in source order *after* dropping images that fail to decode, and a
shard holds a whole number of batches, so the batches that follow the last committed shard are the same
batches an uninterrupted run computes, and the finished set is byte-identical.

The backbone is built and run by ``frozen.py`` (``load_frozen``, ``FrozenBackbone.gather``), which ``serve`` shares.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mist.formats import FeatureSet, FeatureSetWriter, Manifest
from mist.formats.atomic import atomic_write_bytes
from mist.formats.manifest import MAX_LABEL_MULTIPLE, check_classes, segmentation_task
from mist.formats.quant import SCHEMES, QuantError, bytes_per_row
from mist.formats.writer import MAX_SHARD_BYTES, capped_shard_rows, refuse_complete
from mist.kit.flags import memory_limit, memory_problem
from mist.kit.progress import LineLog, TerminalBar, gauge, resolve_mode
from mist.kit.text import counted, format_duration

from . import distributed
from .backbones import make_transform
from .datasets import ImageDataset, collate, dataset_record, open_source, select
from .errors import CloudError
from .frozen import load_frozen, sum_dtype, torch_device
from .gather import DTYPES, POOLS, SCALES, format_groups
from .resources import address_space_limit
from .segmentation import DEFAULT_LABEL_MULTIPLE, SegmentationDataset, split_batch
from .taps import GroupTap

SKIPPED_NAME = "skipped.txt"
Log = Callable[[str], None]


@dataclass
class ExtractConfig:
    model: str
    weights: str  # "pretrained", "file" or "random-init"
    data: str
    out: Path
    weights_file: str | None = None
    split: str = "train"
    groups: str = "auto"  # the longest run of equal (T, d): valid for every backbone
    scale: str = "none"
    dtype: str = "float16"
    batch_size: int = 16
    workers: int = 1
    threads: int | None = None
    shard_rows: int = 512
    limit: int | None = None
    per_class: int | None = None
    seed: int = 0
    overwrite: bool = False
    img_size: int | None = None
    model_kwargs: dict | None = None  # extra timm.create_model arguments
    device: str = "cpu"  # "cuda", "cuda:N", or "auto"
    autocast: str = "auto"  # "off", "bf16", "fp16"; "auto": per family and device, see cloud/precision.py
    progress: str = "auto"  # "bar", "lines", "none"; "auto": a bar on a terminal, else lines
    log_every: float = 10.0  # seconds between progress lines off a terminal
    crop_pct: float | None = None  # data-config overrides, recorded in the manifest's data_config
    crop_mode: str | None = None
    interpolation: str | None = None
    pool: str = "none"  # "mean" or "cls": ship one pooled token per map (T=1)
    max_memory: int | None = None  # bytes; None: what the machine has available (cloud/resources.py)
    sign_key: Any = None  # a mist.formats.signing.SigningKey: the complete manifest is signed with it
    label_multiple: int = DEFAULT_LABEL_MULTIPLE  # segmentation: label maps are this times the token grid


@dataclass
class ExtractResult:
    manifest: Manifest
    rows_written: int  # by this run
    resumed_rows: int  # already committed when this run started
    skipped: int  # unreadable images, in the whole set
    seconds: float  # the batch loop of this run, from the first image read to the set closed

    @property
    def images_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


def extract(cfg: ExtractConfig, log: Log = print) -> ExtractResult:
    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks, device = distributed.join(torch_device(cfg.device))  # (None, device) in a single process
    if ranks is not None:
        log = _prefixed(log, f"[{ranks.name}] ")
    if not cfg.overwrite:  # a finished set is refused before the model loads (minutes, for a big backbone)
        refuse_complete(cfg.out)
    source = open_source(cfg.data, cfg.split)
    check_classes(source.classes, lambda why: CloudError(f"--data {cfg.data}: the class names {why}"))
    ids = select(source.labels, cfg.limit, cfg.per_class, cfg.seed)
    if len(ids) == 0:
        raise CloudError(f"--data {cfg.data}: the selection is empty")

    limit, _ = memory_limit(cfg.max_memory)
    batch = min(cfg.batch_size, len(ids))
    if cfg.img_size:  # the input batch alone, before a model is built at that size
        problem = memory_problem(2 * batch * 4 * 3 * cfg.img_size**2,
                                 f"--img-size {cfg.img_size} with --batch-size {batch}", cfg.max_memory)
        if problem:
            raise CloudError(problem)
    # Building the model and its one-image probe may not outgrow the allowance (cloud/resources.py).
    with address_space_limit(limit, f"--model {cfg.model} at its input size"):
        frozen = load_frozen(cfg.model, cfg.weights, cfg.weights_file, cfg.img_size, cfg.seed, cfg.groups,
                             cfg.pool, _data_overrides(cfg), device, cfg.autocast, log, model_kwargs=cfg.model_kwargs)
    backbone, model, layers, groups = frozen.backbone, frozen.model, frozen.layers, frozen.groups
    tokens, dim = frozen.tokens, frozen.dim
    manifest = frozen.manifest(cfg.scale, cfg.dtype, classes=source.classes, split=cfg.split,
                               dataset=dataset_record(source, cfg.split, ids, cfg.limit, cfg.per_class, cfg.seed))
    segmenting = source.kind == "segmentation"
    if segmenting:
        if frozen.grid is None or cfg.pool != "none":
            raise CloudError(f"--data {cfg.data}: a segmentation set needs the token grid; --model {cfg.model} at "
                             "these groups has none" + (" (drop --pool)" if cfg.pool != "none" else ""))
        manifest = replace(manifest, task=segmentation_task(frozen.grid, cfg.label_multiple))
    shard_rows = -(-cfg.shard_rows // cfg.batch_size) * cfg.batch_size
    if shard_rows != cfg.shard_rows:
        log(f"shard rows {cfg.shard_rows} -> {shard_rows}, a multiple of the batch size, so a resumed run "
            "computes the same batches")
    # A shard must fit on a FAT32 stick (files < 4 GiB) and stay cheap to redo: cap its size in bytes too.
    row_bytes = bytes_per_row(cfg.dtype, (len(groups), tokens, dim))  # as stored: int8/int4 include scales
    if manifest.label_size is not None:
        row_bytes += manifest.label_size[0] * manifest.label_size[1]  # one byte a label
    capped = capped_shard_rows(shard_rows, row_bytes, cfg.batch_size)
    if capped != shard_rows:
        log(f"shard rows {shard_rows} -> {capped}, so a shard stays under {MAX_SHARD_BYTES >> 20} MiB "
            f"({row_bytes:,} bytes per row; FAT32 sticks hold files under 4 GiB)")
        shard_rows = capped
    progress_mode = "lines" if ranks is not None and cfg.progress == "auto" else cfg.progress

    def features(pending: np.ndarray, skips, progress: _Progress):
        """(features, labels, ids) of ``pending`` in batches of --batch-size, decoded by the DataLoader."""
        transform = make_transform(backbone.data_config)
        dataset = (SegmentationDataset(source, pending, transform) if segmenting
                   else ImageDataset(source, pending, transform))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size,
            num_workers=cfg.workers, collate_fn=collate, shuffle=False, pin_memory=device.type == "cuda")
        with GroupTap(model, layers, groups) as tap, torch.inference_mode():
            for images, labels, row_ids in _rebatch(loader, cfg.batch_size, skips, progress):
                masks = None
                if segmenting:  # the fourth channel is the mask, moved through the image's geometry
                    images, masks = split_batch(images, manifest.label_size)
                sums = frozen.gather(tap, images, cfg.scale, sum_dtype(cfg.dtype))
                progress.update(len(row_ids))
                yield sums.numpy(), labels.numpy(), row_ids.numpy(), masks

    if ranks is not None:
        if segmenting:
            raise CloudError(f"--data {cfg.data}: segmentation sets are extracted in one process, not under torchrun")
        def classification_features(pending: np.ndarray, skips, progress: _Progress):
            for batch, labels, row_ids, _ in features(pending, skips, progress):
                yield batch, labels, row_ids

        done = distributed.extract(ranks, Path(cfg.out), manifest, ids, shard_rows, cfg.overwrite, source.describe,
                                   classification_features,
                                   lambda total: _Progress(total, progress_mode, cfg.log_every, log), log,
                                   signer=cfg.sign_key)
        distributed.leave(ranks)
        return ExtractResult(done.manifest, done.rows_written, done.resumed_rows, done.skipped, done.seconds)

    writer = FeatureSetWriter(cfg.out, manifest, shard_rows=shard_rows, overwrite=cfg.overwrite, signer=cfg.sign_key)
    resumed = writer.rows_done
    pending, last_id = ids, -1
    if resumed:
        last_id = int(FeatureSet(cfg.out, allow_incomplete=True).ids[-1])
        pending = ids[ids > last_id]
        log(f"resuming: {counted(resumed, 'row')} in {counted(len(writer.manifest.shards), 'shard')} already written "
            f"(through source item {last_id})")
    skips = _SkipList(Path(cfg.out) / SKIPPED_NAME, keep_through=last_id, describe=source.describe)

    log(f"extracting {len(pending)} images: {cfg.model}, groups {format_groups(groups)} "
        f"(k={len(groups)}, T={tokens}, d={dim}), scale {cfg.scale}, "
        + (f"pool {cfg.pool}, " if cfg.pool != "none" else "") + f"{cfg.dtype} -> {cfg.out}")
    progress = _Progress(len(pending), cfg.progress, cfg.log_every, log)
    start = time.perf_counter()
    written = 0
    try:
        for batch, labels, row_ids, masks in features(pending, skips, progress):
            try:  # int8/int4: the writer quantises the fp32 sums per token (mist.formats.quant)
                writer.add(batch, labels, row_ids, masks)
            except QuantError as e:
                raise CloudError(f"--dtype {cfg.dtype}: {e}; use --scale mean or --dtype float32") from None
            written += len(row_ids)
        final = writer.close()
    finally:
        progress.close()
        skips.close()
    seconds = time.perf_counter() - start
    log(f"wrote {counted(final.rows, 'row')} ({written} now, {resumed} before) in "
        f"{counted(len(final.shards), 'shard')} to {cfg.out}, {written / max(seconds, 1e-9):.1f} images/s")
    if skips.count:
        log(f"skipped {skips.count} unreadable images, listed in {skips.path}")
    return ExtractResult(final, written, resumed, skips.count, seconds)


def _check(cfg: ExtractConfig) -> None:
    if cfg.batch_size < 1 or cfg.shard_rows < 1 or cfg.workers < 0:
        raise CloudError("--batch-size and --shard-rows must be >= 1, --workers >= 0")
    if cfg.dtype not in DTYPES and cfg.dtype not in SCHEMES:
        raise CloudError(f"--dtype must be one of {(*DTYPES, *SCHEMES)}, got {cfg.dtype!r}")
    if cfg.scale not in SCALES:
        raise CloudError(f"--scale must be one of {SCALES}, got {cfg.scale!r}")
    if (cfg.weights == "file") != bool(cfg.weights_file):
        raise CloudError("--weights FILE goes with weights='file' only")
    if cfg.pool not in POOLS:
        raise CloudError(f"--pool must be one of {POOLS}, got {cfg.pool!r}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise CloudError(f"--crop-pct must lie in (0, 1], got {cfg.crop_pct}")
    if not 1 <= cfg.label_multiple <= MAX_LABEL_MULTIPLE:
        raise CloudError(f"--label-multiple must lie in [1, {MAX_LABEL_MULTIPLE}], got {cfg.label_multiple}")
    for name, value in (("--limit", cfg.limit), ("--per-class", cfg.per_class), ("--img-size", cfg.img_size)):
        if value is not None and value < 1:
            raise CloudError(f"{name} must be >= 1, got {value}")


def _data_overrides(cfg: ExtractConfig) -> dict:
    """--crop-pct, --crop-mode, --interpolation replace the model's own preprocessing; the manifest's
    data_config records the result, so the device's compatibility check still tells two such sets apart."""
    overrides = {"crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode, "interpolation": cfg.interpolation}
    return {key: value for key, value in overrides.items() if value is not None}


def _prefixed(log: Log, prefix: str) -> Log:
    return lambda message: log(prefix + message)


def _rebatch(loader, size: int, skips: _SkipList, progress: _Progress,
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Regroup decoded images into batches of exactly ``size`` (the last may be short), so dropped
    images never shift batch boundaries relative to shard boundaries."""
    held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    count = 0
    for images, labels, ids, bad in loader:
        for item_id, reason in bad:
            skips.add(item_id, reason)
        progress.skipped(len(bad))
        if images is None:
            continue
        if not held and len(images) == size:  # the usual case: pass the loader's batch through, no copy
            yield images, labels, ids
            continue
        held.append((images, labels, ids))
        count += len(images)
        while count >= size:
            merged = [torch.cat(parts) for parts in zip(*held)]
            yield tuple(m[:size] for m in merged)
            held = [tuple(m[size:] for m in merged)]
            count -= size
            if count == 0:
                held = []
    if held:
        yield tuple(torch.cat(parts) for parts in zip(*held))


class _SkipList:
    """``skipped.txt``: one 'id<TAB>item<TAB>reason' line per unreadable image, flushed as it happens.

    On resume only the lines for items up to the last committed row are kept; the rest get redone.
    """

    def __init__(self, path: Path, keep_through: int, describe: Callable[[int], str]):
        self.path, self.describe = path, describe
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                head = line.split("\t", 1)[0]
                if head.isdigit() and int(head) <= keep_through:
                    kept.append(line + "\n")
        atomic_write_bytes(path, "".join(kept).encode())
        self.count = len(kept)
        self._file = open(path, "a")

    def add(self, item_id: int, reason: str) -> None:
        self._file.write(f"{item_id}\t{self.describe(item_id)}\t{reason}\n")
        self._file.flush()  # in the OS before any later row is committed, so a kill -9 cannot lose it
        self.count += 1

    def close(self) -> None:
        self._file.close()


class _Progress:
    """Images done of ``total``: a bar on a terminal, a line every ``every`` seconds in a log (mist.kit.progress).

    Skipped images count towards ``total`` but not towards the rate, which is of images actually extracted.
    """

    def __init__(self, total: int, mode: str, every: float, log: Log):
        self.total, self.mode = total, resolve_mode(mode, sys.stderr)
        self.done = self.rows = 0
        self.start = time.perf_counter()
        self.bar, self.lines = TerminalBar(sys.stderr), LineLog(log, every)

    def skipped(self, n: int) -> None:
        self._advance(n)

    def update(self, rows: int) -> None:
        self.rows += rows
        self._advance(rows)

    def _advance(self, n: int) -> None:
        if n == 0:
            return
        self.done += n
        if self.mode == "bar":
            self.bar.draw(lambda: f"extracting {gauge(self.done, self.total)} {self._counts()}")
        elif self.mode == "lines":
            self.lines.write(self._counts)

    def _counts(self) -> str:
        rate = self.rows / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{self.done}/{self.total} images, {rate:.1f} images/s, ETA {format_duration(eta)}"

    def close(self) -> None:
        self.bar.clear()
