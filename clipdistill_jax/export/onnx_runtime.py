"""The exported ONNX encoders at run time: onnxruntime, numpy, PIL and `tokenizers` only.

No JAX, no torch, no transformers: this is what a deployment (and the `clipdistill` CLI)
imports. An export's `onnx/` folder is self-contained:

  vision_model.onnx   pixel_values float32 [batch, 3, S, S] (NCHW, CLIP-normalized)
                      -> image_embeds float32 [batch, D], L2-normalized
  text_model.onnx     input_ids int64 [batch, seq<=context], attention_mask int64
                      -> text_embeds float32 [batch, D], L2-normalized
  *_int8.onnx         the same graphs, onnxruntime dynamic int8 (when exported)
  tokenizer.json      the student's tokenizer (`tokenizers` format)
  clipdistill_onnx.json   file names, image size, context length, logit scale, pad token

Text is tokenized as transformers' CLIPTokenizer does (checked id for id at export) and
padded to the longest text in the batch: the text tower is causal and pools at the
end-of-text token, so padding after it changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.data.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    decode_and_preprocess,
)
from clipdistill_jax.errors import UserError

ONNX_DIR = "onnx"
MANIFEST = "clipdistill_onnx.json"
TOKENIZER_JSON = "tokenizer.json"
VISION_FILE, TEXT_FILE = "vision_model.onnx", "text_model.onnx"
VISION_INT8_FILE, TEXT_INT8_FILE = "vision_model_int8.onnx", "text_model_int8.onnx"

_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class ModelNotFoundError(FileNotFoundError):
  """The --model path is not an ONNX export (or lacks the requested variant)."""


class DamagedModelError(UserError, ValueError):
  """A file of the export cannot be read (truncated, overwritten): convert again."""


def find_onnx_dir(model: str | os.PathLike) -> Path:
  """The folder holding clipdistill_onnx.json: `model` itself or `model/onnx`."""
  path = Path(model).expanduser()
  convert_hint = ("create one with: python scripts/convert_to_pytorch.py --workdir WORKDIR "
                  f"--out {path} --onnx")
  if not path.exists():
    raise ModelNotFoundError(f"model directory {path} does not exist; {convert_hint}")
  if not path.is_dir():
    raise ModelNotFoundError(f"--model must be the exported directory, not a file: {path}")
  for candidate in (path, path / ONNX_DIR):
    if (candidate / MANIFEST).is_file():
      return candidate
  raise ModelNotFoundError(f"{path} has no ONNX export ({ONNX_DIR}/{MANIFEST} is missing); "
                           f"{convert_hint}")


def read_manifest(onnx_dir: str | os.PathLike, name: str = MANIFEST) -> dict[str, Any]:
  """The export's JSON manifest (`name` in `onnx_dir`; the LiteRT runtime passes its own)."""
  path = Path(onnx_dir) / name
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DamagedModelError(f"{path} is not valid JSON ({e}); the export is damaged: re-run "
                            "scripts/convert_to_pytorch.py with the same flags.") from e


def write_manifest(onnx_dir: str | os.PathLike, manifest: dict[str, Any],
                   name: str = MANIFEST) -> Path:
  path = Path(onnx_dir) / name
  path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  return path


def session(path: str | os.PathLike, threads: int | None = None):
  """A CPU onnxruntime InferenceSession with quiet logging."""
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.log_severity_level = 3
  if threads:
    options.intra_op_num_threads = threads
  try:
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ...: the file, not the code
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DamagedModelError(f"{path} cannot be loaded by onnxruntime ({type(e).__name__}: "
                            f"{reason}); the file is damaged or incomplete: re-run "
                            "scripts/convert_to_pytorch.py with the same flags.") from e


def run_vision(vision_session, pixel_values_nhwc: np.ndarray) -> np.ndarray:
  """image_embeds of a batch of NHWC pixels (the layout our preprocessing returns)."""
  pixels = np.ascontiguousarray(np.asarray(pixel_values_nhwc, np.float32).transpose(0, 3, 1, 2))
  name = vision_session.get_inputs()[0].name
  return vision_session.run(None, {name: pixels})[0]


