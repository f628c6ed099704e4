"""Test environment: 8 simulated CPU devices for the sharding tests, no TF in transformers."""

import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests jit the same tiny models: a compilation cache shared by the whole run (and by
# the subprocesses tests start) turns repeated XLA compiles into reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "clipdistill_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")



@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
  """A tiny teacher with random weights (perf.benchmark's 'tiny' shape) saved as an HF
  checkpoint directory; shared by every test file that distils from one."""
  from clipdistill_jax.models import hf
  from clipdistill_jax.perf import benchmark

  config = benchmark.teacher_config_for("tiny")
  path = tmp_path_factory.mktemp("teacher")
  hf.save_pretrained(config, benchmark.random_params(config, 3), path)
  return str(path)
