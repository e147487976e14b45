"""Extraction across processes and machines: ``torchrun --nproc-per-node N -m mist.cloud extract ...``.

The selection (ascending source ids, the canonical row order) is cut into *chunks* of ``shard_rows`` items;
chunk c becomes shard c. The chunks still to do are dealt round-robin to the ranks; a rank extracts each of
its chunks as one shard, commits the shard file atomically and then commits ``parts/chunk-CCCCC.json``
(rows, checksum, the chunk's unreadable images). That record is what a rerun trusts: a shard without one is
redone, so a rank killed at any moment costs at most the chunk it was on. Only after a barrier that every
rank reaches with its chunks committed does rank 0 write ``skipped.txt`` and the complete manifest, in chunk
order; until then ``manifest.json`` says incomplete and lists no shard.

Why the result equals one process's: one process cuts a shard every ``shard_rows`` *decoded* rows, and
``shard_rows`` is a multiple of the batch size. When every image decodes, chunk c holds exactly one
process's shard c, computed in the same batches, so shard files, manifest and ``skipped.txt`` are
byte-identical. When some images do not decode, a chunk's shard is shorter by its skipped images: rows, ids,
labels and their order are the same and the manifest differs only in its shard list (boundaries and
checksums); the values come from differently composed batches, so they agree to the last bit only where
the backend's kernels do not depend on the batch (see docs/cloud.md for what was measured).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mist.formats import Manifest
from mist.formats.atomic import atomic_write_bytes, atomic_write_json
from mist.formats.feature_set import sha256_file
from mist.formats.manifest import MANIFEST_NAME, Shard
from mist.formats.writer import manifest_json, write_shard
from mist.kit.text import counted

from .errors import CloudError

PARTS_DIR = "parts"
# The final barrier waits for the slowest rank, which on a big set can be hours behind the fastest; a rank
# that dies is noticed by torchrun (it stops the others), not by this timeout.
TIMEOUT = timedelta(hours=24)

Batches = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]
Compute = Callable[[np.ndarray, "ChunkSkips", Any], Batches]


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    control: Any  # a gloo process group for the small control messages (None: the default group)

    @property
    def name(self) -> str:
        return f"rank {self.rank} of {self.world}"


def under_torchrun() -> bool:
    """torchrun (or any env:// launcher) sets RANK and WORLD_SIZE; even a world of one then takes the chunk
    path, so ``--nproc-per-node 1`` can finish what a killed ``--nproc-per-node 4`` run left."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(device: torch.device) -> tuple[Ranks | None, torch.device]:
    """Join the job torchrun started (None when not under torchrun), and pick this rank's device:
    ``cuda`` without an index means the GPU of this rank's local rank."""
    if not under_torchrun():
        return None, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=TIMEOUT)
        # Object collectives over nccl would stage every message on the GPU; the control messages are tiny.
        control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else None
    except (RuntimeError, ValueError) as e:
        raise CloudError(f"torch.distributed: cannot join the job ({_first_line(e)})") from None
    return Ranks(rank, world, local_rank, control), device


def leave(ranks: Ranks | None) -> None:
    if ranks is not None and dist.is_initialized():
        dist.destroy_process_group()


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.json"


class ChunkSkips:
    """The unreadable images of one chunk, as ``skipped.txt`` lines; committed with the chunk's record."""

    def __init__(self, describe: Callable[[int], str]):
        self.describe, self.lines = describe, []

    def add(self, item_id: int, reason: str) -> None:
        self.lines.append(f"{item_id}\t{self.describe(item_id)}\t{reason}\n")


@dataclass
class Outcome:
    manifest: Manifest  # the complete manifest (as rank 0 wrote it; every rank returns it)
    rows_written: int  # by this rank in this run
    resumed_rows: int  # in chunks committed before this run, all ranks
    skipped: int  # unreadable images, in the whole set
    seconds: float  # this rank's chunk loop


