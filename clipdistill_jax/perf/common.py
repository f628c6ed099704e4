"""What both sides of the step benchmark share: batches, timing, host memory, model FLOPs.

Numpy only (no jax, no torch), so the PyTorch peer's process imports nothing of ours that
would inflate its memory or its start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

BOS_ID, EOS_ID = 49406, 49407


# --- the child processes --------------------------------------------------------------------

def child_main(run: Callable[[dict[str, Any]], Any], doc: str, argv: list[str] | None) -> None:
  """`python -m <module> --spec S --out O`: run(spec read from S), its result written to O
  as JSON (how the benchmark talks to ours.py and peer.py)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--spec", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  with open(args.spec) as f:
    spec = json.load(f)
  result = run(spec)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


# --- inputs ---------------------------------------------------------------------------------

def make_batch(batch_size: int, image_size: int, context_length: int, vocab_size: int,
               eos_token_id: int = EOS_ID, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as the pipeline yields it: NHWC normalized-looking pixels, captions of
  6..20 tokens (BOS ... EOS, then padding) so the text masks are realistic."""
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)
  high = min(vocab_size, BOS_ID)
  input_ids = rng.integers(1, high, (batch_size, context_length)).astype(np.int32)
  lengths = rng.integers(min(6, context_length), min(20, context_length) + 1, batch_size)
  attention_mask = (np.arange(context_length)[None] < lengths[:, None]).astype(np.int32)
  input_ids[:, 0] = min(BOS_ID, vocab_size - 1)
  input_ids[np.arange(batch_size), lengths - 1] = eos_token_id
  input_ids = np.where(attention_mask > 0, input_ids, 0).astype(np.int32)
  return {"image": image, "input_ids": input_ids, "attention_mask": attention_mask}



# --- timing ---------------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], runs: int) -> list[float]:
  """Wall seconds of `runs` calls of fn (which must block until its work is done)."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def time_steps_with_peak(step: Callable[[], Any], run_matmul: Callable[[], Any], n: int,
                         steps: int, matmul_runs: int = 3
                         ) -> tuple[list[float], list[float], list[float]]:
  """Times `steps` blocking calls of step; right after each, the matmul peak (FLOP/s of the
  fastest of `matmul_runs` [n, n] @ [n, n]). Each step is paired with a peak measured under
  the same machine conditions: on a shared host the CPU's speed drifts by 20-30% within
  minutes (other tenants), and a step divided by its own neighbouring peak cancels most of
  that drift. Returns (wall seconds, paired FLOP/s, process CPU seconds) per step, the CPU
  time of all the process's threads during the step (time.process_time)."""
  times, peaks, cpu = [], [], []
  for _ in range(steps):
    cpu_start, start = time.process_time(), time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
    peaks.append(matmul_flops(n) / min(time_calls(run_matmul, matmul_runs)))
  return times, peaks, cpu


def summarize_times(times: list[float]) -> dict[str, Any]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": len(times), "all_s": list(times)}


def matmul_flops(n: int) -> float:
  return 2.0 * n ** 3


def matmul_peak(run_matmul: Callable[[], Any], n: int, runs: int, label: str
                ) -> dict[str, Any]:
  """Median FLOP/s of `runs` calls of a blocking [n, n] @ [n, n] (after one warm-up)."""
  run_matmul()
  stats = summarize_times(time_calls(run_matmul, runs))
  return {"n": n, "when": label, **stats, "flops_per_s": matmul_flops(n) / stats["median_s"]}


def best_peak(measurements: list[dict[str, Any]]) -> dict[str, Any]:
  """The peak of several matmul measurements (before and after the timed steps): on a
  shared machine the quieter one is the closer to what the device can do, and taking it
  makes our fraction of peak the conservative one."""
  best = max(measurements, key=lambda m: m["flops_per_s"])
  return {**best, "measurements": measurements}


