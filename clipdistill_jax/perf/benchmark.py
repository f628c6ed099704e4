"""Train-step benchmark: our jitted distillation step next to the PyTorch peer, same run.

For a config and a global batch size it times (median over `steps` after compile and
`warmup_steps`), each in its own child process, run one after another (`repeats` > 1 runs
every variant that many times, alternating the order, and pools the timed steps: on a shared
machine the load drifts over minutes, and alternating spreads the drift over all variants):

  online        our step as train.train() runs it (teacher live, the config's losses)
  cached        our step reading cached teacher embeddings (feature + logit losses only;
                hidden/attention weights set to 0, as cached mode requires)
  bf16_teacher  online with teacher.dtype='bfloat16'
  bf16          (not by default) online with teacher.dtype and student.dtype 'bfloat16'
                (the student's params, gradients and optimizer state stay fp32)
  remat         online with student.remat_policy=`remat_policy`
  peer          the same step in PyTorch (perf/peer.py: transformers CLIPModel, AdamW, fp32)
  loop          (not by default) train.train's whole loop on JPEG files against the bare
                step, and the same loop on images held in memory: loop_efficiency,
                loop_efficiency_in_memory (perf/loop.py)
  input         (not by default) the input pipeline alone against a PyTorch DataLoader peer,
                per core (perf/host.py, perf/input_pipeline.py)

and reports images/s, model FLOPs per step (analytic: 3x the trained forward + 1x the
teacher forward; and XLA's cost analysis of the compiled step, to cross-check), achieved
FLOP/s, its fraction of a dense fp32 [n, n] @ [n, n] matmul measured in the same process on
the same device (jnp.dot for ours, torch.matmul for the peer) right after every timed step
(the median of the per-step fractions; and, stricter, the median step against the best
matmul of the run), the peak host memory (VmHWM) over the timed steps, and the ratios
ours/peer and cached/online. MFU uses the analytic FLOPs.

Weights are random (speed does not depend on their values): the teacher is ViT-B/32-shaped
by default, built on the host with numpy and written with models.hf.save_pretrained so that
both sides load the very same teacher and student; first-step losses are reported for both
and should agree.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from clipdistill_jax.perf import common, host

DEFAULT_VARIANTS = ("online", "cached", "bf16_teacher", "remat", "peer")
HOST_VARIANTS = ("loop", "input")
VARIANTS = (*DEFAULT_VARIANTS, "bf16", *HOST_VARIANTS)


# --- weights --------------------------------------------------------------------------------

def random_params(config, seed: int) -> dict:
  """Host-side random params of a CLIP config (HF's layout via hf.param_shapes): N(0, 0.02)
  weights, unit LayerNorm scales, zero biases, CLIP's initial logit scale. Seconds for
  ViT-B/32, where jitting model.init takes a minute on two cores."""
  import jax

  from clipdistill_jax.models import hf

  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "logit_scale":
      return np.full(shape.shape, config.logit_scale_init_value, np.float32)
    if name == "bias":
      return np.zeros(shape.shape, np.float32)
    if name == "scale":
      return np.ones(shape.shape, np.float32)
    return (rng.standard_normal(shape.shape, np.float32) * 0.02).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, hf.param_shapes(config))


def teacher_config_for(teacher: str):
  """'b32' (CLIP ViT-B/32's shape), 'tiny', or a checkpoint directory (its config.json)."""
  from clipdistill_jax.models.config import CLIPConfig, tiny_config

  if teacher == "b32":
    return CLIPConfig()
  if teacher == "tiny":
    return tiny_config()
  path = Path(teacher) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"teacher={teacher!r}: use 'b32', 'tiny' or a directory with a "
                            "config.json (an HF CLIP checkpoint).")
  return CLIPConfig.from_json_file(path)


# --- specs for the child processes ----------------------------------------------------------

def _variant_config(config: ml_collections.ConfigDict, variant: str, remat_policy: str
                    ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  if variant == "cached":
    c.loss.weights.hidden = 0.0
    c.loss.weights.attention = 0.0
  elif variant == "bf16_teacher":
    c.teacher.dtype = "bfloat16"
  elif variant == "bf16":
    c.teacher.dtype = c.student.dtype = "bfloat16"
  elif variant == "remat":
    c.student.remat_policy = remat_policy
  return c


def _loss_spec(loss) -> dict[str, Any]:
  return {"weights": dict(loss.weights), "temperature": loss.temperature,
          **{k: [list(p) for p in getattr(loss, k)] for k in (
              "vision_hidden_layers", "text_hidden_layers", "vision_attention_layers",
              "text_attention_layers")}}


def _analytic_flops(loss, student: dict, teacher: dict, batch_size: int, online: bool
                    ) -> dict[str, float]:
  active = loss.active_components
  hidden = "hidden" in active
  return common.train_step_flops(
      student, teacher, batch_size, online_teacher=online, feature="feature" in active,
      vision_hidden_pairs=len(loss.vision_hidden_layers) if hidden else 0,
      text_hidden_pairs=len(loss.text_hidden_layers) if hidden else 0)


def _run_child(module: str, spec: dict[str, Any], workdir: Path, timeout_s: float,
               env: dict[str, str]) -> dict[str, Any]:
  name = spec["name"]
  spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
  spec_path.write_text(json.dumps(spec, indent=2, default=str))
  started = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-m", module, "--spec", str(spec_path), "--out",
                           str(out_path)], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"name": name, "error": f"timed out after {timeout_s:.0f} s"}
  if proc.returncode != 0 or not out_path.exists():
    return {"name": name, "error": f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:]}
  result = json.loads(out_path.read_text())
  result["process_wall_s"] = time.perf_counter() - started
  return result


