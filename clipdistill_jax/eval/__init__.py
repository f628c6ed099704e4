"""Evaluation building blocks; the public entry point is clipdistill_jax.evaluate."""
