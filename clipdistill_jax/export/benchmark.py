"""Size on disk and CPU latency of each exported variant, student next to teacher.

Latency is the median wall time of one encoder call (image tower on [b, S, S, 3] pixels,
text tower on [b, context] tokens) after a warm-up call, for each batch size; both runtimes
get the same thread count. The teacher rows are the run's own teacher (convert.py finds it:
an experiment's teacher/hf, or config.json's teacher.source when it loads offline), else a
randomly initialised ViT-B/32, labelled so: size and speed depend on shapes, not on weight
values, so the random model still times the teacher's shape. LiteRT rows (batch 1 only: the
files have a fixed batch) are added by convert.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.export import onnx_runtime as rt
from clipdistill_jax.export import quantize
from clipdistill_jax.export.torch_export import load_torch_model, torch_embeddings
from clipdistill_jax.models.config import CLIPConfig

DEFAULT_BATCH_SIZES = (1, 32)


def time_ms(fn: Callable[[], Any], min_runs: int = 3, max_runs: int = 30,
            budget_s: float = 1.0) -> float:
  """Median milliseconds of fn() over at least min_runs calls (more while under budget_s)."""
  fn()  # warm-up: first-call allocation and kernel selection are not steady state
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < min_runs or (len(times) < max_runs
                                  and time.perf_counter() - start < budget_s):
    begin = time.perf_counter()
    fn()
    times.append(time.perf_counter() - begin)
  return 1000 * statistics.median(times)


def _inputs(config: CLIPConfig, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(batch)
  size, context = config.vision_config.image_size, config.text_config.max_position_embeddings
  pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  ids = rng.integers(1, min(config.text_config.vocab_size, 49406), (batch, context))
  ids[:, 0] = min(49406, config.text_config.vocab_size - 1)
  ids[:, -1] = config.text_config.eos_token_id  # full context: the slowest text case
  return pixels, ids.astype(np.int64), np.ones_like(ids, np.int64)


def _latencies(image_fn, text_fn, config: CLIPConfig, batch_sizes: Sequence[int],
               budget_s: float) -> dict[str, float]:
  latency = {}
  for batch in batch_sizes:
    pixels, ids, mask = _inputs(config, batch)
    latency[f"image_ms_b{batch}"] = time_ms(lambda p=pixels: image_fn(p), budget_s=budget_s)
    latency[f"text_ms_b{batch}"] = time_ms(lambda i=ids, m=mask: text_fn(i, m),
                                           budget_s=budget_s)
  return latency


def benchmark_export(out_dir: str | Path, config: CLIPConfig, model_name: str,
                     batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                     threads: int | None = None, budget_s: float = 1.0
                     ) -> list[dict[str, Any]]:
  """One row per variant present in an export directory (torch fp32 always).

  threads: intra-op threads for both runtimes (default: torch's current setting). On a
  shared machine, fewer threads than cores gives steadier numbers: torch's OpenMP workers
  spin-wait and suffer badly when another process holds a core.
  budget_s: keep timing one case while under this many seconds (at least 3 calls).
  """
  import torch
  out_dir = Path(out_dir)
  previous_threads = torch.get_num_threads()
  threads = threads or previous_threads
  torch.set_num_threads(threads)
  try:
    return _benchmark_variants(out_dir, config, model_name, batch_sizes, threads, budget_s)
  finally:
    torch.set_num_threads(previous_threads)


def _benchmark_variants(out_dir: Path, config: CLIPConfig, model_name: str,
                        batch_sizes: Sequence[int], threads: int, budget_s: float
                        ) -> list[dict[str, Any]]:
  rows = []

  def row(variant: str, size_mb: float, latency: dict[str, float]) -> None:
    rows.append({"model": model_name, "variant": variant, "size_mb": size_mb,
                 "threads": threads, **latency})

  fp32 = load_torch_model(out_dir)
  row("fp32 torch", quantize.file_size_mb(out_dir / "model.safetensors"), _latencies(
      lambda p: torch_embeddings(fp32, p, None), lambda i, m: torch_embeddings(fp32, None, i, m),
      config, batch_sizes, budget_s))
  if (out_dir / quantize.INT8_WEIGHTS).exists():
    int8 = quantize.load_int8(out_dir)
    row("int8 torch", quantize.file_size_mb(out_dir / quantize.INT8_WEIGHTS), _latencies(
        lambda p: torch_embeddings(int8, p, None),
        lambda i, m: torch_embeddings(int8, None, i, m), config, batch_sizes, budget_s))
  onnx_dir = out_dir / rt.ONNX_DIR
  if (onnx_dir / rt.MANIFEST).exists():
    for variant, files in rt.read_manifest(onnx_dir)["files"].items():
      clip = rt.OnnxCLIP(onnx_dir, int8=variant == "int8", threads=threads)
      row(f"{variant} onnx",
          quantize.file_size_mb(onnx_dir / files["vision"], onnx_dir / files["text"]),
          _latencies(lambda p, c=clip: rt.run_vision(c.vision_session, p),
                     lambda i, m, c=clip: rt.run_text(c.text_session, i, m),
                     config, batch_sizes, budget_s))
  return rows


def export_reference_model(config: CLIPConfig, directory: str | Path, tokenizer_dir: str | Path,
                           int8: bool, onnx: bool, params: Any = None) -> Path:
  """A model of `config`'s shape written in the same layout as an exported student: the
  given Flax `params` (a real teacher), or random weights when None."""
  import torch
  import transformers

  from clipdistill_jax.export.onnx_export import export_onnx, quantize_onnx_int8
  directory = Path(directory)
  if params is not None:
    from clipdistill_jax.models import hf
    hf.save_pretrained(config, params, directory)
    model = load_torch_model(directory)
  else:
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**config.to_dict())).eval()
    model.save_pretrained(directory)
  if int8:
    quantize.save_int8(quantize.quantize_int8(model), directory)
  if onnx:
    export_onnx(model, config, directory / rt.ONNX_DIR, tokenizer_dir)
    if int8:
      quantize_onnx_int8(directory / rt.ONNX_DIR)
  return directory


def format_table(rows: list[dict[str, Any]], batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
                 ) -> str:
  """A Markdown table: model, variant, size, image/text latency per batch size."""
  header = ["model", "variant", "size MB"]
  for batch in batch_sizes:
    header += [f"image ms b{batch}", f"text ms b{batch}"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["model"], r["variant"], f"{r['size_mb']:.2f}"]
    for batch in batch_sizes:
      cells += [_ms(r.get(f"image_ms_b{batch}")), _ms(r.get(f"text_ms_b{batch}"))]
    lines.append("| " + " | ".join(cells) + " |")
  threads = sorted({r["threads"] for r in rows})
  lines.append(f"(CPU, {'/'.join(map(str, threads))} threads; median of >= 3 calls after a "
               "warm-up)")
  return "\n".join(lines)


def _ms(value: float | None) -> str:
  if value is None:
    return "-"
  return f"{value:.2f}" if value < 100 else f"{value:.0f}"
