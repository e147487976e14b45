"""``mist-device pull`` and ``mist-device ls``: fetch feature sets from a USB stick or a bucket, list them.

The copying itself lives in ``mist.formats.ship`` (shared with ``mist-cloud push``); these are its click faces.
"""

from __future__ import annotations

import json

import click

from .validate import finite_float


def endpoint_option(command: str):
    """--endpoint-url, read from MIST_<COMMAND>_ENDPOINT_URL or the shared MIST_S3_ENDPOINT_URL."""
    return click.option("--endpoint-url", metavar="URL", default=None,
                        envvar=[f"MIST_{command.upper()}_ENDPOINT_URL", "MIST_S3_ENDPOINT_URL"],
                        help="An S3-compatible endpoint (MinIO, Ceph, R2), e.g. http://minio:9000. "
                             "Credentials: the usual AWS variables, files, profiles.")


PROGRESS = click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto",
                        help="On stderr. auto: a bar on a terminal, one line per shard otherwise.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")


@click.command(short_help="Copy a feature set from a USB stick or a bucket, verified.", epilog="""\b
Examples:
  mist-device pull /media/usb/fmnist-train feats/train
  mist-device pull s3://mist-sets/fmnist/train feats/train --endpoint-url http://minio.lan:9000
  mist-device pull s3://mist-sets/fmnist/train feats/train --json    # rerun after an interruption""")
@click.argument("source")
@click.argument("destination")
@endpoint_option("pull")
@click.option("--overwrite", is_flag=True, help="Replace a different feature set already at DESTINATION.")
@click.option("--max-rate", type=finite_float(0, min_open=True), default=None,
              help="Cap the copy at this many MiB/s (a shared link).")
@PROGRESS
@JSON
def pull(source: str, destination: str, endpoint_url: str | None, overwrite: bool, max_rate: float | None,
         progress: str, as_json: bool) -> None:
    """Copy the feature set at SOURCE to DESTINATION, verified, resumable, manifest last.

    Either end is a folder (e.g. the set on a mounted USB stick) or s3://bucket/prefix. Every shard's sha256
    is checked while it streams; shards already at DESTINATION with the right checksum are skipped, so an
    interrupted pull resumes when rerun. Files and the folder are fsynced before it reports success.
    """
    from mist.formats.ship_progress import run_copy

    run_copy("pull", source, destination, endpoint_url, overwrite=overwrite, max_rate_mib=max_rate,
             as_json=as_json, progress=progress)


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
    from mist.formats.ship import list_sets, open_store

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


def verify_url(location: str, endpoint_url: str | None, as_json: bool, progress: str) -> None:
    """``mist-device verify`` for an s3:// URL: stream every shard, hash it, name the first bad one."""
    from mist.formats.ship_progress import run_verify

    run_verify(location, endpoint_url, as_json=as_json, progress=progress)
