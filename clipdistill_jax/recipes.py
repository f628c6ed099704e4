"""Distillation recipes: named sets of loss weights (and student init) from the literature.

    --config.loss.recipe=clip_kd        (None: loss.weights exactly as the config writes them)

A recipe replaces the loss fields it names and, for the '*_inherit' ones, student.init; the
layer maps (loss.hidden_layers / attention_layers) stay the config's. `apply_recipe` runs
once, before any stage is built (main, the cache writer, the ablation), so every stage of an
experiment sees the same resolved weights; the config written to the workdir is the resolved
one, with loss.recipe naming where it came from.

  article          the seed article's multi-task loss: feature 0.35 + hidden 0.35 at mapped
                   layers + attention 0.2 + logit KL 0.5 at T=3 + contrastive 0.1.
  clip_kd          CLIP-KD (Yang et al., CVPR 2024; winycg/CLIP-KD): FD + ICL + the
                   contrastive loss. FD weight 3.9 = its alpha_fd_loss 2000 at width 512
                   (losses.fd_loss), ICL weight 1 with a learnable scale from 1/0.07.
  affinity         MobileCLIP / TinyCLIP: distillation of the teacher's image-text affinities
                   alone (logit KL both ways at T=1, ground-truth contrastive weight 0), the
                   teacher's logits at its own scale (OpenAI CLIP's is 100, MobileCLIP's
                   choice); loss.teacher_logit_scale tunes it ('affinity:loss.
                   teacher_logit_scale=50').
  affinity_fd      affinity plus FD and ICL: every signal the teacher's embeddings give, and
                   no ground-truth term.
  fd_icl           FD and ICL alone: CLIP-KD's two strongest terms as pure distillation.
  *_inherit        the same, with the student's weights cut from the teacher's
                   (student.init='inherit', TinyCLIP's weight inheritance; CLIP-KD's
                   maintainer: inherit from the teacher, not from an unrelated CLIP).
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

_NO_WEIGHTS = dict(feature=0.0, fd=0.0, icl=0.0, hidden=0.0, logit_kl=0.0, attention=0.0,
                   contrastive=0.0)
CLIP_KD_FD_WEIGHT = 2000.0 / 512  # CLIP-KD's alpha_fd_loss on mean-over-dims MSE at width 512

_BASE_RECIPES: dict[str, dict[str, Any]] = {
    "article": {
        "loss.weights": dict(_NO_WEIGHTS, feature=0.35, hidden=0.35, logit_kl=0.5,
                             attention=0.2, contrastive=0.1),
        "loss.temperature": 3.0, "loss.teacher_logit_scale": None,
    },
    "clip_kd": {
        "loss.weights": dict(_NO_WEIGHTS, fd=CLIP_KD_FD_WEIGHT, icl=1.0, contrastive=1.0),
        "loss.temperature": 1.0, "loss.teacher_logit_scale": None,
    },
    "affinity": {
        "loss.weights": dict(_NO_WEIGHTS, logit_kl=1.0),
        "loss.temperature": 1.0, "loss.teacher_logit_scale": None,
    },
    "affinity_fd": {
        "loss.weights": dict(_NO_WEIGHTS, logit_kl=1.0, fd=CLIP_KD_FD_WEIGHT, icl=1.0),
        "loss.temperature": 1.0, "loss.teacher_logit_scale": None,
    },
    "fd_icl": {
        "loss.weights": dict(_NO_WEIGHTS, fd=CLIP_KD_FD_WEIGHT, icl=1.0),
        "loss.temperature": 1.0, "loss.teacher_logit_scale": None,
    },
}

RECIPES: dict[str, dict[str, Any]] = {
    **{name: {**r, "student.init": "random"} for name, r in _BASE_RECIPES.items()},
    **{f"{name}_inherit": {**r, "student.init": "inherit"} for name, r in _BASE_RECIPES.items()},
}


def recipe_overrides(name: str) -> Mapping[str, Any]:
  """The dotted config fields recipe `name` sets. Raises ValueError for an unknown name.

  A name may carry its own changes after a colon, for ablations of a recipe's knobs:
  'affinity:loss.teacher_logit_scale=50' or 'clip_kd:loss.weights.fd=10,loss.weights.icl=2'
  (values are Python literals; 'None' for None).
  """
  base, _, extra = name.partition(":")
  if base not in RECIPES:
    raise ValueError(f"loss.recipe={name!r} is not a recipe; choose one of "
                     f"{', '.join(sorted(RECIPES))}, or None to use loss.weights as written.")
  overrides = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in RECIPES[base].items()}
  for change in filter(None, extra.split(",")):
    dotted, equals, text = change.partition("=")
    if not equals or not dotted.strip():
      raise ValueError(f"loss.recipe={name!r}: write changes as 'recipe:field=value,...'.")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    dotted = dotted.strip()
    if dotted.startswith("loss.weights."):  # one weight of the recipe's weight set
      overrides["loss.weights"][dotted.rsplit(".", 1)[1]] = value
    else:
      overrides[dotted] = value
  return overrides


def set_dotted(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """config.a.b = value for dotted 'a.b' (a dict value replaces the whole sub-config)."""
  node = config
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  if isinstance(value, Mapping):
    node[leaf] = ml_collections.ConfigDict(dict(value))
  else:
    node[leaf] = value


def apply_recipe(config: ml_collections.ConfigDict, recipe: str | None = None
                 ) -> ml_collections.ConfigDict:
  """A copy of `config` with the recipe's fields set (`recipe`, else config.loss.recipe).

  No recipe: the config unchanged (copied). The copy's loss.recipe names the recipe applied.
  """
  name = recipe if recipe is not None else config.loss.get("recipe")
  out = copy.deepcopy(config)
  if not name:
    return out
  with out.unlocked():
    for dotted, value in recipe_overrides(name).items():
      set_dotted(out, dotted, value)
    out.loss.recipe = name
  return out
