"""Shipping feature sets between folders (a USB stick, an SD card) and object storage (``s3://bucket/prefix``).

- ``store.py``: the ``Store`` protocol and ``open_store`` (a path or a URL -> a store); ``local.py`` and
  ``s3.py``, one store each. A third store is one new file plus one line in ``store.py``.
- ``copy.py``: copy and verify, streamed, checksummed, resumable, manifest last; ``listing.py``: ``ls``.
- ``progress.py``: the bar and the per-shard lines; ``commands.py``: the click commands both CLIs register.

Not part of the format: it imports ``mist.formats`` (the manifest, atomic writes) and ``mist.kit``, never
either side. Nothing is imported here, so ``mist.ship.commands`` stays light for the CLIs.
"""
