"""Batched, jitted image/text encoding for evaluation, optionally data-parallel over a mesh.

Every batch is padded to one fixed size, so each tower compiles once however many examples
there are. With a mesh, the batch dimension is split over the ('data', 'fsdp') axes (the
ones the mesh has) and the padding rows are dropped again after the gather. Single process
only (the batches are host-local numpy arrays); a pod evaluates per host with mesh=None.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipdistill_jax.eval.prompts import fill_templates, get_templates
from clipdistill_jax.models.clip import CLIPModel, l2_normalize
from clipdistill_jax.sharding import BATCH_AXES


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"Mesh axes {mesh.axis_names} include none of {BATCH_AXES}; build the "
                     "evaluation mesh with a 'data' (and/or 'fsdp') axis.")
  return axes


def _data_parallel_size(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.cache
def _encoder(model: CLIPModel, tower: str, mesh: Mesh | None):
  """The jitted tower; cached per (model, tower, mesh) so repeated calls reuse compilations."""
  if tower == "image":
    def encode(params, pixel_values):
      return model.apply({"params": params}, pixel_values,
                         method=CLIPModel.encode_image).image_embeds
  else:
    def encode(params, input_ids, attention_mask):
      return model.apply({"params": params}, input_ids, attention_mask,
                         method=CLIPModel.encode_text).text_embeds
  if mesh is None:
    return jax.jit(encode)
  batch = NamedSharding(mesh, P(_batch_axes(mesh)))
  n_inputs = 1 if tower == "image" else 2
  # Params keep whatever sharding they arrive with (None = leave as is).
  return jax.jit(encode, in_shardings=(None,) + (batch,) * n_inputs, out_shardings=batch)


def _params_on_mesh(params: Any, mesh: Mesh | None) -> Any:
  """Params already on the mesh's devices pass through; others are replicated onto it.

  (A jitted call cannot mix arrays committed to one device with arrays sharded over eight.)
  """
  if mesh is None:
    return params
  mesh_devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == mesh_devices:
      return x
    return jax.device_put(x, replicated)

  return jax.tree_util.tree_map(place, params)


def _rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Re-cuts a stream of arrays into [batch_size, ...] blocks, the last one edge-padded.

  Yields (block, number of real rows). Edge padding (repeating the last real row) keeps the
  padding rows ordinary inputs, with no all-masked text rows.
  """
  pending: list[np.ndarray] = []
  pending_rows = 0
  for batch in batches:
    batch = np.asarray(batch)
    pending.append(batch)
    pending_rows += len(batch)
    while pending_rows >= batch_size:
      block = np.concatenate(pending) if len(pending) > 1 else pending[0]
      yield block[:batch_size], batch_size
      rest = block[batch_size:]
      pending, pending_rows = ([rest] if len(rest) else []), len(rest)
  if pending_rows:
    block = np.concatenate(pending) if len(pending) > 1 else pending[0]
    pad = [(0, batch_size - pending_rows)] + [(0, 0)] * (block.ndim - 1)
    yield np.pad(block, pad, mode="edge"), pending_rows


def _encode_blocks(fn, params: Any, blocks: Iterator[tuple[tuple[np.ndarray, ...], int]],
                   embed_dim: int) -> np.ndarray:
  outputs, in_flight = [], None
  for arrays, real_rows in blocks:
    embeds = fn(params, *arrays)  # dispatched asynchronously ...
    if in_flight is not None:     # ... while the previous batch is fetched to the host
      outputs.append(np.asarray(in_flight[0])[:in_flight[1]])
    in_flight = (embeds, real_rows)
  if in_flight is not None:
    outputs.append(np.asarray(in_flight[0])[:in_flight[1]])
  if not outputs:
    return np.zeros((0, embed_dim), np.float32)
  return np.concatenate(outputs).astype(np.float32)


def _effective_batch_size(batch_size: int, mesh: Mesh | None) -> int:
  if mesh is not None and jax.process_count() > 1:
    raise NotImplementedError(
        "Mesh-sharded evaluation takes host-local numpy batches, which needs a single process. "
        "In a multi-host job evaluate on each host with mesh=None (its local device), or on "
        "process 0 only.")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  return _round_up(batch_size, _data_parallel_size(mesh))


