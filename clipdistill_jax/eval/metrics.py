"""Metrics on precomputed embeddings (numpy, host side): zero-shot accuracy, retrieval recall,
teacher agreement, embedding cosine.

Rates are fractions in [0, 1]. Ties count against the model: a candidate scoring exactly as
high as the correct one ranks above it, so a collapsed model (all embeddings equal) scores 0,
not 100%.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clipdistill_jax.models.clip import l2_normalize

# Rows of the similarity matrix computed at once; bounds memory at CHUNK x num_candidates.
_CHUNK = 1024


def _as_2d(x: Any, what: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{what} must be [N, dim]; got shape {x.shape}.")
  return x


def zero_shot_eval(image_embeds: np.ndarray, labels: np.ndarray, classifier: np.ndarray,
                   logit_scale: float = 100.0, *, return_logits: bool = False
                   ) -> dict[str, Any]:
  """Zero-shot classification of image embeddings [N, P] by a classifier [C, P].

  Returns top1 and top5 (fractions; top5 is top-min(5, C)), predictions int64 [N] (argmax of
  the logits) and num_examples; with return_logits, also logits float32 [N, C] =
  logit_scale * cosine (the scale changes no metric; it makes softmax probabilities CLIP's).
  """
  image_embeds = l2_normalize(_as_2d(image_embeds, "image_embeds"))
  classifier = l2_normalize(_as_2d(classifier, "classifier"))
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if len(labels) != len(image_embeds):
    raise ValueError(f"{len(labels)} labels for {len(image_embeds)} image embeddings.")
  if image_embeds.shape[1] != classifier.shape[1]:
    raise ValueError(f"image_embeds have dim {image_embeds.shape[1]} but the classifier has "
                     f"{classifier.shape[1]}: build the classifier with the same model.")
  num_classes = len(classifier)
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}); got [{labels.min()}, "
                     f"{labels.max()}].")
  rank = np.empty(len(labels), np.int64)
  predictions = np.empty(len(labels), np.int64)
  all_logits = []
  for start in range(0, len(labels), _CHUNK):
    logits = float(logit_scale) * image_embeds[start:start + _CHUNK] @ classifier.T
    chunk_labels = labels[start:start + _CHUNK]
    correct = logits[np.arange(len(logits)), chunk_labels][:, None]
    # Classes scoring at least as high as the right one, minus the right one itself.
    rank[start:start + _CHUNK] = (logits >= correct).sum(axis=1) - 1
    predictions[start:start + _CHUNK] = logits.argmax(axis=1)
    if return_logits:
      all_logits.append(logits)
  empty = len(labels) == 0
  result = {
      "top1": float("nan") if empty else float(np.mean(rank < 1)),
      "top5": float("nan") if empty else float(np.mean(rank < min(5, num_classes))),
      "predictions": predictions,
      "num_examples": int(len(labels)),
  }
  if return_logits:
    result["logits"] = (np.concatenate(all_logits) if all_logits
                        else np.zeros((0, num_classes), np.float32))
  return result


def retrieval_eval(image_embeds: np.ndarray, text_embeds: np.ndarray,
                   text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                   ) -> dict[str, float | int]:
  """Image->text and text->image recall@k, COCO style (several captions per image).

  text_to_image[j] is the index of the image caption j describes. A text query has exactly one
  correct image; an image query is a hit at k if ANY of its captions is in its top k texts.
  Images without captions are not used as queries. Returns i2t_r{k}, t2i_r{k} (fractions),
  mean_recall (their mean, as CLIP benchmarks report), num_image_queries, num_text_queries.
  """
  image_embeds = l2_normalize(_as_2d(image_embeds, "image_embeds"))
  text_embeds = l2_normalize(_as_2d(text_embeds, "text_embeds"))
  text_to_image = np.asarray(text_to_image).astype(np.int64).reshape(-1)
  num_images, num_texts = len(image_embeds), len(text_embeds)
  if len(text_to_image) != num_texts:
    raise ValueError(f"text_to_image has {len(text_to_image)} entries for {num_texts} texts; "
                     "give the image index of every caption.")
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f"text_to_image must index the {num_images} images; got values in "
                     f"[{text_to_image.min()}, {text_to_image.max()}].")

  # text -> image: wrong images scoring >= the correct one.
  t2i_rank = np.empty(num_texts, np.int64)
  for start in range(0, num_texts, _CHUNK):
    sims = text_embeds[start:start + _CHUNK] @ image_embeds.T
    rows = np.arange(len(sims))
    correct = sims[rows, text_to_image[start:start + _CHUNK]][:, None]
    t2i_rank[start:start + _CHUNK] = (sims >= correct).sum(axis=1) - 1

  # image -> text: wrong texts scoring >= the image's best-scoring correct caption.
  has_caption = np.bincount(text_to_image, minlength=num_images) > 0
  queries = np.flatnonzero(has_caption)
  i2t_rank = np.empty(len(queries), np.int64)
  for start in range(0, len(queries), _CHUNK):
    images = queries[start:start + _CHUNK]
    sims = image_embeds[images] @ text_embeds.T
    is_caption = text_to_image[None, :] == images[:, None]
    best_correct = np.where(is_caption, sims, -np.inf).max(axis=1, keepdims=True)
    i2t_rank[start:start + _CHUNK] = ((sims >= best_correct) & ~is_caption).sum(axis=1)

  result: dict[str, float | int] = {}
  for k in ks:
    result[f"i2t_r{k}"] = float(np.mean(i2t_rank < k)) if len(queries) else float("nan")
    result[f"t2i_r{k}"] = float(np.mean(t2i_rank < k)) if num_texts else float("nan")
  result["mean_recall"] = float(np.mean([result[f"{d}_r{k}"] for d in ("i2t", "t2i")
                                         for k in ks]))
  result["num_image_queries"] = int(len(queries))
  result["num_text_queries"] = int(num_texts)
  return result


def teacher_agreement(student_predictions: np.ndarray, teacher_predictions: np.ndarray) -> float:
  """Fraction of examples where the student's top-1 class equals the teacher's."""
  student = np.asarray(student_predictions).reshape(-1)
  teacher = np.asarray(teacher_predictions).reshape(-1)
  if student.shape != teacher.shape:
    raise ValueError(f"{len(student)} student predictions vs {len(teacher)} teacher "
                     "predictions: evaluate both on the same examples in the same order.")
  if not len(student):
    return float("nan")
  return float(np.mean(student == teacher))


def _projector_kernel(projector: Any) -> np.ndarray:
  """An array [P_s, P_t], or flax Dense params {'kernel': ..., optionally 'bias': ...}."""
  if isinstance(projector, Mapping):
    if "kernel" not in projector:
      raise ValueError(f"projector params have keys {sorted(projector)}; pass the Dense layer's "
                       "params (with 'kernel') or the kernel array [P_s, P_t].")
    return np.asarray(projector["kernel"], np.float32)
  return np.asarray(projector, np.float32)


def embedding_cosine(student_embeds: np.ndarray, teacher_embeds: np.ndarray,
                     projector: Any = None) -> float:
  """Mean cosine between paired student and teacher embeddings [N, P_s] / [N, P_t].

  When P_s != P_t the student's embeddings are first mapped by `projector` (the trained
  student->teacher linear map: a kernel [P_s, P_t] or flax Dense params), as the feature loss
  compared them during training.
  """
  student = _as_2d(student_embeds, "student_embeds")
  teacher = _as_2d(teacher_embeds, "teacher_embeds")
  if len(student) != len(teacher):
    raise ValueError(f"{len(student)} student vs {len(teacher)} teacher embeddings: pass the "
                     "same examples in the same order.")
  if projector is not None:
    kernel = _projector_kernel(projector)
    if kernel.shape != (student.shape[1], teacher.shape[1]):
      raise ValueError(f"projector kernel has shape {kernel.shape}; expected "
                       f"({student.shape[1]}, {teacher.shape[1]}) (student dim, teacher dim).")
    student = student @ kernel
    if isinstance(projector, Mapping) and projector.get("bias") is not None:
      student = student + np.asarray(projector["bias"], np.float32)
  elif student.shape[1] != teacher.shape[1]:
    raise ValueError(f"Student embeddings have dim {student.shape[1]} and the teacher's "
                     f"{teacher.shape[1]}; pass projector= (the trained student->teacher "
                     "embedding projector, e.g. projector_params['image_embeds']).")
  if not len(student):
    return float("nan")
  cosine = np.sum(l2_normalize(student) * l2_normalize(teacher), axis=1)
  return float(np.mean(cosine))
