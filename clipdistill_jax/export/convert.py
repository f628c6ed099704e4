"""Everything `scripts/convert_to_pytorch.py` does, as functions: export, verify, measure.

  export_all(config, params, out, quantize="int8", onnx=True)   a student in memory
  convert_workdir(workdir, out, step=None, stage=None, ...)      the student of a training run
                                                                 (run_dir.py: train,
                                                                 experiment, ablation layouts)

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

import numpy as np

from clipdistill_jax.data.tokenizer import Tokenizer, load_tokenizer
from clipdistill_jax.export import benchmark, model_card
from clipdistill_jax.export import litert_runtime as lrt
from clipdistill_jax.export import onnx_runtime as rt
from clipdistill_jax.export import quantize as int8
from clipdistill_jax.export.run_dir import RunDir, load_run_student, resolve_run
from clipdistill_jax.export.samples import (
  CaptionedImages,
  ZeroShotSet,
  reference_photos,
  run_eval_set,
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
RANDOM_TEACHER = "teacher (random init ViT-B/32)"
QUANTIZE_CHOICES = ("int8",)


def export_all(config: CLIPConfig, params: Any, out: str | Path, *,
               tokenizer: Tokenizer | None = None, quantize: str | None = None,
               onnx: bool = False, tflite: bool = False,
               photos: CaptionedImages | None = None,
               eval_set: ZeroShotSet | None = None, run_eval: ZeroShotSet | None = None,
               calibration: tuple[np.ndarray, list[str], str] | None = None,
               run_benchmark: bool = True,
               teacher_config: CLIPConfig | None = TEACHER_CONFIG,
               teacher_source: str | None = None,
               batch_sizes: Sequence[int] = benchmark.DEFAULT_BATCH_SIZES,
               benchmark_threads: int | None = None, benchmark_budget_s: float = 1.0,
               pipeline_check: bool = True, run: RunDir | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Exports `params` to `out` (HF dir, optionally int8, ONNX, LiteRT), verifies, benchmarks,
  and writes the model card OUT/README.md.

  photos: captioned images for the parity checks (default: scikit-image photos).
  eval_set: the zero-shot set int8 agreement is measured on (default: views of `photos`).
  run_eval: the training run's own zero-shot set (samples.run_eval_set); int8 agreement is
    measured on it too when given.
  tflite: also the LiteRT files in OUT/tflite (litert_export.py); with quantize='int8' their
    dynamic-range and full-integer variants, the latter calibrated on `calibration`
    ((pixels float32 [N, S, S, 3], texts, where they came from); default: `photos`).
  teacher_config / teacher_source: the teacher benchmarked next to the student. With
    `teacher_source` (an HF directory, or a hub name already in the local cache) the real
    teacher; if it cannot be loaded, or without it, a random model of `teacher_config`'s
    shape, labelled as such; teacher_config None: student only.
  benchmark_threads: CPU threads for the latency table (default: torch's setting).
  benchmark_budget_s: seconds spent timing each (variant, tower, batch) case, >= 3 calls.
  run: the training run exported (run_dir.resolve_run), for the model card.
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
                            "run_eval_set": run_eval.source if run_eval else None,
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

  eval_sets = [e for e in (eval_set, run_eval) if e is not None] if quantize else []
  references = [_reference(model, config, tokenizer, e) for e in eval_sets]
  if quantize == "int8":
    log("int8: dynamic quantization of the Linear layers")
    quantized = int8.quantize_int8(model)
    int8_path = int8.save_int8(quantized, out)
    report["int8_torch"] = {
        "api": int8.QUANTIZATION_NOTE, "path": str(int8_path),
        "size_mb_fp32": int8.file_size_mb(out / "model.safetensors"),
        "size_mb_int8": int8.file_size_mb(int8_path),
        **_agreements(eval_sets, references, lambda e, ids, mask: torch_embeddings(
            quantized, e.pixel_values, ids, mask))}

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
          **_agreements(eval_sets, references, lambda e, ids, mask: onnx_export.onnx_embeddings(
              onnx_dir, e.pixel_values, e.class_prompts, int8=True))}

  if tflite:
    _export_litert(config, params, out, tokenizer, photos, eval_sets, references,
                   calibration, quantize == "int8", report, failures, log)

  if run_benchmark:
    log("benchmarking (CPU)")
    timing = {"threads": benchmark_threads, "budget_s": benchmark_budget_s}
    rows = benchmark.benchmark_export(out, config, "student", batch_sizes, **timing)
    if "litert" in report:
      rows += _litert_rows(out, config, benchmark_threads, benchmark_budget_s)
    if teacher_config is not None:
      rows += _teacher_rows(teacher_source, teacher_config, out, quantize == "int8", onnx,
                            batch_sizes, timing, report, log)
    report["benchmark"] = rows
    report["benchmark_table"] = benchmark.format_table(rows, batch_sizes)

  report["ok"] = not failures
  report["failures"] = failures
  (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  card_teacher = teacher_source
  if run is not None:
    # --random-teacher changes the table only: the card still names the run's teacher. The
    # teacher itself and a no-teacher baseline have none to name.
    card_teacher = None if _untaught(run) else (teacher_source or run.teacher_source())
  report["model_card"] = str(model_card.write_model_card(
      out, report, config=run.run_config() if run else None,
      results=run.results() if run else None, teacher_source=card_teacher,
      stage=run.stage if run else None, image_size=config.vision_config.image_size,
      context_length=config.text_config.max_position_embeddings))
  if failures:
    raise ExportVerificationError(
        f"export written to {out} but failed verification: {', '.join(failures)}. Details "
        f"in {out / REPORT_FILE}.")
  return report


def convert_workdir(workdir: str | Path, out: str | Path, step: int | None = None,
                    quantize: str | None = None, onnx: bool = False,
                    tokenizer_path: str | None = None, stage: str | None = None,
                    random_teacher: bool = False, run_eval_examples: int | None = 1000,
                    log: Callable[[str], None] = print, **kwargs: Any) -> dict[str, Any]:
  """Restores a training run's student (latest or `step`) and runs `export_all`.

  workdir/stage: a train, experiment or ablation workdir and which of its runs
    (run_dir.resolve_run; default an experiment's distilled student). Raises
    run_dir.RunNotFoundError, listing what the workdir holds, when there is nothing to export.
  random_teacher: benchmark a random ViT-B/32 instead of the run's own teacher (found from
    the experiment's teacher/hf or config.json's teacher.source).
  run_eval_examples: images of the run's zero-shot set (config.json eval.zero_shot[0]) int8
    agreement is also measured on; 0 or None: photos only. If that set cannot be built (a
    tfds set not prepared here), the report says why and the photos are used alone.
  The tokenizer is `tokenizer_path`'s, else the run's own tokenizer files, else the packaged
  openai CLIP tokenizer (what the trainer uses by default).
  """
  run = resolve_run(workdir, stage)
  log(f"exporting {run.label}")
  config, params, restored_step = load_run_student(run, step)
  tokenizer = load_tokenizer(tokenizer_path or _run_tokenizer(run))
  image_size = config.vision_config.image_size
  run_eval = calibration = None
  notes = {}
  if run.config and quantize and run_eval_examples:
    try:
      run_eval = run_eval_set(run.config, image_size, run_eval_examples)
    except Exception as e:  # the data may live on the training machine only
      notes["run_eval_set"] = f"not measured: {type(e).__name__}: {e}"
      log(f"the run's zero-shot set is unavailable here ({e}); int8 agreement on photos only")
  if run.config and kwargs.get("tflite") and quantize:
    calibration, why = _calibration(run.config, image_size)
    if calibration is None:
      notes["calibration"] = why
  teacher_source = None if (random_teacher or run.stage == "teacher") else run.teacher_source()
  if run.stage == "teacher":
    kwargs["teacher_config"] = None  # the exported model is the teacher itself
  report = export_all(config, params, out, tokenizer=tokenizer, quantize=quantize, onnx=onnx,
                      run_eval=run_eval, calibration=calibration,
                      teacher_source=teacher_source, run=run, log=log, **kwargs)
  report.update(workdir=str(workdir), run=run.label, stage=run.stage, step=restored_step,
                notes=notes)
  (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  return report


def _untaught(run: RunDir) -> bool:
  """The run learnt from no teacher: an experiment's teacher or no-teacher stage, or an
  ablation's no-teacher runs."""
  return run.stage in ("teacher", "no_teacher") or (
      run.kind == "ablation" and (run.stage or "").startswith("no_teacher-"))


