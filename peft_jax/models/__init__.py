"""Flax model families that load Hugging Face checkpoints."""
