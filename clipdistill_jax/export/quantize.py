"""int8 PyTorch student (dynamic quantization of the Linear layers), sizes, and agreement.

API choice, torch 2.13: `torch.ao.quantization.quantize_dynamic` is marked deprecated (its
warning says "will be removed in 2.10", yet it is still there and works in 2.13) in favour of
torchao's `quantize_(model, Int8DynamicActivationInt8WeightConfig())`. We keep
`quantize_dynamic`: torchao is not pure Python (its wheel carries CUDA kernels, it is pinned
to narrow torch versions) and a torchao-quantized model needs torchao to load, while
quantize_dynamic is in the torch we already pin and runs fbgemm int8 kernels on any x86 CPU.
When torch drops it, `quantize_int8` is the one place to switch to torchao.

Neither kind of torch-quantized model exports to ONNX; the int8 ONNX files come from
onnxruntime's own dynamic quantization of the fp32 ONNX files (onnx_export.py).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

INT8_WEIGHTS = "model_int8.pt"
QUANTIZATION_NOTE = ("torch.ao.quantization.quantize_dynamic (deprecated in torch 2.x in favour "
                     "of torchao.quantization.quantize_; kept because torchao is not pure "
                     "Python and is not needed to load the result)")
# The targets for the trained demo student; on random tiny weights they are only reported.
TARGET_COSINE = 0.99
TARGET_AGREEMENT = 0.97


def quantize_int8(model):
  """A copy of `model` with every nn.Linear dynamically quantized to int8 (weights int8,
  activations quantized per batch at run time). Embeddings, the patch conv and layer norms
  stay fp32."""
  import torch
  from torch.ao.quantization import quantize_dynamic
  with warnings.catch_warnings():
    # Deprecation notices for quantize_dynamic and the qint8 tensors it creates: the choice
    # is documented above and in the export report, so they need not scroll past every run.
    warnings.filterwarnings("ignore", message=r".*(deprecated|will be removed).*")
    return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def save_int8(quantized_model, out_dir: str | os.PathLike) -> Path:
  """Saves the quantized state dict (safetensors cannot hold packed int8 params)."""
  import torch
  path = Path(out_dir) / INT8_WEIGHTS
  tmp = path.with_suffix(".tmp")
  torch.save(quantized_model.state_dict(), tmp)
  os.replace(tmp, path)
  return path


def load_int8(out_dir: str | os.PathLike):
  """The int8 model saved by `save_int8`: rebuild from config.json, quantize, load weights."""
  import torch

  from clipdistill_jax.export.torch_export import load_torch_model
  path = Path(out_dir) / INT8_WEIGHTS
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; export with --quantize int8 first.")
  model = quantize_int8(load_torch_model(out_dir))
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  return model.eval()


def file_size_mb(*paths: str | os.PathLike) -> float:
  return sum(os.path.getsize(p) for p in paths) / 2**20


# --- agreement between a reference model and a compressed one -------------------------------

def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def zero_shot_agreement(reference: tuple[np.ndarray, np.ndarray],
                        candidate: tuple[np.ndarray, np.ndarray],
                        labels: np.ndarray | None = None) -> dict[str, Any]:
  """Compares (image_embeds, class_text_embeds) of two models on one zero-shot set.

  Reports the cosine between the two models' embeddings of each image / class prompt and
  how often their top-1 class agrees (plus each one's accuracy when `labels` are given).
  """
  ref_image, ref_text = reference
  cand_image, cand_text = candidate
  ref_top1 = np.argmax(ref_image @ ref_text.T, axis=-1)
  cand_top1 = np.argmax(cand_image @ cand_text.T, axis=-1)
  image_cos, text_cos = cosine_rows(ref_image, cand_image), cosine_rows(ref_text, cand_text)
  report = {
      "images": int(len(ref_image)), "classes": int(len(ref_text)),
      "image_cosine_min": float(image_cos.min()), "image_cosine_mean": float(image_cos.mean()),
      "text_cosine_min": float(text_cos.min()), "text_cosine_mean": float(text_cos.mean()),
      "top1_agreement": float(np.mean(ref_top1 == cand_top1)),
  }
  if labels is not None:
    report["reference_accuracy"] = float(np.mean(ref_top1 == labels))
    report["candidate_accuracy"] = float(np.mean(cand_top1 == labels))
  report["meets_targets"] = bool(
      min(report["image_cosine_mean"], report["text_cosine_mean"]) >= TARGET_COSINE
      and report["top1_agreement"] >= TARGET_AGREEMENT)
  return report
