"""Two processes on localhost train like one: jax.distributed over CPU (gloo collectives).

The tiny run of trainer_procs.py, once as one process with 2 devices, then as two processes of
1 CPU device each (a 2-host "pod": JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, one shared workdir). Same mesh shape (data=2), same global batch of 16, each host
feeding its own 8 examples: the two runs must agree.
"""

import socket
import time

import jax
import numpy as np
from trainer_procs import TOTAL_STEPS, main_env, run_main, start_main, tail

from clipdistill_jax import checkpoints
from clipdistill_jax.writers import read_jsonl

# The gradient all-reduce over 2 devices sums in the same order within one process or across
# two (measured: bit-identical params and losses); the bound allows rounding only.
ATOL = 1e-6
TIMEOUT_S = 900


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(processes: dict, logs: dict) -> dict[str, str]:
  """Waits for every process; one failing stops the rest (a lone host would wait forever)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in processes.values()):
      failed = [n for n, p in processes.items() if p.poll() not in (None, 0)]
      assert not failed and time.monotonic() < deadline, "\n\n".join(
          f"--- {n} (exit {p.poll()})\n{tail(logs[n].read_text())}"
          for n, p in processes.items())
      time.sleep(0.5)
  finally:
    for p in processes.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  return {n: logs[n].read_text() for n in processes}


def test_two_processes_train_like_one_with_two_devices(tmp_path):
  two, one = tmp_path / "two_processes", tmp_path / "one_process"
  code, log = run_main(one, log=tmp_path / "single.log", env=main_env(2))
  assert code == 0, tail(log)

  # Gloo (jax's CPU collectives) gives hosts 30 s to meet at their first collective. jax
  # 0.10.2's compilation cache only ever serves process 0 (only it writes entries, and the
  # keys differ per process), so with the cache on, host 0 skips compiles that host 1 does
  # and arrives that much earlier: off for both hosts, they compile alike.
  coordinator = f"localhost:{free_port()}"
  logs = {f"host{i}": tmp_path / f"host{i}.log" for i in range(2)}
  processes = {
      f"host{i}": start_main(two, log=logs[f"host{i}"], env=main_env(
          1, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID=str(i), JAX_ENABLE_COMPILATION_CACHE="false")) for i in range(2)}
  outputs = wait_all(processes, logs)
  for name, process in processes.items():
    assert process.returncode == 0, f"{name}:\n{tail(outputs[name])}"
  for output in outputs.values():
    assert f"Connecting to JAX distributed service on {coordinator}" in output

  # Both hosts wrote their part of the checkpoint into the shared workdir.
  state = two / "checkpoints" / str(TOTAL_STEPS) / "state"
  assert (state / "array_metadatas" / "process_0").exists()
  assert (state / "array_metadatas" / "process_1").exists()
  _, two_params, two_step = checkpoints.load_student(two)
  _, one_params, one_step = checkpoints.load_student(one)
  assert two_step == one_step == TOTAL_STEPS
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(two_params), jax.tree_util.tree_leaves(one_params), strict=True))

  # Host 0 alone writes metrics; the loss is the global batch's, so it matches step by step.
  two_losses = [r["loss/total"] for r in read_jsonl(two / "metrics.jsonl") if "loss/total" in r]
  one_losses = [r["loss/total"] for r in read_jsonl(one / "metrics.jsonl") if "loss/total" in r]
  assert len(two_losses) == len(one_losses) == TOTAL_STEPS
  assert np.isfinite(two_losses).all()
  loss_diff = float(np.max(np.abs(np.subtract(two_losses, one_losses))))
  print(f"2 processes x 1 device vs 1 process x 2 devices, {TOTAL_STEPS} steps: "
        f"max |param diff| {diff:.1e}, max |loss diff| {loss_diff:.1e}")
  assert diff <= ATOL and loss_diff <= ATOL
