"""The student as a Hugging Face directory, and proof that PyTorch computes what Flax did.

`export_student` writes config.json + model.safetensors (models/hf.py), the tokenizer files
and preprocessor_config.json, so `transformers.CLIPModel.from_pretrained(out)`,
`CLIPProcessor.from_pretrained(out)` and `pipeline("zero-shot-image-classification",
model=out)` all work offline. `verify_torch_parity` runs both frameworks on the same photos
and captions and returns the max abs differences; `check_processor` checks that the
processor transformers builds from the directory feeds the model what ours does.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.data import preprocess
from clipdistill_jax.data.tokenizer import Tokenizer, load_tokenizer
from clipdistill_jax.errors import UserError
from clipdistill_jax.export.samples import CaptionedImages, reference_photos, to_pil
from clipdistill_jax.models import hf
from clipdistill_jax.models.config import CLIPConfig

# Embeddings are unit vectors; 1e-4 is far above float32 reordering noise (~1e-6) and far
# below any real mistake (a transposed weight, wrong pooling: ~1e-1).
EMBEDDING_TOLERANCE = 1e-4


class ExportVerificationError(UserError, RuntimeError):
  """An exported model disagrees with the model it was exported from."""


def export_student(config: CLIPConfig, params: Any, out_dir: str | os.PathLike,
                   tokenizer: Tokenizer | None = None) -> Path:
  """Writes the HF directory: weights, config, tokenizer, image preprocessor config."""
  tokenizer = tokenizer or load_tokenizer()
  if tokenizer.vocab_size > config.text_config.vocab_size:
    raise ValueError(
        f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} ids but the text tower "
        f"embeds only {config.text_config.vocab_size}; export with the tokenizer the student "
        "was trained with.")
  out = hf.save_pretrained(config, params, out_dir)
  respect_umask(out / hf.SAFETENSORS)
  tokenizer.save(str(out))
  _set_model_max_length(out, config.text_config.max_position_embeddings)
  preprocess.save_preprocessor_config(str(out), config.vision_config.image_size)
  return out


def respect_umask(path: str | os.PathLike) -> None:
  """Gives `path` the mode a plain open() would (0o666 less the umask).

  safetensors writes through a private temporary file, so model.safetensors would otherwise
  be 0600 while every other exported file is readable by the group and others as the umask
  allows: a model shared on a server must be readable like its config.
  """
  umask = os.umask(0)
  os.umask(umask)  # reading the umask means setting it; restored at once
  os.chmod(path, 0o666 & ~umask)


def _set_model_max_length(out: Path, context_length: int) -> None:
  # transformers truncates to model_max_length: it must be the student's context, not 77,
  # or the pipeline feeds a short-context student more positions than it has.
  path = out / "tokenizer_config.json"
  config = json.loads(path.read_text(encoding="utf-8"))
  config["model_max_length"] = context_length
  path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                  encoding="utf-8")


def load_torch_model(out_dir: str | os.PathLike):
  """`transformers.CLIPModel` from an exported directory, in eval mode, no network."""
  import transformers
  return transformers.CLIPModel.from_pretrained(str(out_dir), local_files_only=True).eval()


# --- embeddings in each framework -------------------------------------------------------------

def flax_embeddings(config: CLIPConfig, params: Any, pixel_values: np.ndarray | None,
                    input_ids: np.ndarray | None, attention_mask: np.ndarray | None = None
                    ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(image_embeds, text_embeds) of the Flax model; NHWC pixels, int32 ids."""
  encode_image, encode_text = _flax_encoders(config)
  variables = {"params": params}
  image = text = None
  if pixel_values is not None:
    image = np.asarray(encode_image(variables, np.asarray(pixel_values, np.float32)))
  if input_ids is not None:
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    text = np.asarray(encode_text(variables, np.asarray(input_ids, np.int32),
                                  np.asarray(mask, np.int32)))
  return image, text


@functools.lru_cache(maxsize=8)
def _flax_encoders(config: CLIPConfig):
  # One jitted pair per config, so repeated checks of one student compile once per shape.
  import jax

  from clipdistill_jax.models.clip import CLIPModel
  model = CLIPModel(config)
  encode_image = jax.jit(
      lambda v, x: model.apply(v, x, method=CLIPModel.encode_image).image_embeds)
  encode_text = jax.jit(
      lambda v, i, m: model.apply(v, i, m, method=CLIPModel.encode_text).text_embeds)
  return encode_image, encode_text


