"""Where a feature set is shipped to or from: the ``Store`` protocol, and ``open_store`` for a path or a URL.

A store holds one feature set's files (``manifest.json`` and its shards) under a folder, a key prefix or the
like. The copy, verify and list code (``copy.py``, ``listing.py``) sees only the operations of ``Store``;
nothing there asks which kind of store it has.

Adding a store is one new file and one registration line: write ``ship/<scheme>.py`` with a class that has
every method of ``Store`` and a module-level ``from_url(url, endpoint_url, part_size)`` that returns one
(``s3.py`` is the example; import heavy client libraries inside functions, so the base install never needs
them), then add ``"<scheme>": "mist.ship.<scheme>"`` to ``URL_STORES`` below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib import import_module
from typing import Protocol

from mist.formats import FormatError

CHUNK = 4 << 20  # bytes per read while streaming

# URL scheme -> the module of its store, whose from_url opens such a URL; imported only when one is opened.
URL_STORES = {
    "s3": "mist.ship.s3",
}


class ShipError(FormatError):
    """A copy cannot go on: unreachable store, refused credentials, full or read-only destination, bad shard.

    A FormatError, so both CLIs print it as their one-line error. ``transient`` marks a dropped connection
    that a retry may cure.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Store(Protocol):
    """The files of one feature set, wherever they are kept. Every failure is raised as a ShipError."""

    def where(self, name: str | None = None) -> str:
        """The store (or the file ``name`` in it) as a user would write it: a path or a URL, for messages."""

    def place(self) -> str:
        """Where the set lives, normalised: two stores with the same place hold the very same files."""

    def read_small(self, name: str) -> bytes | None:
        """The whole file ``name`` (a manifest), or None when there is none."""

    def sizes(self) -> dict[str, int]:
        """Every file of the set with its size in bytes ({} when the store does not exist yet)."""

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes]:
        """The bytes of ``name``, streamed in pieces of about ``size``."""

    def write(self, name: str, chunks: Iterable[bytes], check: Callable[[], None], sha256: str, size: int) -> None:
        """Store ``chunks`` (``size`` bytes whose digest is ``sha256``) as ``name``; call ``check()`` once every
        chunk is consumed and make the file visible only if it returns. Nothing partial may read as whole."""

    def write_manifest(self, data: bytes) -> None:
        """Store the manifest, atomically: it goes last and marks the set complete."""

    def delete(self, name: str) -> None:
        """Remove ``name`` if it is there."""

    def check_room(self, needed: int, largest: int) -> None:
        """Refuse before copying when ``needed`` more bytes, or one file of ``largest`` bytes, cannot fit."""

    def folders(self, depth: int) -> Iterator[tuple[Store, dict[str, int]]]:
        """Each folder at or below this store (``depth`` levels at most, where the store has levels) as a store
        of its own, with its files and their sizes: what ``ls`` looks through for feature sets."""


def is_url(text: str) -> bool:
    return "://" in text


def open_store(url_or_path: str, endpoint_url: str | None = None, part_size: int | None = None) -> Store:
    """A folder path or a URL such as ``s3://bucket/prefix``. ``endpoint_url`` and ``part_size`` (bytes; None:
    the store's default) are for stores that have them; the others ignore them."""
    from .local import LocalStore

    if not is_url(url_or_path):
        return LocalStore(url_or_path)
    scheme = url_or_path.partition("://")[0]
    if scheme not in URL_STORES:
        urls = ", ".join(f"{s}://" for s in URL_STORES)
        raise ShipError(f"{url_or_path}: only local paths and {urls} URLs are supported")
    return import_module(URL_STORES[scheme]).from_url(url_or_path, endpoint_url, part_size)
