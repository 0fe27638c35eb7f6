"""Runnable recipes and their offline assets: the demo (and the assets it fetches from pinned PyPI wheels)."""
