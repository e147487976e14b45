"""``ls``: the feature sets at or below a store, each with its backbone, groups, rows, bytes and state.

It reads manifests and file sizes only, never the shards' bytes: "complete" means the manifest says so and
every shard it lists is there (``verify`` also hashes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mist.formats import FormatError
from mist.formats.atomic import TMP_SUFFIX
from mist.formats.manifest import MANIFEST_NAME, Manifest

from .store import Store


@dataclass
class SetListing:
    location: str
    backbone: str
    groups: str
    rows: int
    bytes: int
    status: str  # "complete", or "incomplete: why", or "unreadable: why"

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def _describe(location: str, manifest_bytes: bytes | None, files: dict[str, int], manifest_where: str,
              ) -> SetListing:
    shard_files = {n: s for n, s in files.items() if n.startswith("shard-") and not n.endswith(TMP_SUFFIX)}
    if manifest_bytes is None:
        return SetListing(location, "?", "?", 0, sum(shard_files.values()),
                          f"incomplete: no manifest yet ({len(shard_files)} shard files)")
    try:
        m = Manifest.from_json(json.loads(manifest_bytes), source=manifest_where)
    except (FormatError, ValueError, RecursionError) as e:
        return SetListing(location, "?", "?", 0, sum(shard_files.values()), f"unreadable: {e}")
    groups = " | ".join(",".join(map(str, g)) if len(g) <= 2 else f"{g[0]}-{g[-1]}" for g in m.groups)
    missing = [s.file for s in m.shards if s.file not in files]
    listed_bytes = sum(files.get(s.file, 0) for s in m.shards)
    if not m.complete:
        status = "incomplete: still being written"
    elif missing:
        status = f"incomplete: {len(missing)} of {len(m.shards)} shards missing"
    else:
        status = "complete"
    return SetListing(location, m.backbone.get("name", "?"), f"k={m.k} [{groups}]", m.rows, listed_bytes, status)


def list_sets(store: Store, depth: int = 3) -> list[SetListing]:
    """Feature sets at or below ``store`` (a set is a folder with a manifest or shard files).

    ``complete`` here means the manifest says so and every shard it lists is present; it does not hash
    (``verify`` does).
    """
    found = []
    for folder, files in store.folders(depth):
        if MANIFEST_NAME in files or any(n.startswith("shard-") for n in files):
            data = folder.read_small(MANIFEST_NAME) if MANIFEST_NAME in files else None
            found.append(_describe(folder.where(), data, files, folder.where(MANIFEST_NAME)))
    return found
