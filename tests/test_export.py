"""Export of a tiny random student: HF directory, parity, int8, ONNX, benchmark, script."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import tiny_student  # noqa: E402

from clipdistill_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clipdistill_jax.export import benchmark, convert, onnx_export, quantize  # noqa: E402
from clipdistill_jax.export import onnx_runtime as rt  # noqa: E402
from clipdistill_jax.export.torch_export import (  # noqa: E402
  EMBEDDING_TOLERANCE,
  export_student,
  flax_embeddings,
  load_torch_model,
  torch_embeddings,
)
from clipdistill_jax.models.config import CLIPConfig  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """One full export (int8 + ONNX + benchmark) of a legacy-config (eos=2) student."""
  config, params = tiny_student(eos_token_id=2)
  out = tmp_path_factory.mktemp("student")
  report = convert.export_all(config, params, out, quantize="int8", onnx=True,
                              teacher_config=None, batch_sizes=(1, 4), benchmark_threads=1,
                              benchmark_budget_s=0.05)
  print(convert.format_report(report))
  return config, params, out, report


def test_hf_directory_loads_offline_in_transformers(exported):
  config, _, out, report = exported
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "preprocessor_config.json", "vocab.json", "merges.txt"} <= names
  model = transformers.CLIPModel.from_pretrained(out, local_files_only=True)
  assert model.config.text_config.eos_token_id == 2
  assert model.config.projection_dim == config.projection_dim
  processor = transformers.CLIPProcessor.from_pretrained(out, local_files_only=True)
  assert processor.tokenizer.model_max_length == config.text_config.max_position_embeddings
  assert report["pipeline"]["ok"], report["pipeline"]
  assert report["processor"]["input_ids_equal"]
  assert report["processor"]["pixel_values_max_abs_diff"] <= 1e-4


def test_torch_matches_flax_on_photos_and_captions(exported):
  parity = exported[3]["torch_parity"]
  print(f"torch vs flax on {parity['images']} {parity['source']}: image "
        f"{parity['image_embeds_max_abs_diff']:.2e}, text {parity['text_embeds_max_abs_diff']:.2e}")
  assert parity["ok"]
  assert parity["image_embeds_max_abs_diff"] <= EMBEDDING_TOLERANCE
  assert parity["text_embeds_max_abs_diff"] <= EMBEDDING_TOLERANCE


def test_int8_torch_saved_reloaded_and_measured(exported):
  config, _, out, report = exported
  section = report["int8_torch"]
  agreement = section["agreement"]
  print(f"int8 torch: {section['size_mb_fp32']:.2f} -> {section['size_mb_int8']:.2f} MB, "
        f"agreement {agreement}")
  assert section["size_mb_int8"] < section["size_mb_fp32"]
  assert 0 <= agreement["top1_agreement"] <= 1  # random tiny weights: reported, no target
  assert agreement["images"] >= 60 and agreement["classes"] >= 10
  # A broken quantization gives unrelated vectors (cosine ~0); int8 rounding does not.
  assert agreement["image_cosine_mean"] > 0.9 and agreement["text_cosine_mean"] > 0.9

  reloaded = quantize.load_int8(out)
  assert any("quantized" in type(m).__module__ for m in reloaded.modules())
  pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  fresh = quantize.quantize_int8(load_torch_model(out))
  np.testing.assert_allclose(torch_embeddings(reloaded, pixels, None)[0],
                             torch_embeddings(fresh, pixels, None)[0], atol=1e-6)


def test_onnx_files_parity_and_graph(exported):
  _, _, out, report = exported
  onnx = report["onnx"]
  print("onnxruntime vs torch:", onnx["max_abs_diff"])
  assert onnx["ok"], onnx
  assert max(onnx["max_abs_diff"].values()) <= EMBEDDING_TOLERANCE
  assert onnx["runtime_tokenizer_ids_equal"]
  text, vision = onnx["text_graph"], onnx["vision_graph"]
  assert text["opset"] >= 17 and vision["opset"] >= 17
  assert text["inputs"]["input_ids"] == ("INT64", ["batch", "sequence"])
  assert text["argmax_nodes"] >= 1
  assert vision["inputs"]["pixel_values"][1][0] == "batch"
  manifest = rt.read_manifest(out / rt.ONNX_DIR)
  assert manifest["text_pooling"] == "argmax(input_ids)"
  assert set(manifest["files"]) == {"fp32", "int8"}


def test_int8_onnx_smaller_and_agreement_reported(exported):
  section = exported[3]["int8_onnx"]
  agreement = section["agreement"]
  print(f"int8 onnx: {section['size_mb_fp32']:.2f} -> {section['size_mb_int8']:.2f} MB, "
        f"agreement {agreement}")
  assert section["size_mb_int8"] < 0.5 * section["size_mb_fp32"]
  assert 0 <= agreement["top1_agreement"] <= 1
  assert agreement["image_cosine_mean"] > 0.9 and agreement["text_cosine_mean"] > 0.9


def test_benchmark_rows_cover_four_variants(exported):
  report = exported[3]
  variants = [r["variant"] for r in report["benchmark"]]
  assert variants == ["fp32 torch", "int8 torch", "fp32 onnx", "int8 onnx"]
  for row in report["benchmark"]:
    assert row["size_mb"] > 0
    assert all(row[f"{tower}_ms_b{b}"] > 0 for tower in ("image", "text") for b in (1, 4))
  assert report["benchmark_table"].count("| student |") == 4
  stored = json.loads((exported[2] / convert.REPORT_FILE).read_text())
  assert stored["benchmark_table"] == report["benchmark_table"]


def _padded_ids(config: CLIPConfig, lengths: list[int], pad_id: int, eos_id: int):
  rng = np.random.default_rng(len(lengths))
  context = config.text_config.max_position_embeddings
  ids = rng.integers(300, 40000, (len(lengths), context)).astype(np.int64)
  ids[:, 0] = 49406
  mask = np.zeros_like(ids)
  for row, length in enumerate(lengths):  # length counts BOS ... EOS
    ids[row, length - 1] = eos_id
    ids[row, length:] = pad_id
    mask[row, :length] = 1
  return ids, mask


@pytest.mark.parametrize("eos_token_id", [2, 49000])
def test_onnx_text_pooling_with_padded_batches(exported, tmp_path, eos_token_id):
  """Legacy configs pool at argmax(ids), new ones at the first eos_token_id: ONNX must
  follow both, at batch 1 and 5, full context and a shorter dynamic sequence.

  eos 49000 is deliberately not the largest id (BOS 49406 precedes it), so pooling at
  argmax would pick the wrong token and the test would fail.
  """
  if eos_token_id == 2:
    config, params, out, _ = exported
    text_path = out / rt.ONNX_DIR / rt.TEXT_FILE
    pad_id = eos_id = 49407
  else:
    config, params = tiny_student(eos_token_id=eos_token_id, seed=1)
    out = export_student(config, params, tmp_path / "new", load_tokenizer())
    text_path = onnx_export.export_text_onnx(load_torch_model(out), config,
                                             tmp_path / "text.onnx")
    pad_id = eos_id = eos_token_id
  model = load_torch_model(out)
  text_session = rt.session(text_path)
  diffs = {}
  for lengths in ([5], [3, 16, 7, 11, 4], [2, 9, 5, 9, 6]):
    ids, mask = _padded_ids(config, lengths, pad_id, eos_id)
    seq = max(lengths)  # < 16 exercises the dynamic sequence axis
    ids, mask = ids[:, :seq], mask[:, :seq]
    onnx_embeds = rt.run_text(text_session, ids, mask)
    _, torch_embeds = torch_embeddings(model, None, ids, mask)
    diffs[f"batch{len(lengths)}_seq{seq}_vs_torch"] = float(
        np.abs(onnx_embeds - torch_embeds).max())
  # And against the Flax student itself, once (each new shape is a new XLA compile).
  _, flax_embeds = flax_embeddings(config, params, None, ids, mask)
  diffs["batch5_seq9_vs_flax"] = float(np.abs(onnx_embeds - flax_embeds).max())
  print(f"eos={eos_token_id}: ONNX text vs torch/flax max abs diff {diffs}")
  assert max(diffs.values()) <= EMBEDDING_TOLERANCE


def test_teacher_reference_rows(tmp_path, exported):
  """The teacher rows: a random model of the teacher's shape, same layout, same timer."""
  config = exported[0]
  teacher = dataclasses.replace(
      config, vision_config=dataclasses.replace(config.vision_config, hidden_size=64,
                                                num_hidden_layers=4))
  directory = benchmark.export_reference_model(teacher, tmp_path / "teacher", exported[2],
                                               int8=True, onnx=False)
  rows = benchmark.benchmark_export(directory, teacher, "teacher", batch_sizes=(1,), threads=1,
                                    budget_s=0.05)
  assert [r["variant"] for r in rows] == ["fp32 torch", "int8 torch"]
  table = benchmark.format_table(rows, (1,))
  print(table)
  assert "| teacher | int8 torch |" in table


