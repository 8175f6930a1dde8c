"""Tests of ``peft_jax.data``."""