def run_text(text_session, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """text_embeds; ids and mask are cast to whatever integer type the graph declares."""
  arrays = {"input_ids": input_ids, "attention_mask": attention_mask}
  feed = {}
  for spec in text_session.get_inputs():
    if spec.name not in arrays:
      raise ValueError(f"text model input {spec.name!r} is not one this runtime knows "
                       "(input_ids, attention_mask); was the file exported by clipdistill?")
    feed[spec.name] = np.asarray(arrays[spec.name], _ORT_INT_TYPES.get(spec.type, np.int64))
  return text_session.run(None, feed)[0]


class OnnxCLIP:
  """Both exported encoders plus the tokenizer and preprocessing they expect."""

  KIND, FLAG = "ONNX", "--onnx"  # how errors name the export and the flag that writes it

  def __init__(self, model: str | os.PathLike, int8: bool = False,
               threads: int | None = None):
    directory = find_onnx_dir(model)
    self._load(directory, read_manifest(directory), "int8" if int8 else "fp32", threads)

  def _load(self, directory: Path, manifest: dict[str, Any], variant: str,
            threads: int | None) -> None:
    """Reads the manifest's `variant` files; ModelNotFoundError if the export lacks them."""
    self.directory, self.manifest = directory, manifest
    files = manifest.get("files", {}).get(variant)
    if not files:
      raise ModelNotFoundError(
          f"{directory} has no {variant} {self.KIND} files; re-run the conversion with "
          f"{self.FLAG}" + (" --quantize int8" if variant != "fp32" else "") + ".")
    self.vision_path = directory / files["vision"]
    self.text_path = directory / files["text"]
    for path in (self.vision_path, self.text_path, directory / TOKENIZER_JSON):
      if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; the export is incomplete, re-run the "
                                 f"conversion with {self.FLAG}.")
    self.variant = variant
    self.image_size = int(manifest["image_size"])
    self.context_length = int(manifest["context_length"])
    self.logit_scale = float(manifest["logit_scale"])
    self._threads = threads
    self._vision = self._text = self._tokenizer = None

  def _open(self, path: Path):
    """One encoder file as a callable session (the LiteRT runtime opens interpreters)."""
    return session(path, self._threads)

  @property
  def vision_session(self):
    if self._vision is None:
      self._vision = self._open(self.vision_path)
    return self._vision

  @property
  def text_session(self):
    if self._text is None:
      self._text = self._open(self.text_path)
    return self._text

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = load_onnx_tokenizer(self.directory, self.context_length,
                                            self.manifest["pad_token"])
    return self._tokenizer

  # The two calls a runtime provides (litert_runtime.LiteRTCLIP swaps them).
  def _embed_pixels(self, pixel_values_nhwc: np.ndarray) -> np.ndarray:
    return run_vision(self.vision_session, pixel_values_nhwc)

  def _embed_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    return run_text(self.text_session, input_ids, attention_mask)

  def fingerprint(self) -> str:
    """Identifies the image encoder's weights (cached image embeddings depend on them)."""
    digest = hashlib.sha256(str(self.image_size).encode())
    with open(self.vision_path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()[:16]

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64, padded to the longest text (<= context length)."""
    encodings = self.tokenizer.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], np.int64)
    return ids, mask

  def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalized text embeddings [len(texts), D]."""
    if not texts:
      raise ValueError("no texts to encode: give at least one label or query.")
    chunks = []
    for start in range(0, len(texts), batch_size):
      ids, mask = self.tokenize(texts[start:start + batch_size])
      chunks.append(self._embed_tokens(ids, mask))
    return np.concatenate(chunks)

  def encode_pixels(self, pixel_values: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """L2-normalized image embeddings of preprocessed NHWC pixels."""
    chunks = [self._embed_pixels(pixel_values[start:start + batch_size])
              for start in range(0, len(pixel_values), batch_size)]
    return np.concatenate(chunks)

  def encode_image_files(self, paths: Iterable[str | os.PathLike], batch_size: int = 32,
                         max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                         ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(embeddings, the paths they belong to, [(path, why it was skipped)]).

    Images are decoded a batch at a time, so a large folder never sits in memory whole;
    an unreadable or undecodable file, or one over max_image_pixels (None: no limit), is
    skipped and reported, not fatal.
    """
    embeddings, encoded, skipped = [], [], []
    batch, batch_paths = [], []

    def flush():
      if batch:
        embeddings.append(self._embed_pixels(np.stack(batch)))
        encoded.extend(batch_paths)
        batch.clear()
        batch_paths.clear()

    for path in paths:
      try:
        batch.append(load_image_file(path, self.image_size, max_image_pixels))
        batch_paths.append(str(path))
      except ImageLoadError as e:
        skipped.append((str(path), str(e)))
        continue
      if len(batch) == batch_size:
        flush()
    flush()
    dim = int(self.manifest.get("projection_dim", 0))
    stacked = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    return stacked, encoded, skipped

  def probabilities(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """softmax over texts of logit_scale * cosine: [images, texts], rows sum to 1."""
    logits = self.logit_scale * (image_embeds @ text_embeds.T)
    logits = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


class ImageLoadError(ValueError):
  """A file that could not be read or decoded as an image."""


def load_image_file(path: str | os.PathLike, image_size: int,
                    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
  """A file -> normalized float32 [S, S, 3]; ImageLoadError says why it cannot be used
  (unreadable, not an image, or more pixels than max_image_pixels; None: no limit)."""
  try:
    with open(path, "rb") as f:
      encoded = f.read()
  except OSError as e:
    raise ImageLoadError(f"cannot read file: {e.strerror or e}") from e
  if not encoded:
    raise ImageLoadError("file is empty")
  try:
    return decode_and_preprocess(encoded, image_size, max_image_pixels)
  except ImageTooLargeError as e:
    raise ImageLoadError(f"image too large: {e}") from e
  except (CorruptImageError, ValueError) as e:
    raise ImageLoadError(f"not a readable image: {e}") from e


def load_onnx_tokenizer(directory: str | os.PathLike, context_length: int, pad_token: str):
  """`tokenizers.Tokenizer` set up to match CLIPTokenizer(truncation=True, padding=True)."""
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(Path(directory) / TOKENIZER_JSON))
  pad_id = tokenizer.token_to_id(pad_token)
  if pad_id is None:
    raise ValueError(f"pad token {pad_token!r} is not in {directory}/{TOKENIZER_JSON}; the "
                     "export is inconsistent, re-run the conversion.")
  # Truncation counts the special tokens the post-processor adds, so <|endoftext|> stays last.
  tokenizer.enable_truncation(max_length=context_length)
  tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
  return tokenizer