def available_cores() -> list[int]:
  """The CPU cores this process may run on (its affinity; all of them where there is none)."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


# --- host memory ----------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
  """VmHWM: the process's peak resident set (since start or the last reset)."""
  kib = _status_kib("VmHWM")
  return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs); False where
  that is not permitted, in which case the peak also covers setup and compilation."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def load_average() -> tuple[float, float, float] | None:
  try:
    return os.getloadavg()
  except OSError:
    return None


# --- model FLOPs ----------------------------------------------------------------------------

def tower_forward_flops(*, tokens: int, hidden: int, intermediate: int, layers: int) -> float:
  """Multiply-adds x 2 of one example through a pre-LN transformer tower: q/k/v/out and the
  MLP (2*T*H*(4H + 2I) per layer) plus the two attention matmuls (2 * 2*T*T*H)."""
  per_layer = 2 * tokens * hidden * (4 * hidden + 2 * intermediate) + 4 * tokens ** 2 * hidden
  return float(layers * per_layer)


def clip_forward_flops(config: Mapping[str, Any], batch_size: int) -> float:
  """Forward FLOPs of a CLIP model (an HF config dict) on one batch: both towers over every
  position (text padding included: it is computed), patch embedding, projections, logits.
  Norms, softmax and activations are left out (a few percent)."""
  v, t, proj = config["vision_config"], config["text_config"], config["projection_dim"]
  patches = (v["image_size"] // v["patch_size"]) ** 2
  vision = tower_forward_flops(tokens=patches + 1, hidden=v["hidden_size"],
                               intermediate=v["intermediate_size"],
                               layers=v["num_hidden_layers"])
  vision += 2 * patches * 3 * v["patch_size"] ** 2 * v["hidden_size"] + 2 * v["hidden_size"] * proj
  length = t["max_position_embeddings"]
  text = tower_forward_flops(tokens=length, hidden=t["hidden_size"],
                             intermediate=t["intermediate_size"], layers=t["num_hidden_layers"])
  text += 2 * t["hidden_size"] * proj
  return float(batch_size * (vision + text) + 2 * batch_size ** 2 * proj)


def projector_forward_flops(student: Mapping[str, Any], teacher: Mapping[str, Any],
                            batch_size: int, *, feature: bool,
                            vision_hidden_pairs: int, text_hidden_pairs: int) -> float:
  """The learned student->teacher maps of the feature and hidden-state losses."""
  flops = 0.0
  if feature:
    flops += 2 * 2 * batch_size * student["projection_dim"] * teacher["projection_dim"]
  sv, tv = student["vision_config"], teacher["vision_config"]
  st, tt = student["text_config"], teacher["text_config"]
  vision_tokens = (sv["image_size"] // sv["patch_size"]) ** 2 + 1
  flops += vision_hidden_pairs * 2 * batch_size * vision_tokens * sv["hidden_size"] * tv[
      "hidden_size"]
  flops += text_hidden_pairs * 2 * batch_size * st["max_position_embeddings"] * st[
      "hidden_size"] * tt["hidden_size"]
  return float(flops)


def train_step_flops(student: Mapping[str, Any], teacher: Mapping[str, Any] | None,
                     batch_size: int, *, online_teacher: bool, feature: bool = False,
                     vision_hidden_pairs: int = 0, text_hidden_pairs: int = 0
                     ) -> dict[str, float]:
  """Model FLOPs of one distillation step: the trained parts (student + projectors) count
  3x their forward (forward, then backward = 2x), the frozen teacher 1x (forward only)."""
  student_fwd = clip_forward_flops(student, batch_size)
  projectors = 0.0 if teacher is None else projector_forward_flops(
      student, teacher, batch_size, feature=feature, vision_hidden_pairs=vision_hidden_pairs,
      text_hidden_pairs=text_hidden_pairs)
  teacher_fwd = clip_forward_flops(teacher, batch_size) if (teacher and online_teacher) else 0.0
  return {"student_forward": student_fwd, "teacher_forward": teacher_fwd,
          "projectors_forward": projectors,
          "step": 3 * (student_fwd + projectors) + teacher_fwd}
