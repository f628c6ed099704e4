"""What training reuses from one epoch of a finite set to the next, kept in memory: decoded
images (DecodedImageCache, data.decoded_cache_mb) and tokenized captions (TokenCache). Both
return exactly what decoding and tokenizing again would.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np


class DecodedImageCache:
  """A finite training set's decoded images in memory: uint8 [S, S, 3] (clip_pixels, before
  normalization) by example id, up to `max_bytes` (data.decoded_cache_mb), so that every
  epoch after the first decodes only what did not fit. Images that failed to decode are not
  kept (they are read, and counted as skipped, again each epoch). What comes out is bit for
  bit what decoding gives. Safe to share between tf.data's threads."""

  def __init__(self, max_bytes: int):
    self.max_bytes = int(max_bytes)
    self.nbytes = 0
    self.hits = self.misses = 0
    self._pixels: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def get(self, example_id: int) -> np.ndarray | None:
    pixels = self._pixels.get(example_id)
    with self._lock:
      if pixels is None:
        self.misses += 1
      else:
        self.hits += 1
    return pixels

  def put(self, example_id: int, pixels: np.ndarray) -> None:
    with self._lock:
      if example_id not in self._pixels and self.nbytes + pixels.nbytes <= self.max_bytes:
        self._pixels[example_id] = np.array(pixels, copy=True)  # not a view of a larger image
        self.nbytes += pixels.nbytes

  def __len__(self) -> int:
    return len(self._pixels)


# Captions a training iterator keeps tokenized (TokenCache): at 77 tokens about 0.6 KB each.
TOKEN_CACHE_ENTRIES = 2**17


class TokenCache:
  """A tokenizer's (input_ids, attention_mask) rows by caption, for captions seen before:
  epochs over a finite set, and a label dataset's templated captions, tokenize each caption
  once. Keeps up to `max_entries` captions (later new ones are tokenized at every use).
  Returns what `tokenizer(texts, context_length)` returns, row for row: int32 [N, L] twice.
  """

  def __init__(self, tokenizer, context_length: int, max_entries: int = TOKEN_CACHE_ENTRIES):
    self._tokenizer = tokenizer
    self._context_length = context_length
    self.max_entries = max_entries
    self._rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    texts = list(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
    if not texts or len(missing) == len(texts):  # nothing to reuse: one tokenizer call
      input_ids, attention_mask = self._tokenizer(texts, self._context_length)
      self._keep(texts, input_ids, attention_mask)
      return input_ids, attention_mask
    fresh = {}
    if missing:
      input_ids, attention_mask = self._tokenizer(missing, self._context_length)
      fresh = {t: (input_ids[i], attention_mask[i]) for i, t in enumerate(missing)}
      self._keep(missing, input_ids, attention_mask)
    rows = [self._rows.get(t) or fresh[t] for t in texts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def _keep(self, texts: list[str], input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
    for i, text in enumerate(texts):
      if len(self._rows) >= self.max_entries:
        return
      self._rows.setdefault(text, (input_ids[i].copy(), attention_mask[i].copy()))

  def __len__(self) -> int:
    return len(self._rows)
