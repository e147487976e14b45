"""Shared test set-up. Tests never reach the network: the hub must fail fast, not hang."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIST_TEST", "1")

from serve_helpers import vit  # noqa: E402, F401 - the served ViT, built once for test_serve.py and test_serve_guard.py
