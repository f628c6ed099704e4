"""The results report: the article's comparison table and 2x2 figure, from measured numbers.

    paths = write_report(rows, curves, workdir / "report")

rows: one dict per model, e.g.
    {"model": "Student-Distilled", "params_m": 60.2, "size_mb_fp32": 241.0,
     "zero_shot_top1": 0.412, "zero_shot_top5": 0.73, "retrieval_i2t_r1": 0.21,
     "retrieval_t2i_r1": 0.18, "teacher_agreement": 0.64, "latency_ms_b1": 21.8,
     "throughput_b32": 410.0, "peak_memory_mb": 330.5, ...}
Rates (zero-shot accuracy, recall, agreement) are fractions in [0, 1], as clipdistill_jax.
evaluate returns them; the table and figure show them as percentages, results.json/.csv keep
the raw values. Missing values show as '-'. Keys the table does not know go to a details
table (and to the JSON/CSV).

curves: {run name: {loss component: [(step, value), ...]}}, plotted one subplot per component;
curves_from_metrics(read_jsonl(workdir / "metrics.jsonl")) gives one run's.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (key, header, format). Format '%' shows a fraction as a percentage.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "Model", "s"),
    ("params_m", "Params (M)", ".1f"),
    ("size_mb_fp32", "Size fp32 (MB)", ".1f"),
    ("size_mb_bf16", "Size bf16 (MB)", ".1f"),
    ("zero_shot_top1", "Zero-shot top-1 (%)", "%"),
    ("zero_shot_top5", "Zero-shot top-5 (%)", "%"),
    ("retrieval_i2t_r1", "I→T R@1 (%)", "%"),
    ("retrieval_i2t_r5", "I→T R@5 (%)", "%"),
    ("retrieval_t2i_r1", "T→I R@1 (%)", "%"),
    ("retrieval_t2i_r5", "T→I R@5 (%)", "%"),
    ("teacher_agreement", "Teacher agreement (%)", "%"),
    ("embedding_cosine", "Cosine to teacher", ".3f"),
    ("latency_ms_b1", "Latency b=1 (ms)", ".1f"),
    ("throughput_b32", "Throughput b=32 (img/s)", ".1f"),
    ("peak_memory_mb", "Peak memory (MB)", ".1f"),
)
# Row keys that are captions, not measurements: the report states each distinct value once
# under its title instead of putting it in a table.
NOTE_KEYS: tuple[str, ...] = ("zero_shot_subset",)
RATE_KEYS = frozenset(key for key, _, fmt in COLUMNS if fmt == "%")
MISSING = "-"

# The article's 2x2 figure: (key, panel title, y label).
COMPARISON_PANELS: tuple[tuple[str, str, str], ...] = (
    ("params_m", "Parameters", "Parameters (millions)"),
    ("zero_shot_top1", "Zero-shot top-1 accuracy", "Accuracy (%)"),
    ("latency_ms_b1", "Image encoding latency (batch 1)", "Latency (ms)"),
    ("peak_memory_mb", "Peak inference memory", "Memory (MB)"),
)


# --- values ---------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
  return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def _plain(value: Any) -> Any:
  """JSON-safe Python value: numpy scalars/arrays unwrapped, NaN/inf -> None."""
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  return value


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
  for i, row in enumerate(rows):
    if "model" not in row:
      raise ValueError(f"Row {i} has no 'model' name: {sorted(row)}.")
    for key in RATE_KEYS & set(row):
      value = row[key]
      if not _is_missing(value) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{row['model']}: {key}={value} is not a fraction in [0, 1]; pass rates "
                         "as fractions (the report shows them as percentages).")


def _format(value: Any, fmt: str) -> str:
  if _is_missing(value):
    return MISSING
  if fmt == "%":
    return f"{100 * float(value):.1f}"
  if fmt == "s" or isinstance(value, str | bool):
    return str(value)
  if isinstance(value, int | np.integer):
    return f"{int(value):,}"
  if isinstance(value, float | np.floating):
    return format(float(value), fmt or ".4g")
  if isinstance(value, np.ndarray | list | tuple) and len(value) > 8:
    return f"[{len(value)} values]"
  return str(value)


def _present_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
  return [col for col in COLUMNS
          if col[0] == "model" or any(not _is_missing(row.get(col[0])) for row in rows)]


def _extra_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  known = {key for key, _, _ in COLUMNS} | set(NOTE_KEYS)
  extra: list[str] = []
  for row in rows:
    extra += [key for key in row if key not in known and key not in extra]
  return extra


# --- tables ---------------------------------------------------------------------------------


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
  align = [":---"] * left + ["---:"] * (len(header) - left)
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
  lines += ["| " + " | ".join(cells) + " |" for cells in body]
  return "\n".join(lines)


def format_table(rows: Sequence[Mapping[str, Any]], details: bool = False) -> str:
  """The comparison table as Markdown (rates as percentages, missing values as '-').

  details: also a second table (one column per model) with the keys the main table lacks.
  """
  _check_rows(rows)
  columns = _present_columns(rows)
  table = _markdown([header for _, header, _ in columns],
                    [[_format(row.get(key), fmt) for key, _, fmt in columns] for row in rows])
  extra = _extra_keys(rows)
  if details and extra:
    body = [[key] + [_format(row.get(key), "") for row in rows] for key in extra]
    table += "\n\n" + _markdown(["Measurement"] + [str(row["model"]) for row in rows], body)
  return table


def curves_from_metrics(metric_rows: Sequence[Mapping[str, Any]], prefix: str = "loss/"
                        ) -> dict[str, list[tuple[int, float]]]:
  """{component: [(step, value), ...]} from metrics.jsonl rows (writers.read_jsonl):
  every key starting with `prefix`, prefix stripped ('loss/feature' -> 'feature').
  Components that are 0 at every step (switched off in that run, e.g. the no-teacher
  student's distillation terms) are left out rather than drawn as a flat line."""
  curves: dict[str, list[tuple[int, float]]] = {}
  for row in metric_rows:
    for key, value in row.items():
      if key.startswith(prefix) and not _is_missing(value):
        curves.setdefault(key[len(prefix):], []).append((int(row["step"]), float(value)))
  return {name: sorted(points) for name, points in curves.items()
          if any(value != 0.0 for _, value in points)}


# --- figures --------------------------------------------------------------------------------


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  return plt


def _colours(names: Sequence[str]) -> dict[str, Any]:
  plt = _pyplot()
  palette = plt.get_cmap("tab10").colors
  return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                    colours: Mapping[str, Any] | None = None) -> Path:
  """The article's 2x2 bar chart: params, zero-shot accuracy, latency, memory."""
  plt = _pyplot()
  names = [str(row["model"]) for row in rows]
  colours = colours or _colours(names)
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  dataset = {row.get("zero_shot_dataset") for row in rows} - {None}
  for ax, (key, title, ylabel) in zip(axes.flat, COMPARISON_PANELS, strict=True):
    scale = 100.0 if key in RATE_KEYS else 1.0
    values = [None if _is_missing(row.get(key)) else scale * float(row[key]) for row in rows]
    heights = [0.0 if v is None else v for v in values]
    bars = ax.bar(range(len(names)), heights, color=[colours[n] for n in names],
                  edgecolor="black", linewidth=0.6)
    top = max(heights, default=0.0) or 1.0
    for bar, value in zip(bars, values, strict=True):
      label = "n/a" if value is None else f"{value:,.1f}"
      ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                  fontsize=10, fontweight="bold")
    if key == "zero_shot_top1" and len(dataset) == 1:
      title = f"{title} ({dataset.pop()})"
    ax.set_title(title, fontsize=12)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.18)
    ax.set_xticks(range(len(names)), names, rotation=10 if len(names) > 2 else 0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
  fig.suptitle("Teacher vs. student: size, accuracy, speed, memory (measured)", fontsize=14)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)