# --- the benchmark --------------------------------------------------------------------------

def run_benchmark(config: ml_collections.ConfigDict, *, batch_size: int, steps: int = 5,
                  warmup_steps: int = 1, variants: Sequence[str] = DEFAULT_VARIANTS,
                  teacher: str = "b32", remat_policy: str = "full",
                  matmul_size: int = 2048, matmul_runs: int = 7,
                  num_devices: int | None = None, peer_threads: int | None = None,
                  peer_compile: bool = False,
                  repeats: int = 1, interleave: bool = False,
                  workdir: str | None = None, timeout_s: float = 3600.0,
                  child_env: dict[str, str] | None = None, log=print,
                  loop_steps: int = 100, loop_interval: int | None = None,
                  loop_checkpoint_every: int | None = None, loop_repeats: int = 3,
                  input_images: int = 640,
                  input_jpeg_size: tuple[int, int] = (500, 375), input_image_size: int = 224,
                  input_cores: int | None = None,
                  input_decoders: Sequence[str] = ("pil", "tf"), input_batches: int = 8,
                  input_warmup_batches: int = 2, input_repeats: int = 2) -> dict[str, Any]:
  """Runs the variants (each in a child process, sequentially) and returns the report.

  child_env: extra environment variables of the child processes (e.g. XLA_FLAGS).
  interleave: run all of our variants in one process, their steps taken in turn (drift-free
  ratios between them; host memory then is the shared process's), the peer in its own.
  loop_*: the loop variant's timed steps, its timing interval (None: train.log_every),
  checkpoint interval (None: off) and runs of each loop (the median counts). input_*: the
  input variant's JPEG count and size (width, height), output size, cores (None: all this
  process may use), image decoders, timed and warm-up batches, runs of each (the best
  counts).
  """
  from clipdistill_jax import run_builder
  from clipdistill_jax.models import hf

  variants = list(variants)
  host_variants = [v for v in variants if v in HOST_VARIANTS]
  variants = [v for v in variants if v not in HOST_VARIANTS]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}.")
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = batch_size
  teacher_config = teacher_config_for(teacher)
  student_config = run_builder.make_student_config(config.student, teacher_config)
  loss = run_builder.make_loss(config, run_builder.Models(student_config, None, teacher_config))

  def _flops_of(variant: str) -> dict[str, float]:
    variant_loss = loss if variant != "cached" else run_builder.make_loss(
        _variant_config(config, "cached", remat_policy),
        run_builder.Models(student_config, None, teacher_config))
    return _analytic_flops(variant_loss, student_config.to_dict(), teacher_config.to_dict(),
                           batch_size, online=variant != "cached")

  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory(prefix="clipdistill_bench_")
    workdir = tmp.name
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  try:
    if Path(teacher).is_dir() or not (variants or "loop" in host_variants):
      teacher_dir = str(teacher)  # (or no models needed: the input variant alone)
    else:
      teacher_dir = str(root / "teacher")
      log(f"writing a random {teacher}-shaped teacher to {teacher_dir}")
      hf.save_pretrained(teacher_config, random_params(teacher_config, 1), teacher_dir)
    student_dir = str(root / "student")
    if variants or "loop" in host_variants:
      hf.save_pretrained(student_config, random_params(student_config, 2), student_dir)
    config.teacher.source = teacher_dir

    text, vision = student_config.text_config, student_config.vision_config
    common_spec = dict(
        batch_size=batch_size, steps=steps, warmup_steps=warmup_steps, seed=0,
        batch_shape=dict(image_size=vision.image_size,
                         context_length=text.max_position_embeddings,
                         vocab_size=text.vocab_size, eos_token_id=text.eos_token_id),
        matmul_size=matmul_size, matmul_runs=matmul_runs, student_dir=student_dir)
    env = {**os.environ, **(child_env or {})}
    host_results = host.run_variants(
        host_variants, lambda module, spec: _run_child(module, spec, root, timeout_s, env),
        root=root, log=log, batch_size=batch_size, student_config=student_config,
        ours_spec=dict(common_spec, name="online", cached_teacher=False,
                       num_devices=num_devices, config=config.to_dict()),
        loop=dict(steps=loop_steps, warmup_steps=max(warmup_steps, 1) + 1,
                  interval=loop_interval or config.train.log_every,
                  checkpoint_every=loop_checkpoint_every, repeats=loop_repeats),
        input=dict(num_images=input_images, jpeg_size=tuple(input_jpeg_size),
                   image_size=input_image_size, cores=input_cores,
                   decoders=tuple(input_decoders), batches=input_batches,
                   warmup_batches=input_warmup_batches, repeats=input_repeats))

    def run_variant(variant: str) -> dict[str, Any]:
      if variant == "peer":
        o = config.optim
        spec = dict(common_spec, name="peer", teacher_dir=teacher_dir, threads=peer_threads,
                    compile=peer_compile,
                    loss=_loss_spec(loss),
                    optim=dict(lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
                               max_logit_scale=o.max_logit_scale))
        return _run_child("clipdistill_jax.perf.peer", spec, root, timeout_s, env)
      return _run_child("clipdistill_jax.perf.ours", ours_spec(variant), root, timeout_s, env)

    def ours_spec(variant: str) -> dict[str, Any]:
      return dict(common_spec, name=variant, cached_teacher=variant == "cached",
                  num_devices=num_devices,
                  config=_variant_config(config, variant, remat_policy).to_dict())

    def run_ours_together(names: list[str]) -> dict[str, dict[str, Any]]:
      spec = dict(common_spec, name="ours", variants=[ours_spec(v) for v in names])
      out = _run_child("clipdistill_jax.perf.ours", spec, root, timeout_s, env)
      return {v: out for v in names} if "error" in out else out

    # Units run in turn: each variant alone, or (interleave) all of ours in one process.
    ours = [v for v in variants if v != "peer"]
    units = ([ours] if ours else []) + (["peer"] if "peer" in variants else []) if interleave \
        else variants
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for repeat in range(repeats):
      for unit in (units if repeat % 2 == 0 else units[::-1]):
        names = unit if isinstance(unit, list) else [unit]
        log(f"running {', '.join(names)} ({repeat + 1}/{repeats}) ...")
        out = run_ours_together(names) if isinstance(unit, list) else {unit: run_variant(unit)}
        for name in names:
          runs[name].append(out[name])
          log(f"  {name}: " + _one_line(_derive(_pool(runs[name][-1:]), _flops_of(name),
                                               batch_size)))
    results = {v: _derive(_pool(r), _flops_of(v), batch_size) for v, r in runs.items()}
  finally:
    if tmp is not None:
      tmp.cleanup()

  report = {
      "settings": {
          "batch_size": batch_size, "steps": steps, "warmup_steps": warmup_steps,
          "repeats": repeats, "interleave": interleave,
          "teacher": teacher, "student_arch": config.student.arch,
          "student_params": int(sum(np.prod(x.shape) for x in _leaves(student_config))),
          "teacher_params": int(sum(np.prod(x.shape) for x in _leaves(teacher_config))),
          "loss_weights": dict(loss.weights), "remat_policy": remat_policy,
          "precision": "fp32 (bf16_teacher: teacher in bf16)",
          "xla_flags": env.get("XLA_FLAGS", ""),
          "mfu_flops": "analytic model FLOPs (3x trained forward + teacher forward)",
      },
      "machine": {"cpu_count": os.cpu_count(), "load_average": common.load_average(),
                  "platform": sys.platform},
      "results": results,
      "ratios": _ratios(results),
      "checks": _loss_checks(results),
  }
  report.update(host_results)
  report["warnings"] = precision_warnings(report["ratios"], results)
  for warning in report["warnings"]:
    log(f"WARNING: {warning}")
  return report


