"""Loop benchmark: the trainer's own loop against its bare jitted step, in one process.

Run by the benchmark (`python -m clipdistill_jax.perf.loop --spec S --out O`):

  loop  train.train(config, workdir) as a user runs it: its real data iterator reading a
        manifest of JPEG files (perf/photos.py; written at the model's input size, so that
        the figure is the loop's overhead, not JPEG decoding, which the input benchmark
        measures), its logging every train.log_every steps, checkpoints off (only the final
        save, after the timed steps) or every spec['checkpoint_every'] steps. The trainer is
        called through its public function, never copied, so the figure follows the loop as
        it changes. Its speed is read from the wall clock at every `interval`-th step by an
        evaluator registered for this process ('clock', through eval/evaluators.py's
        registry, the only one config.evals names), which waits for the student's params to
        be ready and notes the time: loop steps/s = steps between first and last note / s.
  loop_in_memory  the same, on a set of as many images held in memory (data.source
        'synthetic' with data.num_train_examples: rendered and tokenized once, then read
        from memory): the loop with an input that costs next to nothing, i.e. what the loop
        itself (prefetch, metrics, logging) leaves of the bare step.
  bare  the same config's jitted step on a fixed device batch (perf/ours.py's 'online'
        variant), timed before and after the loops; steps/s = 1 / median step time.

Both loops run spec['repeats'] times, in turn (each a fresh train.train in its own workdir):
on a small CPU one run's figure moves by several percent with how the step's and the
input's threads happen to share the cores. Each reports its median run (and all of them).

loop_efficiency = loop steps/s / bare steps/s: 1.0 when the loop adds nothing to the step;
loop_efficiency_in_memory likewise for loop_in_memory.

Each loop run and the bare step also report the process's CPU seconds per step (all
threads, time.process_time): loop_extra_cpu_s_per_step is what the loop's input and host
work add to the bare step's, and loop_efficiency_cpu_ceiling the efficiency the host's cores
allow once that work is counted (cpu_ceiling): on a CPU backend the step's compute threads
and the host's work share the same cores, so the loop cannot beat it however it is
scheduled; on an accelerator the step's compute is not host CPU, and the ceiling stays at 1
unless the host's work outgrows its cores.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from clipdistill_jax import train
from clipdistill_jax.eval import evaluators
from clipdistill_jax.perf import common, ours, photos


def run_loop(spec: dict[str, Any]) -> dict[str, Any]:
  """train.train on JPEG files, timed between eval-hook notes (module docstring)."""
  config = ml_collections.ConfigDict(spec["config"])
  root = Path(spec["workdir"])
  size = spec["image_size"]
  data = photos.write_photo_set(root / "photos", spec["num_images"],
                                size=(round(size * 4 / 3), size), num_shards=1)
  interval = spec["interval"]
  first = interval * max(1, -(-spec["warmup_steps"] // interval))
  total = first + interval * max(1, -(-spec["steps"] // interval))
  if spec.get("source", "manifest") == "memory":
    config.data.source, config.data.num_train_examples = "synthetic", spec["num_images"]
  else:
    config.data.source, config.data.path = "manifest", data["manifest"]
  config.train.total_steps = total
  config.train.checkpoint_every = spec.get("checkpoint_every") or total + 1
  config.evals, config.eval.zero_shot = (f"clock@{interval}",), ()  # the clock reads no data
  notes: list[tuple[int, float]] = []

  def clock(config, models, data):
    del config, models, data

    def note(student_params) -> dict:
      jax.block_until_ready(student_params)
      notes.append((len(notes), time.perf_counter(), time.process_time()))
      return {}
    return note

  evaluators.EVALUATORS["clock"] = clock
  started = time.perf_counter()
  train.train(config, str(root / spec.get("run_name", "run")))
  wall = time.perf_counter() - started
  # The clock runs at steps interval, 2 * interval, ..., total (an evaluator's schedule).
  notes = [((i + 1) * interval, t, cpu) for i, t, cpu in notes]
  timed = [note for note in notes if note[0] >= first]
  steps = timed[-1][0] - timed[0][0]
  seconds = timed[-1][1] - timed[0][1]
  rates = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(timed, timed[1:], strict=False)]
  return {"steps_per_s": steps / seconds, "timed_steps": steps, "timed_seconds": seconds,
          "cpu_s_per_step": (timed[-1][2] - timed[0][2]) / steps,
          "interval_steps_per_s": rates, "median_interval_steps_per_s": statistics.median(rates),
          "first_timed_step": first, "total_steps": total, "wall_s": wall,
          "log_every": config.train.log_every,
          "data": {"source": config.data.source, "num_train_examples":
                   config.data.get("num_train_examples")},
          "checkpoint_every": spec.get("checkpoint_every") or None,
          "jpeg_size": [round(size * 4 / 3), size], "mean_jpeg_bytes": data["mean_jpeg_bytes"]}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
  ranked = sorted(runs, key=lambda r: r["steps_per_s"])
  return dict(ranked[(len(ranked) - 1) // 2],
              all_steps_per_s=[r["steps_per_s"] for r in runs])


def cpu_ceiling(bare_step_s: float, loop_cpu_s_per_step: float, cores: int) -> float:
  """The loop efficiency the host's cores allow: a loop step that needs `loop_cpu_s_per_step`
  CPU seconds (all threads: on a CPU backend the step's own compute threads too) takes at
  least that / `cores` seconds even if the work were spread perfectly over the cores, so the
  loop cannot beat bare_step_s / (loop_cpu_s_per_step / cores). Capped at 1 (seconds in,
  a fraction out)."""
  return min(1.0, cores * bare_step_s / loop_cpu_s_per_step)


def run(spec: dict[str, Any]) -> dict[str, Any]:
  """bare, then the JPEG and in-memory loops `repeats` times in turn, then bare again: the
  bare step's median over both bare runs against each loop's median run."""
  bare_before = ours.run(spec["bare"])
  runs: dict[str, list[dict[str, Any]]] = {"manifest": [], "memory": []}
  for repeat in range(spec.get("repeats", 1)):
    for source, results in runs.items():
      results.append(run_loop(dict(spec, source=source, run_name=f"run_{source}_{repeat}")))
  bare_after = ours.run(spec["bare"])
  times = bare_before["step_time"]["all_s"] + bare_after["step_time"]["all_s"]
  bare_step_s = statistics.median(times)
  bare_cpu_s = statistics.median(bare_before["step_cpu"]["all_s"] +
                                 bare_after["step_cpu"]["all_s"])
  loop, in_memory = _median_run(runs["manifest"]), _median_run(runs["memory"])
  cores = len(common.available_cores())
  return {
      "name": "loop", "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "batch_size": spec["batch_size"],
      "repeats": spec.get("repeats", 1), "cores": cores,
      "loop": loop, "loop_in_memory": in_memory,
      "bare": {"step_time": common.summarize_times(times), "steps_per_s": 1.0 / bare_step_s,
               "steps_per_s_before": 1.0 / bare_before["step_time"]["median_s"],
               "steps_per_s_after": 1.0 / bare_after["step_time"]["median_s"],
               "cpu_s_per_step": bare_cpu_s, "compile_s": bare_before["compile_s"]},
      "loop_efficiency": loop["steps_per_s"] * bare_step_s,
      "loop_efficiency_all": [s * bare_step_s for s in loop["all_steps_per_s"]],
      "loop_efficiency_in_memory": in_memory["steps_per_s"] * bare_step_s,
      "loop_efficiency_in_memory_all": [s * bare_step_s for s in in_memory["all_steps_per_s"]],
      # What each loop step costs the host's CPU beyond the bare step's, and the efficiency
      # the cores would allow with that work spread perfectly over them (cpu_ceiling).
      "loop_extra_cpu_s_per_step": loop["cpu_s_per_step"] - bare_cpu_s,
      "loop_in_memory_extra_cpu_s_per_step": in_memory["cpu_s_per_step"] - bare_cpu_s,
      "loop_efficiency_cpu_ceiling": cpu_ceiling(bare_step_s, loop["cpu_s_per_step"], cores),
      "loop_efficiency_in_memory_cpu_ceiling": cpu_ceiling(
          bare_step_s, in_memory["cpu_s_per_step"], cores),
      "loop_images_per_s": loop["steps_per_s"] * spec["batch_size"],
      "bare_images_per_s": spec["batch_size"] / bare_step_s,
  }


def main(argv: list[str] | None = None) -> None:
  common.child_main(run, __doc__, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