def plot_training_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
                         path: str | os.PathLike,
                         colours: Mapping[str, Any] | None = None) -> Path:
  """One subplot per loss component, one line per run (x: step)."""
  plt = _pyplot()
  runs = list(curves)
  colours = {**_colours(runs), **(colours or {})}
  components: list[str] = []
  for run in runs:
    components += [c for c in curves[run] if c not in components and len(curves[run][c])]
  if not components:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, "No training curves recorded", ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
  ncols = min(3, len(components))
  nrows = -(-len(components) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
  for ax, component in zip(axes.flat, components, strict=False):
    values_seen = []
    for run in runs:
      points = [(s, v) for s, v in curves[run].get(component, ()) if not _is_missing(v)]
      if not points:
        continue
      steps, values = zip(*points, strict=True)
      ax.plot(steps, values, label=run, color=colours[run], linewidth=1.6)
      values_seen += values
    positive = [v for v in values_seen if v > 0]
    if positive and len(positive) == len(values_seen) and max(positive) / min(positive) > 50:
      ax.set_yscale("log")  # losses spanning decades read better on a log axis
    ax.set_title(component, fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(components):]:
    ax.set_axis_off()
  fig.suptitle("Training curves", fontsize=13)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)


# --- files ----------------------------------------------------------------------------------


def write_report(rows: Sequence[Mapping[str, Any]],
                 curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
                 out_dir: str | os.PathLike) -> dict[str, Path]:
  """Writes results.md, results.json, results.csv, comparison.png, training_curves.png.

  Returns their paths under keys markdown, json, csv, comparison, training_curves.
  """
  if not rows:
    raise ValueError("No result rows to report; evaluate at least one model first.")
  _check_rows(rows)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / "results.md", "json": out / "results.json",
           "csv": out / "results.csv", "comparison": out / "comparison.png",
           "training_curves": out / "training_curves.png"}

  devices = sorted({str(row["device"]) for row in rows if row.get("device")})
  notes = ["Rates are percentages. Latency and throughput: image tower, median wall time.",
           "Every number was measured by clipdistill_jax.eval; '-' = not measured."]
  if devices:
    notes.append(f"Device: {', '.join(devices)}.")
  for key in NOTE_KEYS:
    subsets = dict.fromkeys(str(row[key]) for row in rows if row.get(key))
    notes += [f"Zero-shot evaluated on {subset}." for subset in subsets]
  markdown = ["# Results", "", *notes, "", format_table(rows, details=True), "",
              "![Comparison](comparison.png)", "", "![Training curves](training_curves.png)", ""]
  paths["markdown"].write_text("\n".join(markdown), encoding="utf-8")

  plain_curves = {run: {c: [[int(s), _plain(float(v))] for s, v in points]
                        for c, points in components.items()}
                  for run, components in curves.items()}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump({"rows": [_plain(dict(row)) for row in rows], "curves": plain_curves}, f,
              indent=2, ensure_ascii=False)
    f.write("\n")

  keys = [key for key, _, _ in _present_columns(rows)] + _extra_keys(rows)
  with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(keys)
    for row in rows:
      writer.writerow(["" if _is_missing(row.get(key)) else _plain(row.get(key)) for key in keys])

  names = [str(row["model"]) for row in rows]
  colours = _colours(names + [run for run in curves if run not in names])
  plot_comparison(rows, paths["comparison"], colours)
  plot_training_curves(curves, paths["training_curves"], colours)
  return paths
