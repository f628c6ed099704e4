"""`python -m clipdistill_jax.main` in subprocesses, for the trainer's integration tests.

Every run trains configs/tiny_train.py with the same TRAIN_FLAGS on simulated CPU devices, so
all runs jit the same programs and the compilation cache that conftest.py shares with
subprocesses turns all but the first compile into a read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_train.py"
TOTAL_STEPS, CHECKPOINT_EVERY = 30, 5
# No periodic eval (not under test here, and a second program to compile); a metrics row
# every step, so loss curves can be compared step by step.
TRAIN_FLAGS = ("--config.eval.every=0", f"--config.train.total_steps={TOTAL_STEPS}",
               "--config.train.log_every=1", f"--config.train.checkpoint_every={CHECKPOINT_EVERY}")
_DISTRIBUTED_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def main_env(devices: int = 2, **extra: str) -> dict[str, str]:
  """This environment with `devices` CPU devices and no inherited multi-process settings."""
  env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_VARS}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env


def main_command(workdir: str | os.PathLike, *flags: str, python_code: str | None = None,
                 config: str | os.PathLike = TINY_CONFIG) -> list[str]:
  """The tiny run's command line; `python_code` replaces `-m clipdistill_jax.main`."""
  head = ["-c", python_code] if python_code else ["-m", "clipdistill_jax.main"]
  return [sys.executable, *head, f"--config={config}", f"--workdir={workdir}", *TRAIN_FLAGS,
          *flags]


def start_main(workdir: str | os.PathLike, *flags: str, log: str | os.PathLike,
               env: dict[str, str] | None = None, **command) -> subprocess.Popen:
  """Starts one run (main_command(workdir, *flags, **command)), its output going to `log`."""
  with open(log, "w") as out:
    return subprocess.Popen(main_command(workdir, *flags, **command), cwd=REPO,
                            env=env or main_env(), stdout=out, stderr=subprocess.STDOUT)


def run_main(workdir: str | os.PathLike, *flags: str, log: str | os.PathLike,
             env: dict[str, str] | None = None, timeout: float = 600, **command
             ) -> tuple[int, str]:
  """(exit code, combined stdout/stderr) of one run; the log is also kept in `log`."""
  process = start_main(workdir, *flags, log=log, env=env, **command)
  try:
    process.wait(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, Path(log).read_text()


def tail(log: str, lines: int = 40) -> str:
  """The end of a run's log without absl INFO lines (orbax's chatter), for failure messages."""
  kept = [line for line in log.splitlines() if not re.match(r"I\d{4} ", line)]
  return "\n".join(kept[-lines:])
