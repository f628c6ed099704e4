"""Layer maps: which student layer is distilled from (or inherited from) which teacher layer.

A tower's layers are numbered 1..L everywhere in this project, the way its hidden states are:
`hidden_states[j]` is the output of layer j (`layers_{j-1}` in the param tree),
`hidden_states[0]` the embeddings (never mapped), `attentions[j-1]` the attention
probabilities inside layer j. A layer map is a tuple of (student_layer, teacher_layer) pairs
in that numbering. losses.py validates the maps it is given; models/student.py uses
`uniform_layer_map` to choose the teacher layers a student inherits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

LayerMap = tuple[tuple[int, int], ...]


def _check_depths(num_student_layers: int, num_teacher_layers: int) -> None:
  if num_student_layers < 1 or num_teacher_layers < 1:
    raise ValueError(f"layer counts must be >= 1, got student={num_student_layers}, "
                     f"teacher={num_teacher_layers}.")


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> LayerMap:
  """Every student layer i maps to teacher layer floor(i * n_t / n_s) (at least 1).

  Evenly spaced, last to last; for a non-integer ratio the first teacher layer is kept
  (8 of 12 -> teacher 1, 3, 4, 6, 7, 9, 10, 12). models/student.py inherits the same layers.
  """
  _check_depths(num_student_layers, num_teacher_layers)
  return tuple((i, max(1, i * num_teacher_layers // num_student_layers))
               for i in range(1, num_student_layers + 1))


def layer_map_from_teacher_layers(teacher_layers: Sequence[int], num_student_layers: int,
                                  num_teacher_layers: int) -> LayerMap:
  """Maps teacher layers j (e.g. the article's [4, 8, 12]) to student layers round(j*n_s/n_t).

  Rounding is half-up and the result at least 1: the student layer at the nearest relative
  depth. With 8 student / 12 teacher layers, [4, 8, 12] -> ((3, 4), (5, 8), (8, 12)).
  """
  _check_depths(num_student_layers, num_teacher_layers)
  pairs = []
  for j in teacher_layers:
    if not 1 <= int(j) <= num_teacher_layers:
      raise ValueError(f"teacher layer {j} is out of range: the teacher has layers "
                       f"1..{num_teacher_layers} (hidden_states[j] is the output of layer j).")
    i = math.floor(Fraction(int(j) * num_student_layers, num_teacher_layers) + Fraction(1, 2))
    pairs.append((max(1, i), int(j)))
  return tuple(pairs)


def validate_layer_map(pairs: Sequence[Sequence[int]], num_student_layers: int,
                       num_teacher_layers: int) -> LayerMap:
  """Checks explicit (student_layer, teacher_layer) pairs and returns them as a tuple."""
  out = []
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"layer map entry {pair!r} is not a (student_layer, teacher_layer) pair.")
    i, j = int(pair[0]), int(pair[1])
    if not 1 <= i <= num_student_layers or not 1 <= j <= num_teacher_layers:
      raise ValueError(f"layer pair ({i}, {j}) is out of range: student layers are "
                       f"1..{num_student_layers}, teacher layers 1..{num_teacher_layers}.")
    out.append((i, j))
  return tuple(out)


def resolve_layer_map(spec, num_student_layers: int, num_teacher_layers: int) -> LayerMap:
  """A config's layer spec -> LayerMap.

  None / 'none' / [] -> no layers; 'uniform' / 'all' -> `uniform_layer_map`; a list of ints
  -> teacher layers (`layer_map_from_teacher_layers`); a list of pairs -> explicit pairs.
  """
  if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
    return ()
  if isinstance(spec, str):
    if spec.lower() in ("uniform", "all"):
      return uniform_layer_map(num_student_layers, num_teacher_layers)
    spec = _parse_layer_string(spec)
  spec = list(spec)
  if all(isinstance(x, int) for x in spec):
    return layer_map_from_teacher_layers(spec, num_student_layers, num_teacher_layers)
  return validate_layer_map(spec, num_student_layers, num_teacher_layers)


def _parse_layer_string(spec: str) -> list:
  """Command-line forms: '4,8,12' (teacher layers) or '3:4,5:8,8:12' (student:teacher)."""
  try:
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if all(":" in item for item in items):
      return [tuple(int(x) for x in item.split(":")) for item in items]
    return [int(item) for item in items]
  except ValueError:
    raise ValueError(f"layer spec {spec!r}: use 'uniform'/'all', 'none', teacher layers like "
                     "'4,8,12', or student:teacher pairs like '3:4,5:8,8:12'.") from None