def extract(ranks: Ranks, out: Path, manifest: Manifest, ids: np.ndarray, shard_rows: int, overwrite: bool,
            describe: Callable[[int], str], compute: Compute, make_progress: Callable[[int], Any],
            log: Callable[[str], None], signer: Any = None) -> Outcome:
    """Extract this rank's share of ``ids`` into ``out``; rank 0 writes the manifest once all are done."""
    out = Path(out)
    chunks = [ids[i:i + shard_rows] for i in range(0, len(ids), shard_rows)]
    layout = manifest.layout_fingerprint()
    prints = _all_gather(ranks, layout)
    for rank, other in enumerate(prints):
        if other != layout:
            raise CloudError(f"rank {rank} would write a different feature set than rank 0 (another mist, torch "
                             "or timm version, other weights or other data on that machine?)")

    plan = _prepare(out, manifest, chunks, shard_rows, overwrite) if ranks.rank == 0 else None
    plan = _broadcast(ranks, plan)
    if "error" in plan:
        raise CloudError(plan["error"])
    _check_shared_directory(ranks, out)
    pending = plan["pending"]
    if ranks.rank == 0 and plan["resumed_rows"]:
        log(f"resuming: {len(chunks) - len(pending)} of {len(chunks)} shards ({plan['resumed_rows']} rows) "
            "already written")
    mine = pending[ranks.rank::ranks.world]
    total = sum(len(chunks[c]) for c in mine)
    log(f"extracting {total} images in {len(mine)} of {len(chunks)} shards -> {out}")
    progress = make_progress(total)
    start = time.perf_counter()
    written = 0
    try:
        for c in mine:
            written += _extract_chunk(out, c, chunks[c], shard_rows, manifest, layout, describe, compute, progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    log(f"wrote {counted(written, 'row')} in {counted(len(mine), 'shard')}, "
        f"{written / max(seconds, 1e-9):.1f} images/s; waiting for the other ranks")

    _barrier(ranks)  # every rank reaches it only with all its chunks committed
    final = _assemble(out, manifest, chunks, layout, signer) if ranks.rank == 0 else None
    final = _broadcast(ranks, final)
    if "error" in final:
        raise CloudError(final["error"])
    complete = Manifest.from_json(final["manifest"])
    if ranks.rank == 0:
        log(f"wrote {counted(complete.rows, 'row')} in {counted(len(complete.shards), 'shard')} to {out} "
            "(manifest by rank 0)")
    return Outcome(complete, written, plan["resumed_rows"], final["skipped"], seconds)


def _extract_chunk(out: Path, c: int, chunk_ids: np.ndarray, shard_rows: int, manifest: Manifest, layout: str,
                   describe: Callable[[int], str], compute: Compute, progress: Any) -> int:
    skips = ChunkSkips(describe)
    parts = list(compute(chunk_ids, skips, progress))
    shard = None
    if parts:
        features, labels, row_ids = (np.concatenate(p) for p in zip(*parts))
        shard = write_shard(out, c, manifest, features, labels, row_ids)
    record = {"layout": layout, "chunk": c, "chunk_items": shard_rows, "ids_sha256": _ids_digest(chunk_ids),
              "shard": None if shard is None else {"file": shard.file, "rows": shard.rows, "sha256": shard.sha256},
              "skipped": skips.lines}
    atomic_write_json(out / PARTS_DIR / chunk_name(c), record)  # the chunk's commit point
    return 0 if shard is None else shard.rows


def _prepare(out: Path, manifest: Manifest, chunks: list[np.ndarray], shard_rows: int,
             overwrite: bool) -> dict[str, Any]:
    """Rank 0: start a fresh set, or find the chunks a killed run committed; the rest are pending."""
    try:
        return _prepare_directory(out, manifest, chunks, shard_rows, overwrite)
    except (CloudError, OSError) as e:
        return {"error": str(e) if isinstance(e, CloudError) else f"{out}: {e.strerror or e}"}


def _prepare_directory(out: Path, manifest: Manifest, chunks: list[np.ndarray], shard_rows: int,
                       overwrite: bool) -> dict[str, Any]:
    from mist.formats import FormatError

    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    layout = manifest.layout_fingerprint()
    done: dict[int, dict] = {}
    if manifest_path.exists() and not overwrite:
        try:
            existing = Manifest.load(manifest_path)
        except FormatError as e:
            raise CloudError(str(e)) from None
        if existing.complete:
            raise CloudError(f"{manifest_path}: the feature set is already complete; pass --overwrite to replace it")
        if existing.layout_fingerprint() != layout:
            raise CloudError(f"{manifest_path}: holds a partial set made with different settings; "
                             "pass --overwrite to start again")
        done = _committed_chunks(out, chunks, shard_rows, layout)
    else:
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
        (out / "skipped.txt").unlink(missing_ok=True)
    for path in (out / PARTS_DIR).glob("rank-*.here"):  # a killed run's marks would hide a missing share
        path.unlink()
    keep = {r["shard"]["file"] for r in done.values() if r["shard"]}
    for path in out.glob("shard-*.safetensors*"):
        if path.name not in keep:  # a one-process set's shards, or written after the last record: redo
            path.unlink()
    (out / PARTS_DIR).mkdir(exist_ok=True)
    if not done:
        atomic_write_json(manifest_path, manifest.with_shards([], complete=False).to_json())
    pending = [c for c in range(len(chunks)) if c not in done]
    resumed = sum(r["shard"]["rows"] for r in done.values() if r["shard"])
    return {"pending": pending, "resumed_rows": resumed}


def _committed_chunks(out: Path, chunks: list[np.ndarray], shard_rows: int, layout: str) -> dict[int, dict]:
    """The chunk records a previous run left whose shard is whole; anything else is deleted and redone."""
    done = {}
    for path in sorted((out / PARTS_DIR).glob("chunk-*.json*")):
        record = _read_record(path)
        if record is not None and record.get("chunk_items") not in (None, shard_rows):
            raise CloudError(f"{out}: partial set was written with --shard-rows {record['chunk_items']}, not "
                             f"{shard_rows}; pass the same --shard-rows or --overwrite")
        c = record.get("chunk") if record else None
        valid = (record is not None and record.get("layout") == layout and isinstance(c, int)
                 and 0 <= c < len(chunks) and path.name == chunk_name(c)
                 and record.get("ids_sha256") == _ids_digest(chunks[c]) and _shard_is_whole(out, record))
        if valid:
            done[c] = record
        else:
            path.unlink()
    return done


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _shard_is_whole(out: Path, record: dict) -> bool:
    shard = record.get("shard")
    if shard is None:
        return True
    try:
        return sha256_file(out / shard["file"]) == shard["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def _check_shared_directory(ranks: Ranks, out: Path) -> None:
    """Fail at once, not after the whole extraction, when the ranks do not all see the same --out."""
    mark = out / PARTS_DIR / f"rank-{ranks.rank}.here"
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(f"{os.uname().nodename}\n")
    _barrier(ranks)
    missing = [r for r in range(ranks.world) if not (out / PARTS_DIR / f"rank-{r}.here").exists()]
    _barrier(ranks)
    mark.unlink(missing_ok=True)
    if missing:
        raise CloudError(f"--out {out}: rank {ranks.rank} cannot see the files of rank(s) "
                         f"{', '.join(map(str, missing))}; on several machines --out must be a shared directory")


def _assemble(out: Path, manifest: Manifest, chunks: list[np.ndarray], layout: str, signer: Any = None,
              ) -> dict[str, Any]:
    """Rank 0, after the barrier: skipped.txt and the complete manifest, in chunk (= canonical row) order."""
    shards: list[Shard] = []
    skipped: list[str] = []
    for c in range(len(chunks)):
        record = _read_record(out / PARTS_DIR / chunk_name(c))
        if record is None or record.get("layout") != layout:
            return {"error": f"{out / PARTS_DIR / chunk_name(c)}: missing or unreadable after every rank "
                             "finished; the manifest was not written; rerun the same command to redo it"}
        if record["shard"]:
            shards.append(Shard(**record["shard"]))
        skipped.extend(record["skipped"])
    atomic_write_bytes(out / "skipped.txt", "".join(skipped).encode())
    complete = manifest.with_shards(shards, complete=True)
    atomic_write_json(out / MANIFEST_NAME, manifest_json(complete, signer))  # signed with --sign-key
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return {"manifest": complete.to_json(), "skipped": len(skipped)}


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


# ---- collectives, with a lost peer as a one-line error ----------------------------------------------------


def _collective(what: Callable[[], Any]) -> Any:
    try:
        return what()
    except RuntimeError as e:  # gloo/nccl: a peer died or the store went away
        raise CloudError(f"lost contact with the other ranks ({_first_line(e)}); nothing was committed to the "
                         "manifest; rerun the same command to resume") from None


def _barrier(ranks: Ranks) -> None:
    _collective(lambda: dist.barrier(group=ranks.control))


def _all_gather(ranks: Ranks, obj: Any) -> list[Any]:
    gathered: list[Any] = [None] * ranks.world
    _collective(lambda: dist.all_gather_object(gathered, obj, group=ranks.control))
    return gathered


def _broadcast(ranks: Ranks, obj: Any) -> Any:
    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=0, group=ranks.control))
    return box[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