def encode_images(model: CLIPModel, params: Any, images_iter: np.ndarray | Iterable[np.ndarray],
                  *, batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
  """L2-normalized image embeddings float32 [N, projection_dim].

  images_iter: preprocessed NHWC float32 images, either one array [N, H, W, 3] or an iterable
  of such arrays of any lengths (e.g. a dataset's batches); they are re-cut into batches of
  `batch_size` (rounded up to a multiple of the mesh's data-parallel size).
  """
  batch_size = _effective_batch_size(batch_size, mesh)
  if isinstance(images_iter, np.ndarray | jax.Array):
    images_iter = [np.asarray(images_iter)]
  fn = _encoder(model, "image", mesh)
  params = _params_on_mesh(params, mesh)
  # float32 always: a float64 or uint8 batch would compile the tower once more.
  images = (np.asarray(batch, np.float32) for batch in images_iter)
  blocks = (((block,), rows) for block, rows in _rebatch(images, batch_size))
  return _encode_blocks(fn, params, blocks, model.config.projection_dim)


def encode_texts(model: CLIPModel, params: Any, tokenizer, texts: Sequence[str],
                 context_length: int, batch_size: int = 256,
                 mesh: Mesh | None = None) -> np.ndarray:
  """L2-normalized text embeddings float32 [len(texts), projection_dim].

  tokenizer: `tokenizer(texts, context_length) -> (input_ids, attention_mask)` int32 arrays,
  e.g. clipdistill_jax.data.tokenizer.load_tokenizer().
  """
  texts = list(texts)
  step = _effective_batch_size(batch_size, mesh)
  tokens = (tokenizer(texts[start:start + step], context_length)
            for start in range(0, len(texts), step))
  return encode_token_ids(model, params, tokens, batch_size=batch_size, mesh=mesh)


def encode_token_ids(model: CLIPModel, params: Any,
                     token_batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
  """Text embeddings of already tokenized batches: an iterable of (input_ids, attention_mask)
  int32 [n, L] pairs (e.g. the captions of an input pipeline's batches)."""
  batch_size = _effective_batch_size(batch_size, mesh)
  fn = _encoder(model, "text", mesh)
  params = _params_on_mesh(params, mesh)
  # Ids and mask travel as one [n, 2, L] array so that they are re-cut together.
  stacked = (np.stack([np.asarray(ids, np.int32), np.asarray(mask, np.int32)], axis=1)
             for ids, mask in token_batches)
  blocks = (((block[:, 0], block[:, 1]), rows) for block, rows in _rebatch(stacked, batch_size))
  return _encode_blocks(fn, params, blocks, model.config.projection_dim)


def average_template_embeddings(text_embeds: np.ndarray, num_classes: int) -> np.ndarray:
  """[C * T, P] class-major prompt embeddings -> [C, P] classifier, as CLIP builds it:
  normalize each prompt embedding, average over templates, normalize again."""
  text_embeds = np.asarray(text_embeds, np.float32)
  if num_classes < 1 or len(text_embeds) % num_classes:
    raise ValueError(f"{len(text_embeds)} prompt embeddings do not split into {num_classes} "
                     "classes with the same number of templates each.")
  per_class = l2_normalize(text_embeds).reshape(num_classes, -1, text_embeds.shape[-1])
  return l2_normalize(per_class.mean(axis=1))


def zero_shot_classifier(model: CLIPModel, params: Any, tokenizer, class_names: Sequence[str],
                         templates: str | Sequence[str], context_length: int, *,
                         batch_size: int = 256, mesh: Mesh | None = None) -> np.ndarray:
  """Class embeddings float32 [C, projection_dim], averaged over the templates.

  templates: a list of '{}' templates, a template-set name ('openai_imagenet', ...) or a
  dataset name (see prompts.get_templates).
  """
  class_names = list(class_names)
  if not class_names:
    raise ValueError("class_names is empty; a zero-shot classifier needs at least one class.")
  templates = get_templates(templates)
  prompts = fill_templates(class_names, templates)
  text_embeds = encode_texts(model, params, tokenizer, prompts, context_length,
                             batch_size=batch_size, mesh=mesh)
  return average_template_embeddings(text_embeds, len(class_names))
