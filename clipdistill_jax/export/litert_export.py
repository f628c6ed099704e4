"""LiteRT (TFLite) vision and text encoders, converted straight from the Flax student.

Route, checked with the pinned jax 0.10.2 and tensorflow 2.21: `jax.experimental.jax2tf`
still ships and, in its native (StableHLO) serialization, wraps the jitted Flax encoder in
one XlaCallModule op; `tf.lite.TFLiteConverter` legalizes that StableHLO to TFLite builtins
(no Flex/TF ops, so the plain LiteRT runtime runs the files). The Flax model is the one that
was trained, so nothing in between (HF weight layout, torch graph capture) can drift, and
no extra converter package is needed. ai-edge-torch (now litert-torch) from the PyTorch
towers would be the fallback if jax2tf were removed; it is not needed today.

One limit found on the way: a polymorphic batch dimension makes jax2tf emit
`stablehlo.dynamic_gather` (the class-token slice), which the TFLite converter rejects
("vhlo.dynamic_gather_v1 op is not part of the vhlo support yet"), so every file has a
fixed batch of 1, the edge case (call once per image / text).

Files (OUT/tflite/, all with a `serving_default` signature):
  vision_model.tflite        pixel_values float32 [1, S, S, 3] (NHWC, CLIP-normalized:
                             preprocess.preprocess_image) -> image_embeds float32 [1, D]
  text_model.tflite          input_ids int32 [1, context] (BOS ... EOS, then the pad token
                             up to exactly `context` ids) -> text_embeds float32 [1, D]
  *_int8.tflite              dynamic-range int8: int8 weights, float activations
                             (tf.lite.Optimize.DEFAULT, no calibration)
  *_int8_full.tflite         full-integer int8: weights and activations int8, ranges
                             calibrated on a sample of the run's data; float32 in/out, ops
                             without an int8 kernel fall back to float
  tokenizer.json, clipdistill_litert.json   tokenizer and manifest (litert_runtime.py)
Embeddings are L2-normalized. The text tower takes no attention mask: it is causal and pools
at the end-of-text token, so the pad ids after it cannot change the result.

Which int8 to ship: dynamic range keeps activations in float and stays within ~1e-4 cosine
of fp32; full integer is the smallest and runs on integer-only accelerators, but rounding
the activations costs more, most of all in the text tower (layer norms and softmax over a
narrow width: on a tiny trained test student, text cosine ~0.96 vs ~0.998 for images, and
more varied calibration prompts did not move it). The export reports both, per tower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.data.tokenizer import Tokenizer
from clipdistill_jax.errors import UserError
from clipdistill_jax.export import litert_runtime as lrt
from clipdistill_jax.export import onnx_runtime as rt
from clipdistill_jax.export.samples import CaptionedImages, ZeroShotSet
from clipdistill_jax.export.torch_export import EMBEDDING_TOLERANCE, flax_embeddings, max_abs_diff
from clipdistill_jax.models.config import CLIPConfig

QUANTIZATIONS = ("fp32", "int8", "int8_full")
CALIBRATION_SAMPLES = 64


class LiteRTUnavailableError(UserError, RuntimeError):
  """TensorFlow (the converter) is not installed."""


@contextlib.contextmanager
def _quiet_tf():
  # The converter logs hundreds of MLIR pass lines at INFO; keep its warnings and errors.
  previous = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
  level = logging.getLogger("tensorflow").level
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  try:
    yield
  finally:
    logging.getLogger("tensorflow").setLevel(level)
    if previous is None:
      os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    else:
      os.environ["TF_CPP_MIN_LOG_LEVEL"] = previous


def _tf():
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise LiteRTUnavailableError(f"--tflite needs tensorflow (the converter): {e}; install it "
                                 "with `pip install 'clipdistill_jax[litert]'`.") from e
  return tf, jax2tf


def _encoder_fns(config: CLIPConfig, params: Any):
  import jax
  import jax.numpy as jnp

  from clipdistill_jax.models.clip import CLIPModel
  model = CLIPModel(config)
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}

  def image(pixel_values):
    return model.apply(variables, pixel_values, method=CLIPModel.encode_image).image_embeds

  def text(input_ids):
    mask = jnp.ones_like(input_ids)  # causal tower, pooled at EOS: the pads never matter
    return model.apply(variables, input_ids, mask, method=CLIPModel.encode_text).text_embeds
  return image, text


def convert_encoder(fn, input_spec: tuple[str, Sequence[int], str], output_name: str,
                    quantization: str = "fp32",
                    calibration: Iterable[np.ndarray] | None = None) -> bytes:
  """A TFLite flatbuffer of `fn` (one array in, one out) via jax2tf + TFLiteConverter.

  input_spec: (name, shape, dtype name). quantization: 'fp32', 'int8' (dynamic range) or
  'int8_full' (needs `calibration`, arrays of the input's shape). The SavedModel step gives
  the file a `serving_default` signature with these input/output names.
  """
  if quantization not in QUANTIZATIONS:
    raise ValueError(f"quantization={quantization!r}: choose one of {QUANTIZATIONS}.")
  if quantization == "int8_full" and calibration is None:
    raise ValueError("int8_full needs calibration inputs (representative data).")
  tf, jax2tf = _tf()
  name, shape, dtype = input_spec
  converted = jax2tf.convert(fn, with_gradient=False)
  module = tf.Module()
  module.f = tf.function(lambda x: {output_name: converted(x)}, autograph=False,
                         input_signature=[tf.TensorSpec(shape, getattr(tf, dtype), name=name)])
  with _quiet_tf(), tempfile.TemporaryDirectory(prefix="clipdistill_tf_") as saved:
    tf.saved_model.save(module, saved,
                        signatures={"serving_default": module.f.get_concrete_function()})
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if quantization != "fp32":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "int8_full":
      samples = list(calibration)
      converter.representative_dataset = lambda: ([np.asarray(s)] for s in samples)
    return converter.convert()


def export_litert(config: CLIPConfig, params: Any, litert_dir: str | Path,
                  tokenizer_dir: str | Path, pad_token: str,
                  calibration: tuple[np.ndarray, Sequence[str], str] | None = None,
                  tokenizer: Tokenizer | None = None, int8: bool = True,
                  log=print) -> dict[str, Any]:
  """Writes the LiteRT files, tokenizer.json (copied from `tokenizer_dir`) and the manifest
  into `litert_dir`.

  int8: also the dynamic-range files and, given `calibration` (pixels float32 [N, S, S, 3]
  CLIP-normalized, texts, a description of where they came from) and `tokenizer`, the
  full-integer files, calibrated on the first CALIBRATION_SAMPLES of each.
  Returns {"files": {variant: {"vision": name, "text": name}}, "seconds": {variant: s}}.
  Raises LiteRTUnavailableError without tensorflow.
  """
  litert_dir = Path(litert_dir)
  litert_dir.mkdir(parents=True, exist_ok=True)
  size = config.vision_config.image_size
  context = config.text_config.max_position_embeddings
  image_fn, text_fn = _encoder_fns(config, params)
  vision_spec = ("pixel_values", (1, size, size, 3), "float32")
  text_spec = ("input_ids", (1, context), "int32")
  variants = ["fp32"] + (["int8"] if int8 else [])
  calib_pixels = calib_ids = None
  if int8 and calibration is not None and tokenizer is not None:
    variants.append("int8_full")
    pixels, texts, _ = calibration
    calib_pixels = [np.asarray(p[None], np.float32) for p in pixels[:CALIBRATION_SAMPLES]]
    ids, _ = tokenizer(list(texts)[:CALIBRATION_SAMPLES], context)
    calib_ids = [i[None].astype(np.int32) for i in ids]
  files, seconds = {}, {}
  for variant in variants:
    start = time.perf_counter()
    names = lrt.FILES[variant]
    log(f"LiteRT {variant}: converting the vision and text encoders")
    vision = convert_encoder(image_fn, vision_spec, "image_embeds", variant, calib_pixels)
    text = convert_encoder(text_fn, text_spec, "text_embeds", variant, calib_ids)
    _write(litert_dir / names["vision"], vision)
    _write(litert_dir / names["text"], text)
    files[variant] = dict(names)
    seconds[variant] = time.perf_counter() - start
  shutil.copyfile(Path(tokenizer_dir) / rt.TOKENIZER_JSON, litert_dir / rt.TOKENIZER_JSON)
  text_cfg = config.text_config
  logit_scale = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
  lrt.write_manifest(litert_dir, {
      "format": "clipdistill-litert/1",
      "files": files,
      "converter": "jax.experimental.jax2tf (native serialization) + tf.lite.TFLiteConverter",
      "image_size": size, "context_length": context,
      "projection_dim": config.projection_dim, "logit_scale": logit_scale,
      "pad_token": pad_token,
      "text_pooling": ("argmax(input_ids)" if text_cfg.pools_at_argmax
                       else f"first input_ids == {text_cfg.eos_token_id}"),
      "calibration": calibration[2] if "int8_full" in files else None,
      "inputs": {"vision": f"pixel_values float32 [1, {size}, {size}, 3] (NHWC), "
                           "CLIP-normalized",
                 "text": f"input_ids int32 [1, {context}], padded with the pad token"},
      "outputs": {"vision": "image_embeds float32 [1, D], L2-normalized",
                  "text": "text_embeds float32 [1, D], L2-normalized"},
  })
  return {"files": files, "seconds": seconds}


def _write(path: Path, data: bytes) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


# --- verification -------------------------------------------------------------------------

def verify_litert_parity(config: CLIPConfig, params: Any, litert_dir: str | Path,
                         tokenizer: Tokenizer, photos: CaptionedImages,
                         tolerance: float = EMBEDDING_TOLERANCE) -> dict[str, Any]:
  """fp32 LiteRT files vs the Flax student on the photos and their captions (max abs diff
  of the embeddings, threshold `tolerance`), run in the LiteRT interpreter one at a time."""
  clip = lrt.LiteRTCLIP(litert_dir)
  pixels = photos.preprocessed(config.vision_config.image_size)
  ids, mask = tokenizer(photos.captions, config.text_config.max_position_embeddings)
  flax_image, flax_text = flax_embeddings(config, params, pixels, ids, mask)
  image = clip.encode_pixels(pixels)
  text = clip.encode_ids(ids)
  runtime_ids, _ = clip.tokenize(photos.captions)
  report = {"runtime": clip.runtime, "images": len(pixels), "source": photos.source,
            "image_embeds_max_abs_diff": max_abs_diff(flax_image, image),
            "text_embeds_max_abs_diff": max_abs_diff(flax_text, text),
            "runtime_tokenizer_ids_equal": bool(np.array_equal(runtime_ids, ids)),
            "tolerance": tolerance}
  report["ok"] = max(report["image_embeds_max_abs_diff"],
                     report["text_embeds_max_abs_diff"]) <= tolerance
  return report


def litert_zero_shot_embeddings(litert_dir: str | Path, variant: str, eval_set: ZeroShotSet,
                                ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image_embeds, prompt text_embeds) of one LiteRT variant on a zero-shot set."""
  clip = lrt.LiteRTCLIP(litert_dir, variant=variant)
  return clip.encode_pixels(eval_set.pixel_values), clip.encode_ids(ids)


def latency_row(litert_dir: str | Path, variant: str, config: CLIPConfig,
                budget_s: float, threads: int | None) -> dict[str, float]:
  """Batch-1 image and text latency (ms) of one LiteRT variant, and its size (MB)."""
  from clipdistill_jax.export.benchmark import time_ms
  clip = lrt.LiteRTCLIP(litert_dir, variant=variant, threads=threads)
  size = config.vision_config.image_size
  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
  ids = np.full((1, clip.context_length), clip.pad_id, np.int32)
  ids[0, 0] = min(49406, config.text_config.vocab_size - 1)
  ids[0, -1] = clip.pad_id
  return {"image_ms_b1": time_ms(lambda: clip.encode_pixels(pixels), budget_s=budget_s),
          "text_ms_b1": time_ms(lambda: clip.encode_ids(ids), budget_s=budget_s),
          "size_mb": sum(os.path.getsize(p) for p in (clip.vision_path, clip.text_path))
          / 2**20}
