"""Host-side batch assembly shared by every source: captions to tokens, corrupt-image
accounting, and finite evaluation batches. numpy only (no TensorFlow)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from clipdistill_jax.errors import UserError

# Label id of examples that have none (caption-only datasets).
NO_LABEL = -1


class TooManyCorruptImagesError(UserError, RuntimeError):
  """So many images failed to decode that the data (or data.image_key) must be wrong."""


@dataclasses.dataclass(frozen=True)
class CorruptLimits:
  """When dropped images stop being noise and become an error."""

  max_fraction: float = 0.5
  check_after: int = 200
  max_consecutive: int = 1000

  def exceeded(self, num_read: int, num_skipped: int, consecutive: int) -> bool:
    return ((num_read >= self.check_after and num_skipped > self.max_fraction * num_read)
            or consecutive >= self.max_consecutive)

  def message(self, num_read: int, num_skipped: int, where: str) -> str:
    return (
        f"{num_skipped} of {num_read} images read from {where} could not be read or decoded "
        "(or had no non-empty caption) "
        f"(limits: more than {self.max_fraction:.0%} after {self.check_after} images, or "
        f"{self.max_consecutive} in a row). The files are probably not images, or the image "
        "feature/column is the wrong one: check data.image_key and data.path / data.name. "
        "If this much corruption is expected, raise data.max_corrupt_fraction.")


CaptionFn = Callable[[dict[str, np.ndarray]], list[str]]


def _text(caption) -> str:
  return caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)


def caption_lists(values) -> np.ndarray:
  """object [n] of tuples: each row's captions, from a numpy ragged batch (an object array
  of arrays, or a 2-D array when every row has as many)."""
  values = np.asarray(values, dtype=object)
  out = np.empty(len(values), dtype=object)
  for i, row in enumerate(values):
    out[i] = tuple(np.asarray(row, dtype=object).reshape(-1).tolist())
  return out


def caption_fn(class_names: Sequence[str] | None, templates: Sequence[str]) -> CaptionFn:
  """Captions of a numpy batch: its 'caption' strings (bytes or str), or for label data
  templates[template_index] filled with class_names[label]."""

  def captions(batch: dict[str, np.ndarray]) -> list[str]:
    if "caption" in batch:
      return [_text(c) for c in batch["caption"].tolist()]
    if class_names is None:
      raise ValueError("A batch without captions needs class names to build them from labels.")
    return [templates[t].format(class_names[label])
            for t, label in zip(batch["template_index"].tolist(), batch["label"].tolist(),
                                strict=True)]

  return captions


class EvalDataset:
  """A finite evaluation split of this host's share, re-iterable, in a fixed order.

  Each batch: image float32 [n,S,S,3], input_ids / attention_mask int32 [n,L], label int32
  [n] (NO_LABEL where the data has none) and mask bool [n]. input_ids hold one caption per
  image (the first). Data with captions of its own (tfds caption datasets, manifests,
  TFRecords) also carries every caption of every image, for retrieval: text_input_ids /
  text_attention_mask int32 [m,L] and text_image int32 [m], the batch row each describes
  (m varies from batch to batch; padding rows have none). Batches hold `batch_size`
  examples except the last, which keeps the remainder: smaller, or (pad_remainder=True)
  padded to batch_size with mask=False rows, for evaluators that need one static shape.
  Unreadable images are dropped with their captions and counted (num_read / num_skipped,
  current after an iteration). For label datasets, class_names and templates build the
  zero-shot prompts; a label dataset's batch captions use templates[0].
  """

  def __init__(self, make_chunks: Callable[[], Iterable[dict[str, np.ndarray]]], *,
               batch_size: int, tokenizer, context_length: int, captions: CaptionFn,
               class_names: Sequence[str] | None, templates: Sequence[str],
               num_examples: int | None, pad_remainder: bool, limits: CorruptLimits,
               where: str):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive.")
    self._make_chunks = make_chunks
    self.batch_size = batch_size
    self._tokenizer = tokenizer
    self._context_length = context_length
    self._captions = captions
    self.class_names = None if class_names is None else list(class_names)
    self.templates = tuple(templates)
    self.num_examples = num_examples
    self.pad_remainder = pad_remainder
    self._limits = limits
    self._where = where
    self.num_read = 0
    self.num_skipped = 0

  @property
  def num_classes(self) -> int | None:
    return None if self.class_names is None else len(self.class_names)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self.num_read = self.num_skipped = 0
    for rows in self._valid_rows():
      yield self._finish(rows)
    if self.num_read and self.num_read == self.num_skipped:
      raise TooManyCorruptImagesError(
          self._limits.message(self.num_read, self.num_skipped, self._where))

  def metrics(self) -> dict[str, float]:
    return {"data/num_read": float(self.num_read), "data/num_skipped": float(self.num_skipped)}

  def _valid_rows(self) -> Iterator[dict[str, np.ndarray]]:
    """Regroups the decodable rows of the chunks into batch_size groups."""
    pending: dict[str, np.ndarray] | None = None
    consecutive = 0
    for chunk in self._make_chunks():
      ok = np.asarray(chunk.pop("ok"), bool)
      self.num_read += ok.size
      self.num_skipped += int((~ok).sum())
      for good in ok.tolist():
        consecutive = 0 if good else consecutive + 1
        if self._limits.exceeded(self.num_read, self.num_skipped, consecutive):
          raise TooManyCorruptImagesError(
              self._limits.message(self.num_read, self.num_skipped, self._where))
      if "captions" in chunk:
        chunk["captions"] = caption_lists(chunk["captions"])
      rows = {k: np.asarray(v)[ok] for k, v in chunk.items()}
      pending = rows if pending is None else {
          k: np.concatenate([pending[k], rows[k]]) for k in pending}
      while len(pending["image"]) >= self.batch_size:
        yield {k: v[:self.batch_size] for k, v in pending.items()}
        pending = {k: v[self.batch_size:] for k, v in pending.items()}
    if pending is not None and len(pending["image"]):
      yield pending

  def _finish(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(rows["image"])
    input_ids, attention_mask = self._tokenizer(self._captions(rows), self._context_length)
    labels = rows.get("label")
    batch = {
        "image": np.asarray(rows["image"], np.float32),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "label": (np.full([n], NO_LABEL, np.int32) if labels is None
                  else np.asarray(labels, np.int32)),
        "mask": np.ones([n], bool),
    }
    if self.pad_remainder and n < self.batch_size:
      pad = self.batch_size - n
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
      batch["label"][n:] = NO_LABEL
    if "captions" in rows:
      lists = [[_text(c) for c in captions] for captions in rows["captions"]]
      batch["text_input_ids"], batch["text_attention_mask"] = self._tokenizer(
          [c for captions in lists for c in captions], self._context_length)
      batch["text_image"] = np.repeat(np.arange(n, dtype=np.int32),
                                      [len(captions) for captions in lists])
    return batch
