"""Teacher and student read ONE batch: check, before training, that they can.

The pipeline tokenizes each caption once and transforms each image once; the trainer feeds
that batch to both models. So the two must agree on the tokenizer (vocabulary, the token the
text tower pools at) and on the image transform (resolution, channels, normalization). This
module turns a mismatch into an error that says which field differs, instead of letting a
student silently learn from inputs its teacher was never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipdistill_jax.data import preprocess
from clipdistill_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SharedInputs:
  """What one batch must look like for both teacher and student."""

  image_size: int
  context_length: int
  vocab_size: int


class IncompatibleInputsError(UserError, ValueError):
  """Teacher and student would need different batches."""


def check_compatible(teacher_config, student_config, *,
                     teacher_preprocessor: Mapping[str, Any] | None = None,
                     student_preprocessor: Mapping[str, Any] | None = None) -> SharedInputs:
  """Checks that teacher and student can consume one batch; returns its shape.

  The pipeline makes ONE batch per step and both models read it: they share the tokenizer
  (vocabulary, end-of-text pooling) and the image transform (size and OpenAI mean/std).
  Configs are CLIPConfig objects or HF config dicts; preprocessors are HF
  preprocessor_config.json dicts, checked when given. The shared context length is the
  shorter of the two text towers' (the other tower then sees truncated captions).
  """
  from clipdistill_jax.models.config import CLIPConfig

  teacher, student = (c if isinstance(c, CLIPConfig) else CLIPConfig.from_dict(dict(c))
                      for c in (teacher_config, student_config))
  problems = []
  tv, sv, tt, st = (teacher.vision_config, student.vision_config, teacher.text_config,
                    student.text_config)
  if tv.image_size != sv.image_size:
    problems.append(f"image_size: teacher {tv.image_size}, student {sv.image_size}")
  if tv.num_channels != sv.num_channels:
    problems.append(f"num_channels: teacher {tv.num_channels}, student {sv.num_channels}")
  if tt.vocab_size != st.vocab_size:
    problems.append(f"vocab_size: teacher {tt.vocab_size}, student {st.vocab_size}")
  # Legacy configs pool at argmax(input_ids), i.e. the highest id, CLIP's end-of-text.
  pool_id = lambda text: text.vocab_size - 1 if text.pools_at_argmax else text.eos_token_id
  if pool_id(tt) != pool_id(st):
    problems.append(f"end-of-text token pooled: teacher {pool_id(tt)}, student {pool_id(st)}")
  for who, prep in (("teacher", teacher_preprocessor), ("student", student_preprocessor)):
    if prep is not None:
      problems += _preprocessor_problems(who, prep, tv.image_size)
  if problems:
    raise IncompatibleInputsError(
        "Teacher and student share one tokenizer and one image transform (the pipeline feeds "
        "both the same batch), but they differ: " + "; ".join(problems) + ". Give the student "
        "the teacher's image_size / vocabulary / normalization (models/student.py derives the "
        "student config from the teacher's).")
  return SharedInputs(image_size=tv.image_size,
                      context_length=min(tt.max_position_embeddings, st.max_position_embeddings),
                      vocab_size=tt.vocab_size)


def _preprocessor_problems(who: str, prep: Mapping[str, Any], image_size: int) -> list[str]:
  problems = []
  expected_stats = (("image_mean", preprocess.OPENAI_MEAN), ("image_std", preprocess.OPENAI_STD))
  for key, expected in expected_stats:
    if key in prep and not np.allclose(prep[key], expected, atol=1e-6):
      problems.append(f"{who} {key} {list(prep[key])} is not the OpenAI {list(expected)} the "
                      "pipeline normalizes with")
  crop = prep.get("crop_size")
  crop = crop.get("height") if isinstance(crop, Mapping) else crop
  if crop is not None and int(crop) != image_size:
    problems.append(f"{who} crop_size {crop} != image_size {image_size}")
  return problems