def test_out_dir_that_is_not_an_export_is_refused(tmp_path, exported):
  (tmp_path / "precious.txt").write_text("keep me")
  config, params = exported[0], exported[1]
  with pytest.raises(FileExistsError, match="not an earlier export"):
    convert.export_all(config, params, tmp_path, run_benchmark=False)
  assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_trained_student_end_to_end_through_the_script(tmp_path, capsys):
  """Train a tiny student 2 steps with the real trainer, then scripts/convert_to_pytorch.py:
  orbax checkpoint -> HF directory that transformers loads -> parity printed and required."""
  import importlib.util

  from clipdistill_jax import train

  spec = importlib.util.spec_from_file_location(
      "tiny_train", Path(convert.__file__).parents[2] / "configs" / "tiny_train.py")
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config()
  config.train.update(dict(total_steps=2, checkpoint_every=1, log_every=1))
  config.eval.every = 0
  train.train(config, str(tmp_path / "run"))

  spec = importlib.util.spec_from_file_location(
      "convert_to_pytorch", Path(convert.__file__).parents[2] / "scripts" /
      "convert_to_pytorch.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "exported"
  assert script.main(["--workdir", str(tmp_path / "run"), "--out", str(out),
                      "--no-benchmark"]) == 0
  printed = capsys.readouterr().out
  assert "PyTorch vs Flax" in printed and "-> OK" in printed
  report = json.loads((out / convert.REPORT_FILE).read_text())
  assert report["step"] == 2 and report["ok"]
  model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not (out / rt.ONNX_DIR).exists() and not (out / quantize.INT8_WEIGHTS).exists()