def _run_tokenizer(run: RunDir) -> str | None:
  """The tokenizer files the run trained with: its own folder's, else config.json's
  `tokenizer`, else None (the packaged openai CLIP tokenizer)."""
  for folder in (run.run_dir, run.root):
    if (folder / "tokenizer_config.json").is_file() or (folder / "vocab.json").is_file():
      return str(folder)
  return (run.config or {}).get("tokenizer")


def _calibration(run_config: dict[str, Any], image_size: int, samples: int = 64
                 ) -> tuple[tuple[np.ndarray, list[str], str] | None, str]:
  """Full-integer LiteRT calibration drawn from the run's data: images of its zero-shot
  set's *train* split (not the split agreement is measured on) and its class prompts."""
  try:
    data = run_eval_set(run_config, image_size, samples, split="train", max_templates=1)
  except Exception as e:
    return None, f"the run's data is unavailable here ({type(e).__name__}: {e}); photos used"
  return (data.pixel_values, data.class_prompts,
          data.source.replace("zero-shot set", "zero-shot set, train split,")), ""


def _reference(model, config: CLIPConfig, tokenizer: Tokenizer, eval_set: ZeroShotSet):
  """(ids, mask, (image_embeds, class_embeds)) of the fp32 PyTorch model on a zero-shot set."""
  ids, mask = tokenizer(eval_set.class_prompts, config.text_config.max_position_embeddings)
  image, text = torch_embeddings(model, eval_set.pixel_values, ids, mask)
  return ids, mask, (image, eval_set.class_embeddings(text))


