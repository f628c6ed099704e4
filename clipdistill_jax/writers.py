"""A clu MetricWriter that appends scalars to a JSON-lines file.

TensorBoard events are for people; metrics.jsonl is for programs (the report's training
curves, tests), which would otherwise need TensorFlow to read the event files back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
  def __init__(self, path: str | os.PathLike):
    self._path = Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}))
      f.write("\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """All rows of a metrics.jsonl; a resumed run's repeated steps keep the latest value."""
  rows: dict[int, dict] = {}
  path = Path(path)
  if not path.exists():
    return []
  for line in path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(row)
  return [rows[s] for s in sorted(rows)]
