"""The results report: every file written and non-empty, table contents, value formatting."""

import csv
import json

import numpy as np
import PIL.Image
import pytest

from clipdistill_jax.report import curves_from_metrics, format_table, write_report

ROWS = [
    {"model": "Teacher", "params_m": 151.277313, "size_mb_fp32": 605.109252,
     "zero_shot_top1": 0.6321, "zero_shot_top5": np.float32(0.9), "retrieval_i2t_r1": 0.5,
     "retrieval_t2i_r1": 0.3, "latency_ms_b1": 45.24, "throughput_b32": 120.4,
     "peak_memory_mb": 700.26, "zero_shot_dataset": "cifar10", "device": "cpu:cpu",
     "text_latency_ms_b1": 12.5, "params_total": 151277313},
    {"model": "Student-Distilled", "params_m": 60.248193, "size_mb_fp32": 240.99,
     "zero_shot_top1": 0.41, "zero_shot_top5": 0.8, "teacher_agreement": 0.615,
     "embedding_cosine": 0.8312, "latency_ms_b1": 21.8, "throughput_b32": 300.0,
     "peak_memory_mb": 330.5, "zero_shot_dataset": "cifar10", "device": "cpu:cpu"},
    {"model": "Student-NoTeacher", "params_m": 60.248193, "size_mb_fp32": 240.99,
     "zero_shot_top1": 0.12, "zero_shot_top5": float("nan"), "teacher_agreement": 0.1,
     "latency_ms_b1": None, "throughput_b32": 290.0, "peak_memory_mb": 330.1},
]
STEPS = range(0, 200, 20)
CURVES = {
    "Student-Distilled": {"total": [(s, 3.0 / (1 + s)) for s in STEPS],
                          "feature": [(s, 1.0 - s / 400) for s in STEPS],
                          "kl": [(s, float(np.exp(-s / 50))) for s in STEPS]},
    "Student-NoTeacher": {"total": [(s, 4.0 - s / 100) for s in STEPS],
                          "contrastive": [(s, 4.0 - s / 100) for s in STEPS]},
}


def _table_rows(markdown: str) -> dict[str, list[str]]:
  """First table of a Markdown text: model name -> its cells."""
  lines = [line for line in markdown.splitlines() if line.startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[2:]:
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    if len(cells) != len(header):
      break  # the details table starts here
    rows[cells[0]] = cells
  return {"header": header, **rows}


def test_format_table_contents():
  table = _table_rows(format_table(ROWS))
  header = table["header"]
  assert header[:3] == ["Model", "Params (M)", "Size fp32 (MB)"]
  assert "Zero-shot top-1 (%)" in header and "Peak memory (MB)" in header
  assert "Size bf16 (MB)" not in header  # no row has it
  col = header.index
  teacher, distilled, scratch = (table[name] for name in
                                 ("Teacher", "Student-Distilled", "Student-NoTeacher"))
  assert teacher[col("Params (M)")] == "151.3"
  assert teacher[col("Zero-shot top-1 (%)")] == "63.2"
  assert teacher[col("Zero-shot top-5 (%)")] == "90.0"
  assert teacher[col("Teacher agreement (%)")] == "-"
  assert distilled[col("Teacher agreement (%)")] == "61.5"
  assert distilled[col("Cosine to teacher")] == "0.831"
  assert scratch[col("Zero-shot top-5 (%)")] == "-"       # NaN
  assert scratch[col("Latency b=1 (ms)")] == "-"          # None
  assert scratch[col("I→T R@1 (%)")] == "-"               # absent
  assert scratch[col("Throughput b=32 (img/s)")] == "290.0"


def test_format_table_rejects_percentages_for_rates():
  with pytest.raises(ValueError, match="fraction"):
    format_table([{"model": "Teacher", "zero_shot_top1": 63.2}])
  with pytest.raises(ValueError, match="model"):
    format_table([{"params_m": 1.0}])


def test_write_report_files(tmp_path):
  paths = write_report(ROWS, CURVES, tmp_path / "report")
  assert set(paths) == {"markdown", "json", "csv", "comparison", "training_curves"}
  for path in paths.values():
    assert path.is_file() and path.stat().st_size > 0, path

  markdown = paths["markdown"].read_text(encoding="utf-8")
  assert "| Teacher | 151.3 | 605.1 | 63.2 |" in markdown
  assert "![Comparison](comparison.png)" in markdown
  assert "| text_latency_ms_b1 | 12.5 | - | - |" in markdown  # details table
  assert "| params_total | 151,277,313 | - | - |" in markdown
  assert "Device: cpu:cpu." in markdown

  results = json.loads(paths["json"].read_text(encoding="utf-8"))
  assert [row["model"] for row in results["rows"]] == [row["model"] for row in ROWS]
  assert results["rows"][0]["zero_shot_top5"] == pytest.approx(0.9)  # numpy scalar, raw value
  assert results["rows"][2]["zero_shot_top5"] is None                 # NaN -> null
  assert results["curves"]["Student-Distilled"]["kl"][0] == [0, 1.0]

  with open(paths["csv"], newline="", encoding="utf-8") as f:
    records = list(csv.DictReader(f))
  assert [r["model"] for r in records] == ["Teacher", "Student-Distilled", "Student-NoTeacher"]
  assert float(records[0]["zero_shot_top1"]) == pytest.approx(0.6321)
  assert records[2]["latency_ms_b1"] == "" and records[2]["zero_shot_top5"] == ""
  assert records[0]["text_latency_ms_b1"] == "12.5"

  for key, min_size in (("comparison", (1000, 700)), ("training_curves", (800, 400))):
    with PIL.Image.open(paths[key]) as image:
      assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
      pixels = np.asarray(image.convert("L"), np.float32)
      assert pixels.std() > 10  # something was drawn, not a blank canvas


def test_write_report_without_curves_or_optional_columns(tmp_path):
  rows = [{"model": "Teacher", "params_m": 1.5}, {"model": "Student", "params_m": 0.5}]
  paths = write_report(rows, {}, tmp_path)
  assert paths["training_curves"].stat().st_size > 0
  markdown = paths["markdown"].read_text(encoding="utf-8")
  assert "| Student | 0.5 |" in markdown
  with pytest.raises(ValueError, match="No result rows"):
    write_report([], {}, tmp_path)


def test_curves_from_metrics_rows():
  rows = [{"step": 10, "loss/total": 2.0, "loss/kl": 1.5, "lr": 1e-3},
          {"step": 0, "loss/total": 3.0, "eval/top1": 0.1},
          {"step": 20, "loss/total": float("nan")}]
  assert curves_from_metrics(rows) == {"total": [(0, 3.0), (10, 2.0)], "kl": [(10, 1.5)]}
  assert curves_from_metrics(rows, prefix="eval/") == {"top1": [(0, 0.1)]}
