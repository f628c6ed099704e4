"""Our side of the step benchmark: the trainer's own jitted update step, timed.

Run by the benchmark in its own process (`python -m clipdistill_jax.perf.ours --spec S
--out O`): the run (models with the teacher from a directory the benchmark wrote, loss,
optimizer, sharded state, teacher placement, the jitted step) comes from
run_builder.build_run, as the trainer's does.
The student then starts from the weights the peer loads too, so the first-step losses of
both sides can be compared. A spec with `variants` builds all of them in this one process
and times their steps in turn (run_interleaved; the benchmark's --interleave).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipdistill_jax import run_builder, sharding, teacher_cache_format
from clipdistill_jax.models import hf
from clipdistill_jax.perf import common


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled computation by XLA's cost analysis (a dict, or a list of one dict
  per program on some versions); None where the backend does not report them."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def matmul_runner(n: int, device: jax.Device):
  """A blocking jitted fp32 [n, n] @ [n, n] on one device (for common.matmul_peak)."""
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.random((n, n), np.float32), device)
  b = jax.device_put(rng.random((n, n), np.float32), device)
  dot = jax.jit(jnp.dot)
  return lambda: dot(a, b).block_until_ready()


def _student_params(student_dir: str) -> Any:
  """fp32 master weights (the student's `dtype` is its compute dtype, as in init_state)."""
  return hf.load_pretrained(student_dir)[1]


@dataclasses.dataclass
class _Built:
  """One variant, compiled and stepped once (first-step losses) plus its warm-up steps."""
  spec: dict[str, Any]
  step: Any
  mesh: Any
  devices: list
  info: dict[str, Any]


def _build(spec: dict[str, Any]) -> _Built:
  started = time.perf_counter()
  config = ml_collections.ConfigDict(spec["config"])
  cached = bool(spec["cached_teacher"])
  devices = jax.devices()[:spec.get("num_devices") or jax.device_count()]

  # --- the run, assembled as the trainer assembles it (run_builder.build_run) -------------
  models = run_builder.build_models(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=devices)
  host_batch = common.make_batch(spec["batch_size"], **spec["batch_shape"], seed=spec["seed"])
  scale = None
  if cached:  # what the cache holds for this batch; then the teacher leaves the device
    # cached embeddings carry no logit scale: use the teacher's (as the cache does)
    scale = teacher_cache_format.teacher_logit_scale(models.teacher_params)
    teacher_params, _ = run_builder.place_teacher(models, mesh, config.mesh.rules)
    with jax.set_mesh(mesh):
      host_batch.update(cached_teacher_outputs(models.teacher, teacher_params, host_batch,
                                               mesh))
    del teacher_params
  built = run_builder.build_run(config, models, mesh=mesh, rng=jax.random.key(0),
                                cached_teacher_logit_scale=scale)
  state, teacher_params, step_fn = built.state, built.teacher_params, built.step_fn
  state["params"]["student"] = sharding.put_tree(  # the peer's starting point too
      _student_params(spec["student_dir"]), built.state_shardings["params"]["student"])
  batch = sharding.shard_host_batch(host_batch, mesh)

  with jax.set_mesh(mesh):
    compile_start = time.perf_counter()
    compiled = step_fn.lower(state, batch, teacher_params).compile()
    compile_s = time.perf_counter() - compile_start
    setup_s = time.perf_counter() - started - compile_s

    def step():
      nonlocal state
      with jax.set_mesh(mesh):
        state, metrics = compiled(state, batch, teacher_params)
      return jax.block_until_ready(metrics)

    first = {k: float(v) for k, v in jax.device_get(step()).items() if k.startswith("loss/")}
    for _ in range(spec["warmup_steps"]):
      step()
  persistent = sum(x.nbytes for x in jax.tree_util.tree_leaves((state, teacher_params, batch)))
  info = {
      "name": spec["name"], "framework": f"jax {jax.__version__}",
      "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
      "num_devices": len(devices), "cached_teacher": cached,
      "teacher_dtype": config.teacher.dtype,
      "remat_policy": config.student.remat_policy,
      "setup_s": setup_s, "compile_s": compile_s, "xla_flops": xla_flops(compiled),
      "first_step_losses": first, "persistent_bytes": persistent,
  }
  return _Built(spec, step, mesh, devices, info)


def run(spec: dict[str, Any]) -> dict[str, Any]:
  """One variant: build, then `steps` timed steps, each followed by its matmul peak."""
  built = _build(spec)
  matmul = matmul_runner(spec["matmul_size"], built.devices[0])
  n, runs = spec["matmul_size"], spec["matmul_runs"]
  before = common.matmul_peak(matmul, n, runs, "before steps")
  reset_ok = common.reset_peak_rss()
  rss_before = common.rss_bytes()
  times, paired_peaks, cpu = common.time_steps_with_peak(built.step, matmul, n, spec["steps"])
  peak = common.peak_rss_bytes()
  mm = common.best_peak([before, common.matmul_peak(matmul, n, runs, "after steps")])
  return {
      **built.info,
      "step_time": common.summarize_times(times), "step_cpu": common.summarize_times(cpu),
      "paired_matmul_flops_per_s": paired_peaks,
      "rss_before_steps_bytes": rss_before, "peak_rss_bytes": peak,
      "peak_rss_reset": reset_ok,
      "matmul": {**mm, "flops_per_s_all_devices": mm["flops_per_s"] * len(built.devices)},
  }


def run_interleaved(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Several variants (spec['variants']) in this one process, their timed steps taken in
  turn (the order rotating every round), each followed by its matmul peak: whatever the
  machine's speed does, it does to all of them alike, so their ratios are drift-free.
  Host memory is shared here, so each variant reports the process peak during its own steps
  and its persistent bytes (state, teacher, batch) instead of a process of its own."""
  built = [_build(v) for v in spec["variants"]]
  matmul = matmul_runner(spec["matmul_size"], built[0].devices[0])
  n, runs = spec["matmul_size"], spec["matmul_runs"]
  before = common.matmul_peak(matmul, n, runs, "before steps")
  times = {b.info["name"]: [] for b in built}
  cpu = {b.info["name"]: [] for b in built}
  peaks = {b.info["name"]: [] for b in built}
  rss = {b.info["name"]: 0 for b in built}
  for i in range(spec["steps"]):
    for b in built[i % len(built):] + built[:i % len(built)]:
      common.reset_peak_rss()
      t, p, c = common.time_steps_with_peak(b.step, matmul, n, 1)
      name = b.info["name"]
      times[name] += t
      cpu[name] += c
      peaks[name] += p
      rss[name] = max(rss[name], common.peak_rss_bytes() or 0)
  mm = common.best_peak([before, common.matmul_peak(matmul, n, runs, "after steps")])
  return {b.info["name"]: {
      **b.info, "interleaved_with": [x.info["name"] for x in built],
      "step_time": common.summarize_times(times[b.info["name"]]),
      "step_cpu": common.summarize_times(cpu[b.info["name"]]),
      "paired_matmul_flops_per_s": peaks[b.info["name"]],
      "peak_rss_bytes": rss[b.info["name"]], "peak_rss_shared_process": True,
      "matmul": {**mm, "flops_per_s_all_devices": mm["flops_per_s"] * len(b.devices)},
  } for b in built}


def cached_teacher_outputs(teacher, teacher_params, host_batch: dict[str, np.ndarray], mesh
                           ) -> dict[str, np.ndarray]:
  """The teacher's embeddings of the batch as the teacher cache stores them (bf16)."""
  def embed(params, batch):
    out = teacher.apply({"params": params}, batch["image"], batch["input_ids"],
                        batch["attention_mask"])
    return {"teacher_image_embeds": out.image_embeds.astype(jnp.bfloat16),
            "teacher_text_embeds": out.text_embeds.astype(jnp.bfloat16)}
  outputs = jax.jit(embed)(teacher_params, sharding.shard_host_batch(host_batch, mesh))
  return {k: np.asarray(jax.device_get(v)) for k, v in outputs.items()}


def main(argv: list[str] | None = None) -> None:
  common.child_main(lambda spec: run_interleaved(spec) if "variants" in spec else run(spec),
                    __doc__, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
