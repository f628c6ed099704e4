"""OUT/README.md: a Hugging Face model card for the exported student.

YAML metadata (license, base_model = the teacher's source when it is a hub id; a local
teacher folder is named in the text, as the hub rejects paths there; library_name,
pipeline_tag, tags), then what the hub page and a reader need: the run's measured results (the
experiment's teacher / distilled / no-teacher rows from WORKDIR/report/results.json when
there is one), the recipe and data it was distilled with (the run's config.json:
loss.recipe, loss.weights, data.source / name / path, data.num_train_examples), the export's
own checks, and how to load each exported format. Sources: the run's files as read by
run_dir.py; nothing is measured here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipdistill_jax.data.defaults import PATH_SOURCES
from clipdistill_jax.export.run_dir import RESULT_ROWS, config_value

CARD_FILE = "README.md"
DEFAULT_LICENSE = "mit"  # OpenAI CLIP's weights' license, the usual teacher


def _yaml_str(value: str) -> str:
  return json.dumps(value)  # a JSON string is a valid YAML scalar, quotes and all


def _is_local_path(source: str) -> bool:
  # The hub accepts only repo ids ('openai/clip-vit-base-patch32') as base_model; a teacher
  # trained by the experiment is a local folder, named in the card's text instead.
  return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def _metadata(teacher_source: str | None, license_id: str, tags: Sequence[str]) -> str:
  lines = ["---", f"license: {license_id}", "library_name: transformers",
           "pipeline_tag: zero-shot-image-classification"]
  if teacher_source and not _is_local_path(teacher_source):
    lines.append(f"base_model: {_yaml_str(teacher_source)}")
  lines.append("tags:")
  lines += [f"- {tag}" for tag in tags]
  lines.append("---")
  return "\n".join(lines)


def _results_table(rows: list[dict[str, Any]] | None, stage: str | None) -> str:
  if not rows:
    return ("No experiment report was found for this run (WORKDIR/report/results.json is "
            "written by mode 'experiment'); the export's own checks are below.")
  from clipdistill_jax import report
  names = dict(RESULT_ROWS)
  exported = next((name for name, s in RESULT_ROWS if s == (stage or "distilled")), None)
  note = f"This export is the **{exported}** row." if exported in names else ""
  return (f"{report.format_table(rows)}\n\nMeasured by the training run "
          f"(WORKDIR/report/results.json). {note}").rstrip()


def _recipe(config: dict[str, Any] | None) -> str:
  if not config:
    return "The run's config.json was not found, so the recipe is unknown."
  recipe = config_value(config, "loss.recipe") or "none (loss.weights as configured)"
  weights = config_value(config, "loss.weights")
  active = "unknown" if weights is None else ", ".join(
      f"{k} {v:g}" for k, v in sorted(weights.items()) if isinstance(v, (int, float)) and v
  ) or "-"
  source = config_value(config, "data.source", "?")
  # data.name is only meaningful for tfds and data.path for files; the other stays a default.
  where = (config_value(config, "data.name") if source == "tfds"
           else config_value(config, "data.path") if source in PATH_SOURCES
           else None)
  examples = config_value(config, "data.num_train_examples")
  lines = [f"- recipe: `{recipe}`; loss weights: {active}",
           f"- data: `{source}`" + (f" ({where})" if where else "")
           + f", {'all' if examples is None else examples} training examples "
           "(data.num_train_examples)",
           f"- steps: {config_value(config, 'train.total_steps', '?')}, batch size "
           f"{config_value(config, 'train.batch_size', '?')}, seed "
           f"{config_value(config, 'seed', '?')}",
           f"- zero-shot evaluation: {', '.join(config_value(config, 'eval.zero_shot', []))}"]
  return "\n".join(lines)


def _checks(report: dict[str, Any]) -> str:
  lines = []
  parity = report.get("torch_parity")
  if parity:
    worst = max(parity["image_embeds_max_abs_diff"], parity["text_embeds_max_abs_diff"])
    lines.append(f"- PyTorch vs Flax embeddings: max abs diff {worst:.1e} on "
                 f"{parity['images']} {parity['source']}")
  for key, title in (("int8_torch", "int8 PyTorch"), ("int8_onnx", "int8 ONNX")):
    for agreement_key in ("agreement", "run_eval_agreement"):
      agreement = report.get(key, {}).get(agreement_key)
      if agreement:
        lines.append(f"- {title} vs fp32 top-1 agreement {100 * agreement['top1_agreement']:.1f}%"
                     f" on {agreement['images']} images ({agreement['source']})")
  litert = report.get("litert", {})
  if litert.get("parity"):
    p = litert["parity"]
    lines.append(f"- LiteRT fp32 vs Flax: max abs diff "
                 f"{max(p['image_embeds_max_abs_diff'], p['text_embeds_max_abs_diff']):.1e}")
  for variant, section in litert.get("int8", {}).items():
    for agreement in section.get("agreements", []):
      lines.append(f"- LiteRT {variant} vs fp32: cosine image {agreement['image_cosine_mean']:.4f}"
                   f" / text {agreement['text_cosine_mean']:.4f}, top-1 agreement "
                   f"{100 * agreement['top1_agreement']:.1f}% on {agreement['images']} images "
                   f"({agreement['source']})")
  if report.get("benchmark_table"):
    lines += ["", report["benchmark_table"]]
  return "\n".join(lines) or "The export was not verified."


def _usage(has_onnx: bool, has_litert: bool, image_size: int, context: int) -> str:
  parts = ["### transformers", "", "```python",
           "from PIL import Image",
           "from transformers import pipeline",
           'classifier = pipeline("zero-shot-image-classification", model="PATH/TO/THIS/DIR")',
           'classifier(Image.open("cat.jpg"), candidate_labels=["a cat", "a dog"])',
           "```"]
  onnx_note = "" if has_onnx else " (export with `--onnx` to get these files)"
  parts += ["", "### onnxruntime" + onnx_note, "",
            "`onnx/vision_model.onnx` takes `pixel_values` float32 [batch, 3, "
            f"{image_size}, {image_size}] (CLIP-normalized), `onnx/text_model.onnx` takes "
            "`input_ids` and `attention_mask` int64 [batch, seq]; both return L2-normalized "
            "embeddings.", "", "```python",
            "from clipdistill_jax.export import OnnxCLIP",
            'clip = OnnxCLIP("PATH/TO/THIS/DIR")',
            'images, _, _ = clip.encode_image_files(["cat.jpg"])',
            'probs = clip.probabilities(images, clip.encode_texts(["a cat", "a dog"]))',
            "```", "",
            "or `clipdistill classify --model PATH/TO/THIS/DIR --labels cat,dog cat.jpg`."]
  litert_note = "" if has_litert else " (export with `--tflite` to get these files)"
  parts += ["", "### LiteRT (TFLite)" + litert_note, "",
            f"`tflite/vision_model.tflite` takes `pixel_values` float32 [1, {image_size}, "
            f"{image_size}, 3] (NHWC, CLIP-normalized); `tflite/text_model.tflite` takes "
            f"`input_ids` int32 [1, {context}] padded with the pad token to exactly {context} "
            "ids; `*_int8.tflite` are dynamic-range int8 and `*_int8_full.tflite` "
            "full-integer int8 (float32 in and out).", "", "```python",
            "import numpy as np",
            "from ai_edge_litert.interpreter import Interpreter  # pip install ai-edge-litert",
            'vision = Interpreter(model_path="tflite/vision_model.tflite")',
            "vision.allocate_tensors()",
            'run = vision.get_signature_runner("serving_default")',
            "image_embeds = run(pixel_values=pixels)[\"image_embeds\"]  # pixels: [1, S, S, 3]",
            "```", "",
            "or `clipdistill classify --model PATH/TO/THIS/DIR ...` on a machine without "
            "onnxruntime."]
  return "\n".join(parts)


def write_model_card(out: str | Path, report: dict[str, Any], *,
                     config: dict[str, Any] | None, results: list[dict[str, Any]] | None,
                     teacher_source: str | None, stage: str | None, image_size: int,
                     context_length: int, license_id: str = DEFAULT_LICENSE) -> Path:
  """Writes OUT/README.md from the run's config and results and the export's report."""
  out = Path(out)
  tags = ["clip", "knowledge-distillation", "jax", "flax", "zero-shot-image-classification"]
  has_onnx, has_litert = "onnx" in report, "litert" in report
  tags += (["onnx"] if has_onnx else []) + (["tflite", "litert"] if has_litert else [])
  if stage == "teacher":
    what = "the teacher the experiment trained first (contrastive loss on all its data)"
  elif stage == "no_teacher" or (stage or "").startswith("no_teacher-"):
    what = ("the baseline student trained without a teacher (contrastive loss only; same "
            "shape, data, steps and seed as the distilled one)")
  else:
    what = "a CLIP student distilled from " + (f"`{teacher_source}`" if teacher_source
                                               else "an unrecorded teacher")
  body = [
      _metadata(teacher_source, license_id, tags), "",
      "# Distilled CLIP student", "",
      f"This is {what}, trained with clipdistill_jax and exported to "
      "Hugging Face transformers" + (", ONNX" if has_onnx else "")
      + (" and LiteRT" if has_litert else "") + ".", "",
      "## Results", "", _results_table(results, stage), "",
      "## Training recipe and data", "", _recipe(config), "",
      "## Export checks", "", _checks(report), "",
      "## How to use", "", _usage(has_onnx, has_litert, image_size, context_length), ""]
  path = out / CARD_FILE
  path.write_text("\n".join(body), encoding="utf-8")
  return path
