"""Vision and text encoders as two ONNX files, their onnxruntime parity, and int8 ONNX.

Separate files because deployments use the towers apart: a search index embeds images
once, a query embeds only text. Each graph returns L2-normalized embeddings, so a caller
needs nothing but a dot product (and `logit_scale`, in the manifest, for probabilities).

The known CLIP ONNX pitfall is text pooling: the tower pools at argmax(input_ids) (legacy
`eos_token_id: 2` configs) or at the first `eos_token_id`, and ArgMax over int64 ids is not
available in older opsets/runtimes, so exports either failed or baked the position in.
Here the graph input `input_ids` is int64 (what tokenizers hand out; transformers casts to
int32 inside the graph before the ArgMax), batch and sequence are dynamic, and the export
goes through torch.export (dynamo), which keeps the pooling index data-dependent. The
parity checks feed padded batches of different lengths at several batch sizes.

torch-quantized models cannot be exported (neither exporter handles packed int8 Linear), so
int8 ONNX is onnxruntime's `quantize_dynamic` applied to the fp32 files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.data.tokenizer import Tokenizer
from clipdistill_jax.export import onnx_runtime as rt
from clipdistill_jax.export.samples import CaptionedImages, reference_photos
from clipdistill_jax.export.torch_export import EMBEDDING_TOLERANCE, max_abs_diff, torch_embeddings
from clipdistill_jax.models.config import CLIPConfig

OPSET = 18


def _encoders():
  """The two wrapper modules (defined lazily so importing this file does not import torch)."""
  import torch

  class ImageEncoder(torch.nn.Module):
    def __init__(self, clip):
      super().__init__()
      self.clip = clip

    def forward(self, pixel_values):
      features = self.clip.get_image_features(pixel_values=pixel_values).pooler_output
      return features / features.norm(dim=-1, keepdim=True)

  class TextEncoder(torch.nn.Module):
    def __init__(self, clip):
      super().__init__()
      self.clip = clip

    def forward(self, input_ids, attention_mask):
      features = self.clip.get_text_features(input_ids=input_ids,
                                             attention_mask=attention_mask).pooler_output
      return features / features.norm(dim=-1, keepdim=True)

  return ImageEncoder, TextEncoder


@contextlib.contextmanager
def _quiet_exporter():
  # The dynamo exporter logs every stage, warns that torchvision ops are unregistered and
  # that equal dynamic dims get one name; none of it is actionable here.
  loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                            "onnxscript", "root")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def export_onnx(model, config: CLIPConfig, onnx_dir: str | Path, tokenizer_dir: str | Path,
                pad_token: str = "<|endoftext|>", opset: int = OPSET) -> dict[str, Path]:
  """Writes vision_model.onnx, text_model.onnx, tokenizer.json and the manifest."""
  onnx_dir = Path(onnx_dir)
  onnx_dir.mkdir(parents=True, exist_ok=True)
  paths = {"vision": export_vision_onnx(model, config, onnx_dir / rt.VISION_FILE, opset),
           "text": export_text_onnx(model, config, onnx_dir / rt.TEXT_FILE, opset)}
  shutil.copyfile(Path(tokenizer_dir) / rt.TOKENIZER_JSON, onnx_dir / rt.TOKENIZER_JSON)
  text_cfg = config.text_config
  rt.write_manifest(onnx_dir, {
      "format": "clipdistill-onnx/1",
      "files": {"fp32": {"vision": rt.VISION_FILE, "text": rt.TEXT_FILE}},
      "opset": opset,
      "image_size": config.vision_config.image_size,
      "context_length": text_cfg.max_position_embeddings,
      "projection_dim": config.projection_dim,
      "logit_scale": float(model.logit_scale.exp().item()),
      "pad_token": pad_token,
      "text_pooling": ("argmax(input_ids)" if text_cfg.pools_at_argmax
                       else f"first input_ids == {text_cfg.eos_token_id}"),
      "inputs": {"vision": "pixel_values float32 [batch, 3, S, S], CLIP-normalized",
                 "text": "input_ids int64 [batch, seq], attention_mask int64 [batch, seq]"},
      "outputs": {"vision": "image_embeds float32 [batch, D], L2-normalized",
                  "text": "text_embeds float32 [batch, D], L2-normalized"},
  })
  return paths


def export_vision_onnx(model, config: CLIPConfig, path: str | Path, opset: int = OPSET) -> Path:
  """pixel_values [batch, 3, S, S] -> image_embeds [batch, D]; batch is dynamic."""
  import torch
  image_encoder = _encoders()[0](model).eval()
  size = config.vision_config.image_size
  batch = torch.export.Dim("batch", min=1, max=4096)
  with _quiet_exporter(), torch.no_grad():
    torch.onnx.export(image_encoder, (torch.randn(2, 3, size, size),), str(path), dynamo=True,
                      opset_version=opset, input_names=["pixel_values"],
                      output_names=["image_embeds"], external_data=False, verbose=False,
                      dynamic_shapes={"pixel_values": {0: batch}})
  return Path(path)


def export_text_onnx(model, config: CLIPConfig, path: str | Path, opset: int = OPSET) -> Path:
  """input_ids, attention_mask int64 [batch, seq] -> text_embeds [batch, D]; batch and seq
  (up to the context length) are dynamic."""
  import torch
  text_encoder = _encoders()[1](model).eval()
  text_cfg = config.text_config
  context = text_cfg.max_position_embeddings
  batch = torch.export.Dim("batch", min=1, max=4096)
  sequence = torch.export.Dim("sequence", min=2, max=context)
  # An example like real input (BOS ... EOT); it fixes dtypes and ranks, not positions.
  eot = text_cfg.vocab_size - 1 if text_cfg.pools_at_argmax else text_cfg.eos_token_id
  ids = torch.randint(1, 1000, (2, context))
  ids[:, 0] = min(49406, text_cfg.vocab_size - 2)
  ids[:, -1] = eot
  with _quiet_exporter(), torch.no_grad():
    torch.onnx.export(text_encoder, (ids, torch.ones_like(ids)), str(path), dynamo=True,
                      opset_version=opset, input_names=["input_ids", "attention_mask"],
                      output_names=["text_embeds"], external_data=False, verbose=False,
                      dynamic_shapes={"input_ids": {0: batch, 1: sequence},
                                      "attention_mask": {0: batch, 1: sequence}})
  return Path(path)


def quantize_onnx_int8(onnx_dir: str | Path) -> dict[str, Path]:
  """onnxruntime dynamic quantization (int8 weights of MatMul/Gather/Conv) of both files."""
  from onnxruntime.quantization import QuantType, quantize_dynamic
  onnx_dir = Path(onnx_dir)
  pairs = {"vision": (rt.VISION_FILE, rt.VISION_INT8_FILE), "text": (rt.TEXT_FILE,
                                                                     rt.TEXT_INT8_FILE)}
  out = {}
  with _quiet_exporter():
    for tower, (fp32, int8) in pairs.items():
      quantize_dynamic(onnx_dir / fp32, onnx_dir / int8, weight_type=QuantType.QInt8)
      out[tower] = onnx_dir / int8
  manifest = rt.read_manifest(onnx_dir)
  manifest["files"]["int8"] = {"vision": rt.VISION_INT8_FILE, "text": rt.TEXT_INT8_FILE}
  manifest["int8"] = "onnxruntime.quantization.quantize_dynamic, QInt8 weights"
  rt.write_manifest(onnx_dir, manifest)
  return out


def onnx_graph_facts(path: str | Path) -> dict[str, Any]:
  """Opset, input types/shapes and whether token ids reach ArgMax as int32 (text graph)."""
  import onnx
  model = onnx.load(str(path), load_external_data=False)
  names = {v: k for k, v in onnx.TensorProto.DataType.items()}
  inputs = {i.name: (names[i.type.tensor_type.elem_type],
                     [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in model.graph.input}
  opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
  return {"opset": opset, "inputs": inputs,
          "argmax_nodes": sum(n.op_type == "ArgMax" for n in model.graph.node)}


def verify_onnx_parity(torch_model, onnx_dir: str | Path, config: CLIPConfig,
                       tokenizer: Tokenizer, photos: CaptionedImages | None = None,
                       tolerance: float = EMBEDDING_TOLERANCE) -> dict[str, Any]:
  """onnxruntime fp32 vs PyTorch on photos and captions, at batch 1 and the full batch.

  Text goes in two ways: padded to the context length (as the trainer tokenizes) and
  through the runtime's own tokenizer, padded to the longest caption (as the CLI does).
  """
  photos = photos or reference_photos()
  onnx_clip = rt.OnnxCLIP(onnx_dir)
  pixels = photos.preprocessed(config.vision_config.image_size)
  ids, mask = tokenizer(photos.captions, config.text_config.max_position_embeddings)
  ref_image, ref_text = torch_embeddings(torch_model, pixels, ids, mask)
  diffs = {}
  for size in sorted({1, len(pixels)}):
    image = rt.run_vision(onnx_clip.vision_session, pixels[:size])
    text = rt.run_text(onnx_clip.text_session, ids[:size], mask[:size])
    diffs[f"image_embeds_batch{size}"] = max_abs_diff(image, ref_image[:size])
    diffs[f"text_embeds_batch{size}"] = max_abs_diff(text, ref_text[:size])
  runtime_ids, _ = onnx_clip.tokenize(photos.captions)
  diffs["text_embeds_runtime_tokenizer"] = max_abs_diff(
      onnx_clip.encode_texts(photos.captions), ref_text)
  longest = runtime_ids.shape[1]
  report = {"max_abs_diff": diffs, "tolerance": tolerance,
            "runtime_tokenizer_ids_equal": bool(np.array_equal(runtime_ids, ids[:, :longest])),
            "vision_graph": onnx_graph_facts(onnx_clip.vision_path),
            "text_graph": onnx_graph_facts(onnx_clip.text_path)}
  report["ok"] = max(diffs.values()) <= tolerance and report["runtime_tokenizer_ids_equal"]
  return report


def onnx_embeddings(onnx_dir: str | Path, pixel_values: np.ndarray, texts: list[str],
                    int8: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(image_embeds, text_embeds) of the fp32 or int8 ONNX files."""
  onnx_clip = rt.OnnxCLIP(onnx_dir, int8=int8)
  return onnx_clip.encode_pixels(pixel_values), onnx_clip.encode_texts(texts)
