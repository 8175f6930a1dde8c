"""One module per method; importing this package registers them all."""

from peft_jax.methods import bitfit, full, ia3, lora, ssb, ssl, stacked  # noqa: F401
