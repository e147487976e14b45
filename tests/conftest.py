"""Shared test set-up. Tests never reach the network: the hub must fail fast, not hang."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIST_TEST", "1")
