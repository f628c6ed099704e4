"""The benchmark's host-side variants: `loop` (perf/loop.py) and `input` (perf/input_pipeline.py).

run_input writes JPEG photos (perf/photos.py) at `input_jpeg_size`, then measures, each in
its own process pinned to its cores, our pipeline on a manifest and on TFRecords, and the
PyTorch DataLoader peer on the same files, with 1 core and with all cores (`input_cores`),
for each of our image decoders asked for. Figures:

  input_images_per_s_per_core  ours (manifest, the default decoder): images per CPU-second
                               (perf/input_pipeline.py: what one core does alone; the wall
                               clock's images/s / cores is `wall_images_per_s_per_core`),
                               at 1 core and at all cores
  input_ratio_vs_peer          ours / peer per core at the same cores (and `wall_ratio_vs_peer`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipdistill_jax.data import preprocess
from clipdistill_jax.data.tokenizer import DEFAULT_CONTEXT_LENGTH
from clipdistill_jax.perf import common


def run_loop(run_child, *, root: Path, batch_size: int, image_size: int,
             ours_spec: dict[str, Any], steps: int, warmup_steps: int, interval: int,
             checkpoint_every: int | None, repeats: int, log) -> dict[str, Any]:
  """The loop variant in one child process (perf/loop.py): its result dict."""
  # As many bare steps as loop steps; the matmul paired with each (perf/common.py) shrunk to
  # a few microseconds so that nothing but the step runs between two bare steps.
  bare = dict(ours_spec, name="loop_bare", steps=steps, matmul_size=32, matmul_runs=1)
  spec = dict(name="loop", config=ours_spec["config"], bare=bare, batch_size=batch_size,
              image_size=image_size, workdir=str(root / "loop"), steps=steps,
              warmup_steps=warmup_steps, interval=interval, checkpoint_every=checkpoint_every,
              num_images=max(4 * batch_size, 256), repeats=repeats)
  log("running loop (train.train on JPEGs vs the bare step) ...")
  result = run_child("clipdistill_jax.perf.loop", spec)
  if "error" not in result:
    log("  " + _loop_line(result))
  return result


def _cores(requested: int | None) -> list[int]:
  available = common.available_cores()
  return available[:requested] if requested else available


def run_input(run_child, *, root: Path, batch_size: int, image_size: int,
              context_length: int, num_images: int, jpeg_size: tuple[int, int],
              cores: int | None, decoders: tuple[str, ...], batches: int,
              warmup_batches: int, log, repeats: int = 2) -> dict[str, Any]:
  """Our pipeline (manifest, TFRecords; each decoder) and the peer, 1 core and all cores.
  Ours decodes every image it reads (data.decoded_cache_mb=0), except manifest_pil_cached:
  timed after one whole epoch, it reads what the default data.decoded_cache_mb kept of it,
  as training does in every epoch after the first.

  Every measurement runs `repeats` times, the order of ours and the peer's alternating, and
  the best run counts (on a shared machine the quieter run is the closer to what the code
  can do; alternating gives both sides the same chances)."""
  from clipdistill_jax.perf import photos

  data = photos.write_photo_set(root / "input_photos", num_images, size=jpeg_size)
  all_cores = _cores(cores)
  core_sets = [all_cores[:1]] + ([all_cores] if len(all_cores) > 1 else [])
  base = dict(batch_size=batch_size, image_size=image_size, context_length=context_length,
              batches=batches, warmup_batches=warmup_batches)
  runs: dict[str, dict[str, Any]] = {}
  for cpus in core_sets:
    n = len(cpus)
    jobs = [(f"peer_{n}core", dict(side="peer", path=data["manifest"]))]
    for decoder in decoders:
      for source in ("manifest", "tfrecord"):
        jobs.append((f"{source}_{decoder}_{n}core",
                     dict(side="ours", source=source, path=data[source], image_decoder=decoder,
                          decoded_cache_mb=0)))
    if "pil" in decoders:  # a later epoch: a whole one read first, its images then cached
      jobs.append((f"manifest_pil_cached_{n}core",
                   dict(side="ours", source="manifest", path=data["manifest"],
                        image_decoder="pil",
                        warmup_batches=warmup_batches + -(-num_images // batch_size))))
    tries: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in jobs}
    for repeat in range(repeats):
      for name, job in (jobs if repeat % 2 == 0 else jobs[::-1]):
        log(f"running input {name} ({repeat + 1}/{repeats}) ...")
        result = run_child("clipdistill_jax.perf.input_pipeline",
                           dict(base, name=f"input_{name}", cpus=cpus, **job))
        tries[name].append(result)
        if "error" not in result:
          log(f"  {name}: {result['images_per_s']:.0f} images/s, "
              f"{result['images_per_cpu_s']:.0f} per CPU-second")
    for name, results in tries.items():
      ok = [r for r in results if "error" not in r]
      runs[name] = (dict(max(ok, key=lambda r: r["images_per_cpu_s"]),
                         all_images_per_s=[r["images_per_s"] for r in ok],
                         all_images_per_cpu_s=[r["images_per_cpu_s"] for r in ok])
                    if ok else results[-1])
  return {"settings": {**base, "num_images": num_images, "repeats": repeats,
                       "jpeg_size": list(jpeg_size),
                       "mean_jpeg_bytes": data["mean_jpeg_bytes"], "cores": len(all_cores),
                       "decoders": list(decoders),
                       "default_decoder": preprocess.DEFAULT_IMAGE_DECODER},
          "runs": runs, **input_figures(runs, len(all_cores))}


def input_figures(runs: dict[str, dict[str, Any]], cores: int) -> dict[str, Any]:
  """Per-core images/s (per CPU-second; and by the wall clock / cores) and ratios to the
  peer at the same cores, for every run."""
  def figures(key: str, per: bool):
    def rate(name):
      r = runs.get(name)
      return None if r is None or "error" in r or key not in r else r[key]
    per_core, ratios = {}, {}
    for name in runs:
      n = int(name.rsplit("_", 1)[1].removesuffix("core"))
      if rate(name) is not None:
        per_core[name] = rate(name) / (n if per else 1)
      peer = rate(f"peer_{n}core")
      if not name.startswith("peer") and rate(name) is not None and peer:
        ratios[name] = rate(name) / peer
    return per_core, ratios

  per_core, ratios = figures("images_per_cpu_s", per=False)
  wall_per_core, wall_ratios = figures("images_per_s", per=True)
  default = f"manifest_{preprocess.DEFAULT_IMAGE_DECODER}"
  return {
      "images_per_s_per_core": per_core, "ratio_vs_peer": ratios,
      "wall_images_per_s_per_core": wall_per_core, "wall_ratio_vs_peer": wall_ratios,
      "input_images_per_s_per_core": {f"{n}core": per_core.get(f"{default}_{n}core")
                                      for n in sorted({1, cores})},
      "input_ratio_vs_peer": {f"{n}core": ratios.get(f"{default}_{n}core")
                              for n in sorted({1, cores})},
  }


def run_variants(names, run_child, *, root: Path, log, batch_size: int, student_config,
                       ours_spec: dict[str, Any], loop: dict[str, Any],
                       input: dict[str, Any]) -> dict[str, Any]:
  """The loop and input variants named in `names`: their report sections and headline
  figures (loop_efficiency, input_images_per_s_per_core, input_ratio_vs_peer)."""
  out: dict[str, Any] = {}
  if "loop" in names:
    result = run_loop(run_child, root=root, batch_size=batch_size,
                           image_size=student_config.vision_config.image_size,
                           ours_spec=ours_spec, log=log, **loop)
    out["loop"] = result
    out["loop_efficiency"] = result.get("loop_efficiency")
    out["loop_efficiency_in_memory"] = result.get("loop_efficiency_in_memory")
    out["loop_efficiency_cpu_ceiling"] = result.get("loop_efficiency_cpu_ceiling")
  if "input" in names:
    result = run_input(run_child, root=root, batch_size=batch_size,
                            context_length=DEFAULT_CONTEXT_LENGTH,  # CLIP's 77, as image_size
                            log=log, **input)
    out["input"] = result
    out["input_images_per_s_per_core"] = result["input_images_per_s_per_core"]
    out["input_ratio_vs_peer"] = result["input_ratio_vs_peer"]
  return out


def _loop_line(loop: dict[str, Any]) -> str:
  runs = ", ".join(f"{e:.3f}" for e in loop["loop_efficiency_all"])
  return (f"loop: {loop['loop']['steps_per_s']:.2f} steps/s vs the bare step's "
          f"{loop['bare']['steps_per_s']:.2f}: loop_efficiency {loop['loop_efficiency']:.3f} "
          f"(median of {runs}); in memory {loop['loop_efficiency_in_memory']:.3f}; the cores "
          f"allow {loop['loop_efficiency_cpu_ceiling']:.3f} "
          f"({loop['loop']['cpu_s_per_step'] * 1e3:.1f} ms of CPU per loop step, "
          f"{loop['bare']['cpu_s_per_step'] * 1e3:.1f} per bare step, {loop['cores']} cores)")


def summary_lines(report: dict[str, Any]) -> list[str]:
  """The loop and input variants' headline figures, one line each."""
  lines = []
  loop = report.get("loop")
  if loop is not None:
    lines.append(f"loop: error {loop['error']}" if "error" in loop else _loop_line(loop))
  inputs = report.get("input")
  if inputs is not None:
    for name, r in inputs["runs"].items():
      ratio = inputs["ratio_vs_peer"].get(name)
      lines.append(f"input {name}: " + (f"error {r['error']}" if "error" in r else
                   f"{r['images_per_s']:.0f} images/s (wall), "
                   f"{inputs['images_per_s_per_core'][name]:.0f} per core (CPU time)"
                   + ("" if ratio is None else f", {ratio:.2f}x the peer per core")))
  return lines