def _agreements(eval_sets: list[ZeroShotSet], references: list, embed: Callable
                ) -> dict[str, dict[str, Any]]:
  """{'agreement': on eval_sets[0], 'run_eval_agreement': on eval_sets[1]} of the
  candidate `embed(eval_set, ids, mask) -> (image_embeds, prompt_embeds)` vs fp32."""
  out = {}
  for key, eval_set, (ids, mask, reference) in zip(("agreement", "run_eval_agreement"),
                                                   eval_sets, references, strict=False):
    image, text = embed(eval_set, ids, mask)
    agreement = int8.zero_shot_agreement(reference, (image, eval_set.class_embeddings(text)),
                                         eval_set.labels)
    out[key] = {**agreement, "source": eval_set.source}
  return out


def _export_litert(config: CLIPConfig, params: Any, out: Path, tokenizer: Tokenizer,
                   photos: CaptionedImages, eval_sets: list[ZeroShotSet], references: list,
                   calibration: tuple[np.ndarray, list[str], str] | None, with_int8: bool,
                   report: dict[str, Any], failures: list[str], log: Callable) -> None:
  from clipdistill_jax.export import litert_export
  litert_dir = out / lrt.LITERT_DIR
  if calibration is None:
    pixels = photos.preprocessed(config.vision_config.image_size)
    calibration = (pixels, list(photos.captions), photos.source)
  written = litert_export.export_litert(
      config, params, litert_dir, out, _pad_token(tokenizer), calibration=calibration,
      tokenizer=tokenizer, int8=with_int8, log=log)
  section: dict[str, Any] = {
      "route": "jax.experimental.jax2tf (native serialization) + tf.lite.TFLiteConverter",
      "files": written["files"], "convert_seconds": written["seconds"]}
  section["parity"] = litert_export.verify_litert_parity(config, params, litert_dir,
                                                         tokenizer, photos)
  section["runtime"] = section["parity"]["runtime"]
  if not section["parity"]["ok"]:
    failures.append("LiteRT vs Flax embeddings")
  sizes = {v: int8.file_size_mb(*(litert_dir / f for f in files.values()))
           for v, files in written["files"].items()}
  section["size_mb"] = sizes
  section["int8"] = {}
  for variant in written["files"]:
    if variant == "fp32":
      continue
    agreements = _agreements(eval_sets, references, lambda e, ids, mask, v=variant:
                             litert_export.litert_zero_shot_embeddings(litert_dir, v, e, ids))
    section["int8"][variant] = {
        "method": {"int8": "dynamic range (int8 weights, float activations)",
                   "int8_full": "full integer (int8 weights and activations, calibrated on "
                                f"{calibration[2]})"}[variant],
        "size_mb_fp32": sizes["fp32"], "size_mb_int8": sizes[variant],
        "agreements": list(agreements.values())}
  report["litert"] = section