def precision_warnings(ratios: dict[str, float | None], results: dict[str, Any]) -> list[str]:
  """A warning for every bf16 variant slower than fp32 on the device it ran on (bf16 pays
  where matmul units take it natively: TPU, recent GPUs; XLA:CPU emulates much of it)."""
  warnings = []
  for name, knobs in (("bf16_teacher", "teacher.dtype"),
                      ("bf16", "teacher.dtype and student.dtype")):
    ratio = ratios.get(f"{name}_vs_online")
    if ratio is not None and ratio < 1.0:
      kind = results[name].get("device_kind", "this device")
      warnings.append(f"{name} runs at {ratio:.2f}x the fp32 step's images/s on {kind}: keep "
                      f"{knobs} 'float32' here (bf16 pays where matmul units take it natively: "
                      "TPU, GPU).")
  return warnings


def rederive(report: dict[str, Any]) -> dict[str, Any]:
  """A saved report with its derived figures (rates, fractions, ratios) recomputed from the
  raw per-step times and peaks it holds (scripts/benchmark.py --from_json)."""
  batch_size = report["settings"]["batch_size"]
  results = {name: _derive(r, r["analytic_flops"], batch_size)
             for name, r in report["results"].items()}
  return {**report, "results": results, "ratios": _ratios(results),
          "checks": _loss_checks(results)}


