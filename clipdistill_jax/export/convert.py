"""Everything `scripts/convert_to_pytorch.py` does, as functions: export, verify, measure.

  export_all(config, params, out, quantize="int8", onnx=True)   a student in memory
  convert_workdir(workdir, out, step=None, ...)                  the student of a training run

Both return the report dict (also written to OUT/export_report.json) and raise
ExportVerificationError, after writing the report, if an exported model disagrees with the
Flax student beyond tolerance. int8 agreement is measured and compared with its targets but
never fails the export: on random weights the targets mean nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipdistill_jax.data.tokenizer import Tokenizer, load_tokenizer
from clipdistill_jax.export import benchmark
from clipdistill_jax.export import onnx_runtime as rt
from clipdistill_jax.export import quantize as int8
from clipdistill_jax.export.samples import (
  CaptionedImages,
  ZeroShotSet,
  reference_photos,
  zero_shot_set,
)
from clipdistill_jax.export.torch_export import (
  ExportVerificationError,
  check_pipeline,
  check_processor,
  export_student,
  load_torch_model,
  torch_embeddings,
  verify_torch_parity,
)
from clipdistill_jax.models.config import CLIPConfig

REPORT_FILE = "export_report.json"
TEACHER_CONFIG = CLIPConfig()  # openai/clip-vit-base-patch32's shape
QUANTIZE_CHOICES = ("int8",)


def export_all(config: CLIPConfig, params: Any, out: str | Path, *,
               tokenizer: Tokenizer | None = None, quantize: str | None = None,
               onnx: bool = False, photos: CaptionedImages | None = None,
               eval_set: ZeroShotSet | None = None, run_benchmark: bool = True,
               teacher_config: CLIPConfig | None = TEACHER_CONFIG,
               batch_sizes: Sequence[int] = benchmark.DEFAULT_BATCH_SIZES,
               benchmark_threads: int | None = None, benchmark_budget_s: float = 1.0,
               pipeline_check: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Exports `params` to `out` (HF dir, optionally int8 and ONNX), verifies, benchmarks.

  photos: captioned images for the parity checks (default: scikit-image photos).
  eval_set: the zero-shot set int8 agreement is measured on (default: views of `photos`);
    pass the training run's zero-shot evaluation set when there is one.
  teacher_config: the shape benchmarked next to the student (None: student only).
  benchmark_threads: CPU threads for the latency table (default: torch's setting).
  benchmark_budget_s: seconds spent timing each (variant, tower, batch) case, >= 3 calls.
  """
  if quantize not in (None, *QUANTIZE_CHOICES):
    raise ValueError(f"quantize={quantize!r}: choose one of {QUANTIZE_CHOICES} or None.")
  out = _prepare_out_dir(Path(out))
  tokenizer = tokenizer or load_tokenizer()
  photos = photos or reference_photos()
  if quantize and eval_set is None:
    eval_set = zero_shot_set(config.vision_config.image_size, photos)
  report: dict[str, Any] = {"out": str(out), "photos": photos.source,
                            "eval_set": eval_set.source if eval_set else None,
                            "tokenizer": tokenizer.source}
  failures = []

  log(f"writing the Hugging Face directory to {out}")
  export_student(config, params, out, tokenizer)
  model = load_torch_model(out)
  report["torch_parity"] = verify_torch_parity(config, params, model, tokenizer, photos)
  if not report["torch_parity"]["ok"]:
    failures.append("PyTorch vs Flax embeddings")
  report["processor"] = check_processor(out, config, tokenizer, photos)
  if pipeline_check:
    report["pipeline"] = check_pipeline(out, photos)
    if not report["pipeline"]["ok"]:
      failures.append("transformers zero-shot pipeline")

  if quantize == "int8":
    ids, mask = tokenizer(eval_set.class_prompts, config.text_config.max_position_embeddings)
    reference = torch_embeddings(model, eval_set.pixel_values, ids, mask)
    log("int8: dynamic quantization of the Linear layers")
    quantized = int8.quantize_int8(model)
    int8_path = int8.save_int8(quantized, out)
    report["int8_torch"] = {
        "api": int8.QUANTIZATION_NOTE, "path": str(int8_path),
        "size_mb_fp32": int8.file_size_mb(out / "model.safetensors"),
        "size_mb_int8": int8.file_size_mb(int8_path),
        "agreement": int8.zero_shot_agreement(
            reference, torch_embeddings(quantized, eval_set.pixel_values, ids, mask),
            eval_set.labels)}

  if onnx:
    from clipdistill_jax.export import onnx_export
    log("ONNX: exporting the vision and text encoders")
    onnx_dir = out / rt.ONNX_DIR
    onnx_export.export_onnx(model, config, onnx_dir, out, pad_token=_pad_token(tokenizer))
    report["onnx"] = onnx_export.verify_onnx_parity(model, onnx_dir, config, tokenizer, photos)
    if not report["onnx"]["ok"]:
      failures.append("onnxruntime vs PyTorch embeddings")
    if quantize == "int8":
      log("ONNX int8: onnxruntime dynamic quantization")
      files = onnx_export.quantize_onnx_int8(onnx_dir)
      report["int8_onnx"] = {
          "api": "onnxruntime.quantization.quantize_dynamic (QInt8 weights)",
          "size_mb_fp32": int8.file_size_mb(onnx_dir / rt.VISION_FILE, onnx_dir / rt.TEXT_FILE),
          "size_mb_int8": int8.file_size_mb(*files.values()),
          "agreement": int8.zero_shot_agreement(
              reference, onnx_export.onnx_embeddings(onnx_dir, eval_set.pixel_values,
                                                     eval_set.class_prompts, int8=True),
              eval_set.labels)}

  if run_benchmark:
    log("benchmarking (CPU)")
    timing = {"threads": benchmark_threads, "budget_s": benchmark_budget_s}
    rows = benchmark.benchmark_export(out, config, "student", batch_sizes, **timing)
    if teacher_config is not None:
      with tempfile.TemporaryDirectory(prefix="clipdistill_teacher_") as tmp:
        benchmark.export_reference_model(teacher_config, tmp, out, quantize == "int8", onnx)
        rows += benchmark.benchmark_export(tmp, teacher_config, "teacher (random init)",
                                           batch_sizes, **timing)
    report["benchmark"] = rows
    report["benchmark_table"] = benchmark.format_table(rows, batch_sizes)

  report["ok"] = not failures
  report["failures"] = failures
  (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  if failures:
    raise ExportVerificationError(
        f"export written to {out} but failed verification: {', '.join(failures)}. Details "
        f"in {out / REPORT_FILE}.")
  return report


def convert_workdir(workdir: str | Path, out: str | Path, step: int | None = None,
                    quantize: str | None = None, onnx: bool = False,
                    tokenizer_path: str | None = None, **kwargs: Any) -> dict[str, Any]:
  """Restores the student of a training run (latest or `step`) and runs `export_all`.

  The tokenizer is `tokenizer_path`'s, else the workdir's own tokenizer files, else the
  packaged openai CLIP tokenizer (what the trainer uses by default).
  """
  from clipdistill_jax.checkpoints import load_student
  config, params, restored_step = load_student(str(workdir), step)
  tokenizer = load_tokenizer(tokenizer_path or str(workdir))
  report = export_all(config, params, out, tokenizer=tokenizer, quantize=quantize, onnx=onnx,
                      **kwargs)
  report.update(workdir=str(workdir), step=restored_step)
  (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  return report


def _prepare_out_dir(out: Path) -> Path:
  """Creates `out`; refuses a non-empty folder that is not an earlier export, and removes
  an earlier export's int8/ONNX files so a run without those flags leaves none stale."""
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out {out} is a file; give a directory path.")
  if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
    raise FileExistsError(f"--out {out} is a non-empty directory that is not an earlier "
                          "export (no config.json); choose a new or empty directory.")
  out.mkdir(parents=True, exist_ok=True)
  (out / int8.INT8_WEIGHTS).unlink(missing_ok=True)
  shutil.rmtree(out / rt.ONNX_DIR, ignore_errors=True)
  return out


def _pad_token(tokenizer: Tokenizer) -> str:
  return tokenizer.hf_tokenizer.convert_ids_to_tokens(tokenizer.pad_id)


def format_report(report: dict[str, Any]) -> str:
  """The figures a person reads after a conversion, as plain text."""
  lines = [f"export: {report['out']}"]
  parity = report["torch_parity"]
  lines.append(
      f"PyTorch vs Flax ({parity['images']} {parity['source']} + captions): max abs diff "
      f"image_embeds {parity['image_embeds_max_abs_diff']:.2e}, text_embeds "
      f"{parity['text_embeds_max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}), "
      f"logits {parity['logits_max_abs_diff']:.2e} -> {'OK' if parity['ok'] else 'FAILED'}")
  processor = report["processor"]
  lines.append(f"CLIPProcessor from the export vs ours: pixel max abs diff "
               f"{processor['pixel_values_max_abs_diff']:.2e}, input_ids equal "
               f"{processor['input_ids_equal']}")
  if "pipeline" in report:
    lines.append(f"transformers zero-shot pipeline loads offline: {report['pipeline']['ok']}")
  for key, title in (("int8_torch", "int8 torch"), ("int8_onnx", "int8 ONNX")):
    if key in report:
      section = report[key]
      lines.append(f"{title} [{section['api']}]: {section['size_mb_fp32']:.2f} MB -> "
                   f"{section['size_mb_int8']:.2f} MB")
      lines.append("  " + _agreement_line(section["agreement"], report["eval_set"]))
  if "onnx" in report:
    onnx = report["onnx"]
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in onnx["max_abs_diff"].items())
    text_inputs = onnx["text_graph"]["inputs"]
    lines.append(f"onnxruntime vs PyTorch: {diffs} -> {'OK' if onnx['ok'] else 'FAILED'}")
    lines.append(f"  opset {onnx['text_graph']['opset']}, text inputs {text_inputs}")
  if "benchmark_table" in report:
    lines.append(report["benchmark_table"])
  return "\n".join(lines)


def _agreement_line(agreement: dict[str, Any], source: str) -> str:
  line = (f"vs fp32 on {agreement['images']} images x {agreement['classes']} classes "
          f"({source}): cosine image mean {agreement['image_cosine_mean']:.4f} (min "
          f"{agreement['image_cosine_min']:.4f}), text mean {agreement['text_cosine_mean']:.4f}"
          f" (min {agreement['text_cosine_min']:.4f}); top-1 agreement "
          f"{100 * agreement['top1_agreement']:.1f}%")
  if "reference_accuracy" in agreement:
    line += (f"; accuracy fp32 {100 * agreement['reference_accuracy']:.1f}% / int8 "
             f"{100 * agreement['candidate_accuracy']:.1f}%")
  targets = (f"targets cosine >= {int8.TARGET_COSINE}, agreement >= "
             f"{100 * int8.TARGET_AGREEMENT:.0f}%")
  return line + (f" [{targets}: met]" if agreement["meets_targets"]
                 else f" [{targets}: NOT met; meaningful only for a trained student]")
