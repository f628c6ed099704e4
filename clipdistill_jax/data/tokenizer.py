"""CLIP text tokenizer that works offline: transformers' CLIPTokenizer over packaged BPE files.

The packaged files (data/assets/, rebuilt by scripts/build_vocab.py from the MIT BPE table in
open-clip-torch) are openai/clip-vit-base-patch32's tokenizer. A checkpoint directory that
carries its own tokenizer files wins over them, so a student distilled with a different
tokenizer keeps it.

Ids match `CLIPTokenizer.from_pretrained(dir)(texts, padding="max_length", truncation=True)`:
`<|startoftext|>` text `<|endoftext|>`, padded with `<|endoftext|>` (49407, as HF pads), and
truncated so the end-of-text token stays last (the text towers pool there).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_CONTEXT_LENGTH = 77
# Keys transformers adds to tokenizer_config.json on save that describe this machine's load,
# not the tokenizer.
_LOAD_TIME_CONFIG_KEYS = ("is_local", "local_files_only")

logger = logging.getLogger(__name__)


def has_tokenizer_files(directory: str) -> bool:
  """True if `directory` holds a loadable HF tokenizer (tokenizer.json or vocab+merges)."""
  exists = lambda name: os.path.isfile(os.path.join(directory, name))
  return exists("tokenizer.json") or (exists("vocab.json") and exists("merges.txt"))


class Tokenizer:
  """Batch CLIP tokenizer returning fixed-length int32 numpy arrays."""

  def __init__(self, directory: str):
    # transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...) silently builds a
    # 3-token tokenizer; from_pretrained(dir) is the path that reads the files.
    from transformers import CLIPTokenizer

    if not has_tokenizer_files(directory):
      raise FileNotFoundError(
        f"No tokenizer files (tokenizer.json, or vocab.json + merges.txt) in {directory}. "
        "Use load_tokenizer() to fall back to the packaged CLIP tokenizer, or rebuild the "
        "packaged files with scripts/build_vocab.py."
      )
    self.source = directory
    self._hf = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    if self._hf.bos_token_id is None or self._hf.eos_token_id is None:
      raise ValueError(f"The tokenizer in {directory} defines no BOS/EOS token; CLIP needs both.")

  @property
  def bos_id(self) -> int:
    return int(self._hf.bos_token_id)

  @property
  def eos_id(self) -> int:
    return int(self._hf.eos_token_id)

  @property
  def pad_id(self) -> int:
    pad = self._hf.pad_token_id
    return self.eos_id if pad is None else int(pad)

  @property
  def vocab_size(self) -> int:
    return len(self._hf)

  @property
  def hf_tokenizer(self):
    """The underlying `transformers.CLIPTokenizer`."""
    return self._hf

  def __call__(
    self, texts: Sequence[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch into (input_ids, attention_mask), both int32 [N, context_length]."""
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if context_length < 2:
      raise ValueError(f"context_length={context_length}: need room for BOS and EOS (>= 2).")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts must be strings; got {sorted(set(bad))}. Decode bytes first.")
    if not texts:
      empty = np.zeros((0, context_length), np.int32)
      return empty, empty.copy()
    # One call into the Rust backend for the whole batch; lists -> int32 is cheaper than
    # return_tensors="np" (int64) plus a cast.
    encoded = self._hf(
      texts,
      padding="max_length",
      truncation=True,
      max_length=context_length,
      return_attention_mask=True,
    )
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    attention_mask = np.asarray(encoded["attention_mask"], dtype=np.int32)
    return input_ids, attention_mask

  def decode(self, input_ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id sequence, special tokens and padding dropped."""
    return self._hf.decode(np.asarray(input_ids).tolist(), skip_special_tokens=True)

  def save(self, out_dir: str) -> None:
    """Writes the tokenizer as an HF directory (CLIPTokenizer / CLIPProcessor.from_pretrained).

    Writes tokenizer.json and tokenizer_config.json (transformers 5) plus vocab.json and
    merges.txt, which older transformers' slow CLIPTokenizer and open_clip users read.
    """
    os.makedirs(out_dir, exist_ok=True)
    self._hf.save_pretrained(out_dir)
    self._hf.backend_tokenizer.model.save(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    for key in _LOAD_TIME_CONFIG_KEYS:
      config.pop(key, None)
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
      f.write("\n")

  def __repr__(self) -> str:
    return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """The tokenizer of checkpoint dir `path` if it has one, else the packaged CLIP tokenizer.

  A `path` that is not a local directory (e.g. a hub name, unreachable offline) also falls
  back to the packaged files, which are openai/clip-vit-base-patch32's tokenizer; a warning
  says so, since a checkpoint trained with another vocabulary would get wrong ids.
  """
  if path is not None:
    if os.path.isdir(path) and has_tokenizer_files(path):
      return Tokenizer(path)
    if not os.path.isdir(path):
      logger.warning(
        "%s is not a local directory; using the packaged openai CLIP tokenizer (%s). Pass a "
        "checkpoint directory with tokenizer files to use its own.",
        path,
        ASSETS_DIR,
      )
    else:
      logger.info("%s has no tokenizer files; using the packaged CLIP tokenizer.", path)
  return Tokenizer(ASSETS_DIR)
