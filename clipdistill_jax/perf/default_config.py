"""The benchmark's default config: config_lib.base_config() (the article's student and losses).

A file so that `scripts/benchmark.py --config.student.arch=...` overrides work without one.
"""

from clipdistill_jax import config_lib


def get_config():
  return config_lib.base_config()
