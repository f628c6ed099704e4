"""The exported LiteRT (TFLite) encoders at run time: an interpreter, numpy, PIL, `tokenizers`.

The interpreter is `ai_edge_litert.interpreter.Interpreter` (pip install ai-edge-litert, a
small wheel) when installed, else `tf.lite.Interpreter` from tensorflow (deprecated in its
favour, same API). The files are described in litert_export.py; each has a fixed batch of 1
and the text file a fixed sequence length, so `LiteRTCLIP` calls them once per image / text
and pads ids to the full context. It has OnnxCLIP's interface, so the `clipdistill` CLI
runs on it where onnxruntime is not installed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.export import onnx_runtime
from clipdistill_jax.export.onnx_runtime import (
    TOKENIZER_JSON,
    ModelNotFoundError,
    OnnxCLIP,
)

LITERT_DIR = "tflite"
MANIFEST = "clipdistill_litert.json"
FILES = {
    "fp32": {"vision": "vision_model.tflite", "text": "text_model.tflite"},
    "int8": {"vision": "vision_model_int8.tflite", "text": "text_model_int8.tflite"},
    "int8_full": {"vision": "vision_model_int8_full.tflite",
                  "text": "text_model_int8_full.tflite"},
}


def read_manifest(litert_dir: str | os.PathLike) -> dict[str, Any]:
  return onnx_runtime.read_manifest(litert_dir, MANIFEST)


def write_manifest(litert_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
  return onnx_runtime.write_manifest(litert_dir, manifest, MANIFEST)


def interpreter_class() -> tuple[type, str]:
  """(Interpreter class, its name); ImportError names what to install when neither exists."""
  try:
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter, "ai_edge_litert"
  except ImportError:
    pass
  try:
    import warnings

    import tensorflow as tf
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
      return tf.lite.Interpreter, "tf.lite"
  except ImportError:
    raise ImportError("no LiteRT interpreter: pip install ai-edge-litert (or tensorflow)"
                      ) from None


def find_litert_dir(model: str | os.PathLike) -> Path:
  """The folder holding clipdistill_litert.json: `model` itself or `model/tflite`."""
  path = Path(model).expanduser()
  for candidate in (path, path / LITERT_DIR):
    if (candidate / MANIFEST).is_file():
      return candidate
  raise ModelNotFoundError(f"{path} has no LiteRT export ({LITERT_DIR}/{MANIFEST} is missing); "
                           "create one with: python scripts/convert_to_pytorch.py --workdir "
                           f"WORKDIR --out {path} --tflite")


class _Runner:
  """One .tflite file: its single input and output, invoked one example at a time."""

  def __init__(self, path: Path, threads: int | None):
    import warnings
    interpreter, _ = interpreter_class()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      self.interpreter = interpreter(model_path=str(path), num_threads=threads)
    self.interpreter.allocate_tensors()
    self.input = self.interpreter.get_input_details()[0]
    self.output = self.interpreter.get_output_details()[0]

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    rows = []
    for example in batch:
      self.interpreter.set_tensor(self.input["index"],
                                  np.asarray(example[None], self.input["dtype"]))
      self.interpreter.invoke()
      rows.append(self.interpreter.get_tensor(self.output["index"])[0].copy())
    return np.stack(rows).astype(np.float32)


class LiteRTCLIP(OnnxCLIP):
  """Both LiteRT encoders plus the tokenizer and preprocessing they expect.

  variant: 'fp32', 'int8' (dynamic range) or 'int8_full' (full-integer), as exported.
  `int8=True` is the CLI's spelling of variant 'int8'.
  """

  KIND, FLAG = "LiteRT", "--tflite"

  def __init__(self, model: str | os.PathLike, int8: bool = False, threads: int | None = None,
               variant: str | None = None):
    directory = find_litert_dir(model)
    self._load(directory, read_manifest(directory), variant or ("int8" if int8 else "fp32"),
               threads)
    self.runtime = interpreter_class()[1]

  def _open(self, path: Path) -> _Runner:
    return _Runner(path, self._threads)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      # The text file has a fixed sequence length: pad every text to the full context.
      super().tokenizer.enable_padding(pad_id=self.pad_id, pad_token=self.manifest["pad_token"],
                                       length=self.context_length)
    return self._tokenizer

  @functools.cached_property
  def pad_id(self) -> int:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_JSON))
    return int(tokenizer.token_to_id(self.manifest["pad_token"]))

  def encode_ids(self, input_ids: np.ndarray) -> np.ndarray:
    """text_embeds [N, D] of ids already padded to the context length."""
    return self.text_session(np.asarray(input_ids, np.int32))

  def _embed_pixels(self, pixel_values_nhwc: np.ndarray) -> np.ndarray:
    return self.vision_session(np.asarray(pixel_values_nhwc, np.float32))

  def _embed_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    del attention_mask  # the graph has none: pads after EOS do not reach the pooled token
    return self.encode_ids(input_ids)