def _leaves(config):
  import jax

  from clipdistill_jax.models import hf
  return jax.tree_util.tree_leaves(hf.param_shapes(config))


def _pool(results: list[dict[str, Any]]) -> dict[str, Any]:
  """One variant's repeats as one result: the timed steps (wall and CPU) of all repeats
  pooled (median over all of them), the best matmul peak of all, the largest peak RSS, the
  first repeat's losses."""
  ok = [r for r in results if "error" not in r]
  if not ok:
    return results[-1]
  pooled = dict(ok[0])
  for key in ("step_time", "step_cpu"):
    pooled[key] = common.summarize_times([t for r in ok for t in r[key]["all_s"]])
  pooled["paired_matmul_flops_per_s"] = [p for r in ok for p in r["paired_matmul_flops_per_s"]]
  pooled["repeat_medians_s"] = [r["step_time"]["median_s"] for r in ok]
  pooled["repeats"] = len(ok)
  pooled["failed_repeats"] = [r["error"] for r in results if "error" in r]
  mm = common.best_peak([m for r in ok for m in r["matmul"]["measurements"]])
  pooled["matmul"] = {**mm, "flops_per_s_all_devices": mm["flops_per_s"] * ok[0].get(
      "num_devices", 1)}
  rss = [r["peak_rss_bytes"] for r in ok if r.get("peak_rss_bytes")]
  pooled["peak_rss_bytes"] = max(rss) if rss else None
  return pooled


def _derive(result: dict[str, Any], flops: dict[str, float], batch_size: int
            ) -> dict[str, Any]:
  """images/s and FLOP/s from the median step; the fraction of the matmul peak as the median
  over steps of (step FLOP/s) / (the peak measured right after that step), and, stricter,
  the median step against the best peak seen in the whole run."""
  result = dict(result)
  result["analytic_flops"] = flops
  if "error" in result:
    return result
  seconds = result["step_time"]["median_s"]
  devices = result.get("num_devices", 1)
  result["images_per_s"] = batch_size / seconds
  result["achieved_flops_per_s"] = flops["step"] / seconds
  paired = [flops["step"] / t / (p * devices) for t, p in
            zip(result["step_time"]["all_s"], result["paired_matmul_flops_per_s"], strict=True)]
  result["fraction_of_matmul_peak"] = statistics.median(paired)
  best = max([result["matmul"]["flops_per_s"], *result["paired_matmul_flops_per_s"]])
  result["best_matmul_flops_per_s"] = best
  result["fraction_of_best_matmul_peak"] = result["achieved_flops_per_s"] / (best * devices)
  result["images_per_peak_flop"] = statistics.median(
      batch_size / t / (p * devices) for t, p in zip(result["step_time"]["all_s"],
                                          result["paired_matmul_flops_per_s"], strict=True))
  result["median_paired_matmul_flops_per_s"] = statistics.median(
      result["paired_matmul_flops_per_s"])
  return result


