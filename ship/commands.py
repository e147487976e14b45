"""The click faces of shipping: ``mist-cloud push``, ``mist-device pull`` and ``ls``, and ``verify`` of a URL.

``cloud/cli.py`` registers ``push``; ``device/cli.py`` registers ``pull`` and ``ls`` and sends ``verify
s3://...`` to ``verify_url``. This module imports only click and the kit, so either CLI can import it before
``--threads`` has set the BLAS thread count; the copying (which loads NumPy through mist.formats) is imported
inside the commands.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, TextIO

import click

from mist.kit.flags import Size
from mist.kit.progress import MODES
from mist.kit.text import counted

from .trust import current_trust, trust_options

if TYPE_CHECKING:
    from .copy import Report


def endpoint_option(command: str):
    """--endpoint-url, read from MIST_<COMMAND>_ENDPOINT_URL or the shared MIST_S3_ENDPOINT_URL."""
    return click.option("--endpoint-url", metavar="URL", default=None,
                        envvar=[f"MIST_{command.upper()}_ENDPOINT_URL", "MIST_S3_ENDPOINT_URL"],
                        help="An S3-compatible endpoint (MinIO, Ceph, R2), e.g. http://minio:9000. "
                             "Credentials: the usual AWS variables, files, profiles.")


PROGRESS = click.option("--progress", type=click.Choice(MODES), default="auto",
                        help="On stderr. auto: a bar on a terminal, one line per shard otherwise.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace a different feature set already at DESTINATION.")


def run_copy(verb: str, source: str, destination: str, endpoint_url: str | None = None, overwrite: bool = False,
             max_rate: int | None = None, part_size: int | None = None, as_json: bool = False,
             progress: str = "auto", out: TextIO | None = None, trust=None) -> Report:
    """What ``push`` and ``pull`` do: open both ends, copy with progress, print a line or JSON.
    ``max_rate`` is bytes per second, ``part_size`` bytes."""
    from .copy import copy_set
    from .progress import choose_progress, summary_line
    from .store import open_store

    out = out or sys.stdout
    src = open_store(source, endpoint_url)
    dst = open_store(destination, endpoint_url, part_size=part_size)
    shown = choose_progress("none" if as_json and progress == "auto" else progress, verb)
    report = copy_set(src, dst, shown, overwrite=overwrite,
                      max_rate=max_rate, trust=trust)
    out.write((json.dumps(report.to_json(), indent=2) if as_json else summary_line(verb, report)) + "\n")
    out.flush()
    return report


def verify_url(location: str, endpoint_url: str | None = None, as_json: bool = False, progress: str = "auto",
               out: TextIO | None = None, trust=None) -> Report:
    """``mist-device verify`` for a URL: stream every shard, hash it, name the first bad one."""
    from .copy import verify_set
    from .progress import choose_progress
    from .store import open_store

    out = out or sys.stdout
    store = open_store(location, endpoint_url)
    report = verify_set(store, choose_progress("none" if as_json and progress == "auto" else progress, "verify"),
                        trust=trust)
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.write(f"ok: {report.source} ({counted(report.rows, 'row')}, {counted(len(report.shards), 'shard')}, "
                  "checksums match)\n")
    out.flush()
    return report


@click.command(short_help="Ship a feature set to a USB stick or a bucket, verified.", epilog="""\b
Examples:
  mist-cloud push feats/train /media/usb/fmnist-train
  mist-cloud push feats/train s3://mist-sets/fmnist/train --endpoint-url http://minio.lan:9000
  mist-cloud push feats/train s3://mist-sets/fmnist/train --part-size 128M --max-rate 20M --json""")
@click.argument("feature_set")
@click.argument("destination")
@endpoint_option("push")
@click.option("--part-size", type=Size(5 << 20, 5 << 30), default="64M", metavar="SIZE",
              help="Upload part size (5M to 5G, S3's limits); larger shards upload in parts, each retried with "
                   "backoff.")
@OVERWRITE
@click.option("--max-rate", type=Size(1 << 10), default=None, metavar="SIZE",
              help="Cap the copy at this size per second, e.g. 20M (MiB/s).")
@PROGRESS
@JSON
def push(feature_set: str, destination: str, endpoint_url: str | None, part_size: int, overwrite: bool,
         max_rate: int | None, progress: str, as_json: bool) -> None:
    """Ship FEATURE_SET to DESTINATION: s3://bucket/prefix, or a folder such as a mounted USB stick.

    Every shard's sha256 is checked as it is read and the object is committed only when it matches; the
    manifest goes last. Rerun after an interruption: shards already there and verified are skipped.
    """
    run_copy("push", feature_set, destination, endpoint_url, overwrite=overwrite, max_rate=max_rate,
             part_size=part_size, as_json=as_json, progress=progress)


@click.command(short_help="Copy a feature set from a USB stick or a bucket, verified.", epilog="""\b
Examples:
  mist-device pull /media/usb/fmnist-train feats/train
  mist-device pull s3://mist-sets/fmnist/train feats/train --endpoint-url http://minio.lan:9000
  mist-device pull s3://mist-sets/fmnist/train feats/train --json    # rerun after an interruption""")
@click.argument("source")
@click.argument("destination")
@endpoint_option("pull")
@OVERWRITE
@click.option("--max-rate", type=Size(1 << 10), default=None, metavar="SIZE",
              help="Cap the copy at this size per second, e.g. 20M (MiB/s), on a shared link.")
@PROGRESS
@JSON
@trust_options
def pull(source: str, destination: str, endpoint_url: str | None, overwrite: bool, max_rate: int | None,
         progress: str, as_json: bool) -> None:
    """Copy the feature set at SOURCE to DESTINATION, verified, resumable, manifest last.

    Either end is a folder (e.g. the set on a mounted USB stick) or s3://bucket/prefix. Every shard's sha256
    is checked while it streams; shards already at DESTINATION with the right checksum are skipped, so an
    interrupted pull resumes when rerun. Files and the folder are fsynced before it reports success. The
    manifest's signature is checked (--signatures) before any shard is copied.
    """
    run_copy("pull", source, destination, endpoint_url, overwrite=overwrite, max_rate=max_rate,
             as_json=as_json, progress=progress, trust=current_trust())


@click.command(name="ls", short_help="List the feature sets in a folder or a bucket.", epilog="""\b
Examples:
  mist-device ls /media/usb
  mist-device ls s3://mist-sets/fmnist --json""")
@click.argument("location")
@endpoint_option("ls")
@JSON
def ls(location: str, endpoint_url: str | None, as_json: bool) -> None:
    """List the feature sets in LOCATION (a folder or s3://bucket/prefix): backbone, groups, rows, bytes, state.

    "complete" means the manifest says so and every shard it lists is there; `verify` also checks the bytes.
    """
    from .listing import list_sets
    from .store import open_store

    found = list_sets(open_store(location, endpoint_url))
    if as_json:
        click.echo(json.dumps([{**vars(s), "complete": s.complete} for s in found], indent=2))
        return
    if not found:
        click.echo(f"no feature sets in {location}")
        return
    width = max(len(s.location) for s in found)
    click.echo(f"{'set':<{width}}  {'backbone':<22} {'groups':<16} {'rows':>9} {'bytes':>14}  state")
    for s in found:
        click.echo(f"{s.location:<{width}}  {s.backbone:<22} {s.groups:<16} {s.rows:>9,} {s.bytes:>14,}  {s.status}")