def _litert_rows(out: Path, config: CLIPConfig, threads: int | None, budget_s: float
                 ) -> list[dict[str, Any]]:
  import torch

  from clipdistill_jax.export import litert_export
  litert_dir = out / lrt.LITERT_DIR
  threads = threads or torch.get_num_threads()  # the thread count the torch rows get
  rows = []
  for variant in lrt.read_manifest(litert_dir)["files"]:
    measured = litert_export.latency_row(litert_dir, variant, config, budget_s, threads)
    rows.append({"model": "student", "variant": f"{variant} litert (batch 1 only)",
                 "threads": threads, **measured})
  return rows


def _teacher_rows(source: str | None, shape: CLIPConfig, out: Path, with_int8: bool,
                  onnx: bool, batch_sizes: Sequence[int], timing: dict[str, Any],
                  report: dict[str, Any], log: Callable) -> list[dict[str, Any]]:
  """The teacher's rows: the run's own teacher when `source` loads, else a random model of
  `shape`, with the reason in the row's name and report['benchmark_teacher']."""
  params = None
  name = RANDOM_TEACHER + (" (requested)" if source is None else "")
  if source is not None:
    from clipdistill_jax.models import hf
    try:
      shape, params = hf.load_pretrained(source)
      name = f"teacher ({source})"
    except Exception as e:  # a hub name not in the local cache, a moved directory
      name = f"{RANDOM_TEACHER}: the run's teacher {source} was not found"
      log(f"the run's teacher {source} cannot be loaded here ({type(e).__name__}: {e}); "
          "benchmarking a random ViT-B/32 instead")
  report["benchmark_teacher"] = name
  with tempfile.TemporaryDirectory(prefix="clipdistill_teacher_") as tmp:
    benchmark.export_reference_model(shape, tmp, out, with_int8, onnx, params=params)
    return benchmark.benchmark_export(tmp, shape, name, batch_sizes, **timing)


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
  shutil.rmtree(out / lrt.LITERT_DIR, ignore_errors=True)
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
      for agreement_key in ("agreement", "run_eval_agreement"):
        if agreement_key in section:
          lines.append("  " + _agreement_line(section[agreement_key]))
  if report.get("notes", {}).get("run_eval_set"):
    lines.append(f"the run's zero-shot set: {report['notes']['run_eval_set']}")
  if "onnx" in report:
    onnx = report["onnx"]
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in onnx["max_abs_diff"].items())
    text_inputs = onnx["text_graph"]["inputs"]
    lines.append(f"onnxruntime vs PyTorch: {diffs} -> {'OK' if onnx['ok'] else 'FAILED'}")
    lines.append(f"  opset {onnx['text_graph']['opset']}, text inputs {text_inputs}")
  if "litert" in report:
    litert = report["litert"]
    parity = litert["parity"]
    lines.append(
        f"LiteRT fp32 ({litert['runtime']} interpreter) vs Flax: max abs diff image_embeds "
        f"{parity['image_embeds_max_abs_diff']:.2e}, text_embeds "
        f"{parity['text_embeds_max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}) -> "
        f"{'OK' if parity['ok'] else 'FAILED'}; files in {lrt.LITERT_DIR}/: "
        + ", ".join(f"{v} {mb:.2f} MB" for v, mb in litert["size_mb"].items()))
    for variant, section in litert["int8"].items():
      lines.append(f"LiteRT {variant} [{section['method']}]:")
      lines += ["  " + _agreement_line(a) for a in section["agreements"]]
  if "benchmark_table" in report:
    lines.append(report["benchmark_table"])
  if "model_card" in report:
    lines.append(f"model card: {report['model_card']}")
  return "\n".join(lines)


def _agreement_line(agreement: dict[str, Any]) -> str:
  line = (f"vs fp32 on {agreement['images']} images x {agreement['classes']} classes "
          f"({agreement['source']}): cosine image mean {agreement['image_cosine_mean']:.4f} (min "
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
