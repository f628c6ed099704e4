"""One model on one dataset: zero-shot accuracy (evaluate_zero_shot) and image<->text
retrieval (evaluate_retrieval), from batches to metrics. The evaluators the trainer and the
experiment run by name are in evaluators.py; the building blocks beside this module.

    dataset = load_zero_shot_dataset("cifar10", "test", image_size=224)   # eval/datasets.py
    result = evaluate_zero_shot(model, params, tokenizer, dataset, context_length=77,
                                batch_size=256, mesh=mesh)
    result["top1"], result["predictions"], result["image_embeds"]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from clipdistill_jax.eval.datasets import ZeroShotDataset
from clipdistill_jax.eval.encode import encode_images, encode_token_ids, zero_shot_classifier
from clipdistill_jax.eval.metrics import retrieval_eval, zero_shot_eval
from clipdistill_jax.eval.prompts import get_templates
from clipdistill_jax.models.clip import CLIPModel


def _image_label_batches(dataset: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) batches of a ZeroShotDataset, or of any iterable of dict batches with
  'image' and 'label' (and optionally a bool 'mask' of real rows), such as
  clipdistill_jax.data.pipeline.make_eval_dataset's."""
  if isinstance(dataset, ZeroShotDataset):
    yield from dataset.batches(batch_size)
    return
  for batch in dataset:
    if "label" not in batch:
      raise ValueError(f"Eval batches have keys {sorted(batch)}; zero-shot needs 'label' (a "
                       "labelled dataset).")
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
    keep &= np.asarray(batch["label"]) >= 0  # NO_LABEL rows
    yield np.asarray(batch["image"])[keep], np.asarray(batch["label"], np.int32)[keep]


def evaluate_zero_shot(model: CLIPModel, params: Any, tokenizer, dataset: Any, *,
                       context_length: int, batch_size: int = 256,
                       templates: str | Sequence[str] | None = None, mesh: Mesh | None = None,
                       classifier: np.ndarray | None = None) -> dict[str, Any]:
  """Zero-shot accuracy of one model on one labelled dataset.

  dataset: a ZeroShotDataset (load_zero_shot_dataset) or an iterable of dict batches with
  'image', 'label' (and 'mask'), plus class_names and templates attributes (the pipeline's
  make_eval_dataset). templates: default the dataset's own; pass 'simple_imagenet' or
  'photo' for a cheaper CPU run. classifier: reuse one built earlier (skips the text tower).
  Returns zero_shot_eval's keys (top1, top5, predictions, num_examples) plus labels,
  image_embeds [N, P], classifier [C, P], num_skipped (unreadable images), templates and
  subset (ZeroShotDataset.subset: None, or which part eval.max_examples evaluated).
  """
  templates = get_templates(dataset.templates if templates is None else templates)
  if classifier is None:
    if not getattr(dataset, "class_names", None):
      raise ValueError("The dataset has no class_names; zero-shot needs a labelled dataset "
                       "(or pass classifier=).")
    classifier = zero_shot_classifier(model, params, tokenizer, dataset.class_names, templates,
                                      context_length, batch_size=batch_size, mesh=mesh)
  labels: list[np.ndarray] = []

  def images():
    for batch_images, batch_labels in _image_label_batches(dataset, batch_size):
      labels.append(batch_labels)
      yield batch_images

  image_embeds = encode_images(model, params, images(), batch_size=batch_size, mesh=mesh)
  labels_array = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  result = zero_shot_eval(image_embeds, labels_array, classifier)
  result.update(labels=labels_array, image_embeds=image_embeds, classifier=classifier,
                num_skipped=getattr(dataset, "num_skipped", 0), templates=templates,
                subset=getattr(dataset, "subset", None))
  return result


def evaluate_retrieval(model: CLIPModel, params: Any, batches: Iterable[Mapping[str, Any]], *,
                       batch_size: int = 256, mesh: Mesh | None = None) -> dict[str, Any]:
  """Image<->text retrieval over image-caption batches, COCO style.

  batches: dicts with 'image' [n,S,S,3], 'input_ids' and 'attention_mask' [n,L] (and an
  optional bool 'mask' of real rows), e.g. make_eval_dataset's. Where a batch also carries
  every caption of its images ('text_input_ids' / 'text_attention_mask' [m,L], 'text_image'
  int32 [m]: the row each describes; make_eval_dataset's for data with caption lists), all
  of them are text queries and an image query hits if any of its captions does; otherwise
  each image has the one caption of its row.
  Returns retrieval_eval's keys plus image_embeds, text_embeds and text_to_image.
  """
  images: list[np.ndarray] = []
  tokens: list[tuple[np.ndarray, np.ndarray]] = []
  owners: list[np.ndarray] = []
  num_images = 0
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["image"]), bool)), bool)
    images.append(np.asarray(batch["image"])[keep])
    if "text_image" in batch:
      text_image = np.asarray(batch["text_image"], np.int64)
      kept_text = keep[text_image]
      index_of_row = num_images + np.cumsum(keep) - 1  # row -> index among kept images
      tokens.append((np.asarray(batch["text_input_ids"])[kept_text],
                     np.asarray(batch["text_attention_mask"])[kept_text]))
      owners.append(index_of_row[text_image[kept_text]])
    else:
      tokens.append((np.asarray(batch["input_ids"])[keep],
                     np.asarray(batch["attention_mask"])[keep]))
      owners.append(num_images + np.arange(int(keep.sum())))
    num_images += int(keep.sum())
  image_embeds = encode_images(model, params, images, batch_size=batch_size, mesh=mesh)
  text_embeds = encode_token_ids(model, params, tokens, batch_size=batch_size, mesh=mesh)
  text_to_image = np.concatenate(owners) if owners else np.zeros((0,), np.int64)
  result: dict[str, Any] = dict(retrieval_eval(image_embeds, text_embeds, text_to_image))
  result.update(image_embeds=image_embeds, text_embeds=text_embeds,
                text_to_image=text_to_image)
  return result