def _ratios(results: dict[str, Any]) -> dict[str, float | None]:
  """images/s ratios as measured, and `*_peak_normalized`: the same ratios of images per
  second per FLOP/s of the matmul peak timed next to each step, which takes out the drift
  of the machine's speed between the variants' processes (same device, same peak kernel:
  compare ours with ours; for ours vs the peer each side is normalized by its own
  framework's matmul)."""
  def get(name, key):
    r = results.get(name)
    return None if r is None or "error" in r else r[key]

  out = {}
  for a, b in (("online", "peer"), ("cached", "online"), ("bf16_teacher", "online"),
               ("bf16", "online"), ("remat", "online")):
    for suffix, key in (("", "images_per_s"), ("_peak_normalized", "images_per_peak_flop")):
      x, y = get(a, key), get(b, key)
      out[f"{a}_vs_{b}{suffix}"] = None if x is None or y is None else x / y
  return out


def _loss_checks(results: dict[str, Any]) -> dict[str, float | None]:
  """Relative first-step loss differences: ours vs the peer (same weights and batch: the
  two compute the same step) and cached vs online for the losses the cache serves (bf16)."""
  def rel(a, b, key):
    ra, rb = results.get(a), results.get(b)
    if not ra or not rb or "error" in ra or "error" in rb:
      return None
    x, y = ra["first_step_losses"].get(key), rb["first_step_losses"].get(key)
    if x is None or y is None:
      return None
    return abs(x - y) / max(abs(y), 1e-12)
  return {"online_vs_peer_total_loss": rel("online", "peer", "loss/total"),
          "cached_vs_online_feature_loss": rel("cached", "online", "loss/feature"),
          "cached_vs_online_logit_kl_loss": rel("cached", "online", "loss/logit_kl")}


def _one_line(r: dict[str, Any]) -> str:
  if "error" in r:
    return f"ERROR {r['error']}"
  return (f"{r['step_time']['median_s']:.3f} s/step, {r['images_per_s']:.2f} img/s, "
          f"{100 * r['fraction_of_matmul_peak']:.0f}% of matmul peak")


def format_table(report: dict[str, Any]) -> str:
  """A markdown table of the report (what README's Performance section shows)."""
  rows = ["| variant | s/step | images/s | model GFLOP/step | XLA GFLOP/step | achieved "
          "GFLOP/s | matmul GFLOP/s (median / best) | % of peak (paired / best) | "
          "peak host RSS (GiB) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in report["results"].items():
    if "error" in r:
      rows.append(f"| {name} | error: {r['error']} |  |  |  |  |  |  |  |")
      continue
    xla = r.get("xla_flops")
    rss = r.get("peak_rss_bytes")
    rows.append(
        f"| {name} | {r['step_time']['median_s']:.3f} | {r['images_per_s']:.2f} | "
        f"{r['analytic_flops']['step'] / 1e9:.1f} | "
        f"{'-' if xla is None else f'{xla / 1e9:.1f}'} | "
        f"{r['achieved_flops_per_s'] / 1e9:.1f} | "
        f"{r['median_paired_matmul_flops_per_s'] / 1e9:.0f} / "
        f"{r['best_matmul_flops_per_s'] / 1e9:.0f} | {100 * r['fraction_of_matmul_peak']:.0f}% / "
        f"{100 * r['fraction_of_best_matmul_peak']:.0f}% | "
        f"{'-' if rss is None else f'{rss / 2 ** 30:.2f}'} |")
  lines = ["\n".join(rows), ""]
  for k, v in report["ratios"].items():
    if v is not None:
      lines.append(f"{k}: {v:.2f}x")
  for k, v in report.get("checks", {}).items():
    if v is not None:
      lines.append(f"first-step {k.replace('_', ' ')} relative difference: {v:.1e}")
  lines.extend(host.summary_lines(report))
  for warning in report.get("warnings", []):
    lines.append(f"WARNING: {warning}")
  s = report["settings"]
  lines.append(f"batch {s['batch_size']}, {s['steps']} timed steps x {s.get('repeats', 1)} "
               "process(es) per variant (median), teacher "
               f"{s['teacher']} ({s['teacher_params'] / 1e6:.1f}M params), student "
               f"{s['student_arch']} ({s['student_params'] / 1e6:.1f}M), load average "
               f"{report['machine']['load_average']}")
  return "\n".join(lines)