def torch_embeddings(model, pixel_values: np.ndarray | None, input_ids: np.ndarray | None,
                     attention_mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(image_embeds, text_embeds), L2-normalized, of a transformers CLIPModel (fp32 or int8).

  Takes NHWC pixels like the Flax side and transposes them to PyTorch's NCHW.
  """
  import torch
  image = text = None
  with torch.inference_mode():
    if pixel_values is not None:
      pixels = torch.from_numpy(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2)))
      image = _normalized(model.get_image_features(pixel_values=pixels).pooler_output)
    if input_ids is not None:
      ids = torch.from_numpy(np.asarray(input_ids, np.int64))
      mask = None if attention_mask is None else torch.from_numpy(
          np.asarray(attention_mask, np.int64))
      text = _normalized(model.get_text_features(input_ids=ids,
                                                 attention_mask=mask).pooler_output)
  return image, text


def _normalized(features) -> np.ndarray:
  features = features.float()
  return (features / features.norm(dim=-1, keepdim=True)).numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- verification -----------------------------------------------------------------------------

def verify_torch_parity(config: CLIPConfig, params: Any, model, tokenizer: Tokenizer,
                        photos: CaptionedImages | None = None,
                        tolerance: float = EMBEDDING_TOLERANCE) -> dict[str, Any]:
  """Flax vs the exported PyTorch model on photos and their captions (padded batch).

  Returns max abs diffs of image/text embeddings and of the logits (logit_scale times
  cosine, so ~100x the embedding error: reported, not thresholded) and `ok`.
  """
  photos = photos or reference_photos()
  pixels = photos.preprocessed(config.vision_config.image_size)
  ids, mask = tokenizer(photos.captions, config.text_config.max_position_embeddings)
  flax_image, flax_text = flax_embeddings(config, params, pixels, ids, mask)
  torch_image, torch_text = torch_embeddings(model, pixels, ids, mask)
  scale = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
  report = {
      "images": len(photos.images), "source": photos.source,
      "image_embeds_max_abs_diff": max_abs_diff(flax_image, torch_image),
      "text_embeds_max_abs_diff": max_abs_diff(flax_text, torch_text),
      "logits_max_abs_diff": max_abs_diff(scale * flax_image @ flax_text.T,
                                          scale * torch_image @ torch_text.T),
      "tolerance": tolerance,
  }
  report["ok"] = max(report["image_embeds_max_abs_diff"],
                     report["text_embeds_max_abs_diff"]) <= tolerance
  return report


def check_processor(out_dir: str | os.PathLike, config: CLIPConfig, tokenizer: Tokenizer,
                    photos: CaptionedImages | None = None) -> dict[str, Any]:
  """transformers' CLIPProcessor loaded from `out_dir` vs our preprocessing + tokenizer."""
  import transformers
  photos = photos or reference_photos()
  length = config.text_config.max_position_embeddings
  processor = transformers.CLIPProcessor.from_pretrained(str(out_dir), local_files_only=True)
  inputs = processor(images=[to_pil(image) for image in photos.images], text=photos.captions,
                     return_tensors="np", padding="max_length", truncation=True,
                     max_length=length)
  ours_pixels = photos.preprocessed(config.vision_config.image_size)
  ours_ids, _ = tokenizer(photos.captions, length)
  return {
      "pixel_values_max_abs_diff": max_abs_diff(inputs["pixel_values"].transpose(0, 2, 3, 1),
                                                ours_pixels),
      "input_ids_equal": bool(np.array_equal(inputs["input_ids"], ours_ids)),
  }


def check_pipeline(out_dir: str | os.PathLike, photos: CaptionedImages | None = None
                   ) -> dict[str, Any]:
  """Runs transformers' zero-shot-image-classification pipeline on the directory, offline."""
  import transformers
  photos = photos or reference_photos()
  classifier = transformers.pipeline("zero-shot-image-classification", model=str(out_dir),
                                     device="cpu")
  result = classifier(to_pil(photos.images[0]), candidate_labels=photos.captions[:3])
  total = sum(r["score"] for r in result)
  return {"labels": len(result), "scores_sum": float(total),
          "ok": len(result) == 3 and abs(total - 1) < 1e-3}
