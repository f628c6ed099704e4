"""Edge export: run workdirs (train / experiment / ablation), the run's teacher and zero-shot
set, LiteRT files, the model card, file modes, and the CLI on LiteRT."""

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tensorflow")

from tiny_models import tiny_student  # noqa: E402

from clipdistill_jax import checkpoints  # noqa: E402
from clipdistill_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clipdistill_jax.export import convert, model_card, run_dir  # noqa: E402
from clipdistill_jax.export import litert_runtime as lrt  # noqa: E402
from clipdistill_jax.export.samples import reference_photos, run_eval_set  # noqa: E402
from clipdistill_jax.export.torch_export import (  # noqa: E402
  EMBEDDING_TOLERANCE,
  export_student,
  flax_embeddings,
)
from clipdistill_jax.models import hf  # noqa: E402

SCRIPT = Path(convert.__file__).parents[2] / "scripts" / "convert_to_pytorch.py"
RUN_CONFIG = {
    "mode": "experiment", "seed": 0, "teacher": {"source": None},
    "experiment": {"teacher_steps": 20},
    "loss": {"recipe": "clip_kd", "weights": {"fd": 3.9, "icl": 1.0, "contrastive": 1.0,
                                              "feature": 0.0}},
    "data": {"source": "synthetic", "num_train_examples": 512, "data_dir": None},
    "train": {"total_steps": 3, "batch_size": 8},
    "eval": {"zero_shot": ["synthetic"], "max_examples": 48, "templates": None},
}
RESULT_ROWS = [
    {"model": "Teacher", "zero_shot_top1": 0.61, "params_m": 1.0},
    {"model": "Student-Distilled", "zero_shot_top1": 0.52, "params_m": 0.1},
    {"model": "Student-NoTeacher", "zero_shot_top1": 0.40, "params_m": 0.1},
]


def _save_checkpoint(workdir: Path, step: int, seed: int) -> None:
  """A checkpoint in the trainer's format (state + meta) without training: seconds, not
  minutes, on a busy CPU."""
  config, params = tiny_student(eos_token_id=2, seed=seed)
  manager = checkpoints.make_manager(workdir, save_every=1, keep=1, async_save=False)
  checkpoints.save(manager, step, {"params": {"student": params}},
                   {"step": step, "student_config": config.to_dict()}, force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """An experiment workdir: config.json, distilled (step 3), no_teacher (step 2),
  teacher/hf, report/results.json."""
  root = tmp_path_factory.mktemp("experiment")
  (root / "config.json").write_text(json.dumps(RUN_CONFIG))
  _save_checkpoint(root / "distilled", 3, seed=0)
  _save_checkpoint(root / "no_teacher", 2, seed=1)
  teacher_config, teacher_params = tiny_student(eos_token_id=2, seed=2)
  hf.save_pretrained(teacher_config, teacher_params, root / "teacher" / "hf")
  (root / "report").mkdir()
  (root / "report" / "results.json").write_text(json.dumps({"rows": RESULT_ROWS}))
  return root


def _script():
  import importlib.util
  spec = importlib.util.spec_from_file_location("convert_to_pytorch", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


# --- workdir layouts ------------------------------------------------------------------------

def test_experiment_workdir_stages(experiment):
  run = run_dir.resolve_run(experiment)
  assert (run.kind, run.stage, run.run_dir) == ("experiment", "distilled",
                                                experiment / "distilled")
  assert run.teacher_source() == str(experiment / "teacher" / "hf")
  assert [r["model"] for r in run.results()] == [r["model"] for r in RESULT_ROWS]
  assert run_dir.resolve_run(experiment, "no_teacher").run_dir == experiment / "no_teacher"
  teacher = run_dir.resolve_run(experiment, "teacher")
  assert teacher.hf_dir == experiment / "teacher" / "hf" and not teacher.has_checkpoints
  config, _, step = run_dir.load_run_student(teacher)
  assert step is None and config.projection_dim == 24
  # A stage folder given directly is that stage of its experiment.
  direct = run_dir.resolve_run(experiment / "no_teacher")
  assert (direct.root, direct.stage) == (experiment, "no_teacher")
  with pytest.raises(run_dir.RunNotFoundError, match="stages distilled, no_teacher, teacher"):
    run_dir.resolve_run(experiment, "bogus")


def test_train_and_ablation_workdirs(tmp_path):
  _save_checkpoint(tmp_path / "train", 1, seed=0)
  assert run_dir.resolve_run(tmp_path / "train").kind == "train"
  with pytest.raises(run_dir.RunNotFoundError, match="drop it"):
    run_dir.resolve_run(tmp_path / "train", "distilled")
  runs = tmp_path / "abl" / "ablation" / "runs"
  for name in ("clip_kd-s10-seed0", "no_teacher-s10-seed0"):
    (runs / name / "checkpoints").mkdir(parents=True)
  with pytest.raises(run_dir.RunNotFoundError, match=r"2 runs \(clip_kd-s10-seed0, "
                     r"no_teacher-s10-seed0\); pick one with --stage RUN"):
    run_dir.resolve_run(tmp_path / "abl")
  run = run_dir.resolve_run(tmp_path / "abl", "clip_kd-s10-seed0")
  assert (run.kind, run.run_dir) == ("ablation", runs / "clip_kd-s10-seed0")


def test_ablation_run_config_from_its_folder_name(tmp_path):
  runs = tmp_path / "ablation" / "runs"
  for name in ("clip_kd-s10-seed2", "no_teacher-s10-seed0"):
    (runs / name / "checkpoints").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps({**RUN_CONFIG, "mode": "ablation"}))
  config = run_dir.resolve_run(tmp_path, "clip_kd-s10-seed2").run_config()
  assert (config["loss"]["recipe"], config["seed"], config["train"]["total_steps"]) == (
      "clip_kd", 2, 10)
  assert config["loss"]["weights"]["fd"] > 0 and RUN_CONFIG["loss"]["recipe"] == "clip_kd"
  baseline = run_dir.resolve_run(tmp_path, "no_teacher-s10-seed0").run_config()
  assert baseline["loss"]["weights"] is None and baseline["teacher"]["source"] is None


def test_empty_or_unrecognised_workdir_says_what_it_found(tmp_path, capsys):
  with pytest.raises(run_dir.RunNotFoundError, match="it is empty.*train first"):
    run_dir.resolve_run(tmp_path)
  (tmp_path / "metrics.jsonl").write_text("")
  (tmp_path / "logs").mkdir()
  assert _script().main(["--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err
  assert f"no training run in {tmp_path}: it holds logs/, metrics.jsonl." in err
  assert "checkpoints/" in err and "distilled/" in err and "--workdir" in err


# --- the experiment through the script: stage, teacher, model card, file modes ----------------

@pytest.fixture(scope="module")
def exported_experiment(experiment, tmp_path_factory):
  out = tmp_path_factory.mktemp("card") / "student"
  report = convert.convert_workdir(experiment, out, run_benchmark=True, batch_sizes=(1,),
                                   benchmark_threads=1, benchmark_budget_s=0.02,
                                   pipeline_check=False)
  return out, report


def test_experiment_export_uses_the_distilled_student_and_the_runs_teacher(
    experiment, exported_experiment):
  out, report = exported_experiment
  assert report["step"] == 3 and report["stage"] == "distilled" and report["ok"]
  teacher = f"teacher ({experiment / 'teacher' / 'hf'})"
  assert report["benchmark_teacher"] == teacher
  assert f"| {teacher} | fp32 torch |" in report["benchmark_table"]
  assert "random" not in report["benchmark_table"]


def test_model_card(experiment, exported_experiment):
  out, _ = exported_experiment
  card = (out / model_card.CARD_FILE).read_text()
  print(card)
  header = card.split("---\n")[1]
  assert "license: mit" in header and "library_name: transformers" in header
  assert "pipeline_tag: zero-shot-image-classification" in header
  # The experiment's own teacher is a local folder: named in the text, not as base_model.
  assert "base_model" not in header
  assert f"a CLIP student distilled from `{experiment / 'teacher' / 'hf'}`" in card
  assert "- knowledge-distillation" in header
  for row in RESULT_ROWS:
    assert row["model"] in card
  assert "52.0" in card and "This export is the **Student-Distilled** row." in card
  assert "recipe: `clip_kd`" in card and "fd 3.9" in card and "feature 0" not in card
  assert "`synthetic`, 512 training examples" in card
  assert "### transformers" in card and "### onnxruntime" in card and "### LiteRT" in card
  assert 'pipeline("zero-shot-image-classification"' in card


def test_model_card_names_a_hub_teacher_as_base_model(tmp_path):
  path = model_card.write_model_card(
      tmp_path, {}, config={**RUN_CONFIG, "teacher": {"source": "openai/clip-vit-base-patch32"}},
      results=None, teacher_source="openai/clip-vit-base-patch32", stage=None, image_size=224,
      context_length=77)
  card = path.read_text()
  assert 'base_model: "openai/clip-vit-base-patch32"' in card
  assert "No experiment report was found" in card


def test_files_respect_the_umask(exported_experiment, tmp_path):
  out, _ = exported_experiment
  umask = os.umask(0)
  os.umask(umask)
  for path in out.rglob("*"):
    if path.is_file():
      assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
  # And under another umask: model.safetensors follows it (safetensors alone writes 0600).
  config, params = tiny_student(eos_token_id=2)
  previous = os.umask(0o002)
  try:
    export_student(config, params, tmp_path / "shared", load_tokenizer())
  finally:
    os.umask(previous)
  assert stat.S_IMODE((tmp_path / "shared" / hf.SAFETENSORS).stat().st_mode) == 0o664


def test_stage_and_random_teacher_through_the_script(experiment, tmp_path, capsys):
  out = tmp_path / "baseline"
  assert _script().main(["--workdir", str(experiment), "--out", str(out), "--stage",
                         "no_teacher", "--random-teacher", "--no-benchmark"]) == 0
  printed = capsys.readouterr().out
  assert f"step 2 of {experiment} (experiment, no_teacher) exported" in printed
  card = (out / "README.md").read_text()
  assert "**Student-NoTeacher** row" in card and "without a teacher" in card
  assert "base_model" not in card


def test_missing_teacher_falls_back_to_a_labelled_random_model(exported_experiment, tmp_path):
  out, _ = exported_experiment
  config, _ = tiny_student(eos_token_id=2)
  report = {}
  rows = convert._teacher_rows(str(tmp_path / "gone"), config, out, False, False, (1,),
                               {"threads": 1, "budget_s": 0.02}, report, lambda _: None)
  assert rows[0]["model"] == (f"{convert.RANDOM_TEACHER}: the run's teacher "
                              f"{tmp_path / 'gone'} was not found")


# --- LiteRT ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def litert_export(tmp_path_factory):
  config, params = tiny_student(eos_token_id=2)
  out = tmp_path_factory.mktemp("litert")
  run_eval = run_eval_set(RUN_CONFIG, config.vision_config.image_size, 48)
  report = convert.export_all(config, params, out, quantize="int8", tflite=True,
                              run_eval=run_eval, teacher_config=None, batch_sizes=(1,),
                              benchmark_threads=1, benchmark_budget_s=0.02,
                              pipeline_check=False)
  print(convert.format_report(report))
  return config, params, out, report


def test_litert_fp32_matches_flax(litert_export):
  config, params, out, report = litert_export
  litert = report["litert"]
  parity = litert["parity"]
  print(f"LiteRT fp32 vs Flax ({parity['runtime']}): image "
        f"{parity['image_embeds_max_abs_diff']:.2e}, text {parity['text_embeds_max_abs_diff']:.2e}")
  assert parity["ok"] and parity["runtime_tokenizer_ids_equal"]
  assert max(parity["image_embeds_max_abs_diff"],
             parity["text_embeds_max_abs_diff"]) <= EMBEDDING_TOLERANCE
  manifest = lrt.read_manifest(out / lrt.LITERT_DIR)
  assert set(manifest["files"]) == {"fp32", "int8", "int8_full"}
  assert manifest["inputs"]["text"] == "input_ids int32 [1, 16], padded with the pad token"
  # The runtime's own text path (tokenize, pad to the context, invoke) vs Flax.
  clip = lrt.LiteRTCLIP(out)
  texts = ["a photo of a cat", "a diagram"]
  tokenizer = load_tokenizer()
  ids, mask = tokenizer(texts, config.text_config.max_position_embeddings)
  _, flax_text = flax_embeddings(config, params, None, ids, mask)
  assert np.abs(clip.encode_texts(texts) - flax_text).max() <= EMBEDDING_TOLERANCE


def test_litert_int8_cosine_and_agreement(litert_export):
  litert = litert_export[3]["litert"]
  sizes = litert["size_mb"]
  # Dynamic range leaves the token embedding (a gather) in float, and in this tiny student
  # that table is most of the bytes; full integer quantizes it too.
  assert sizes["int8"] < sizes["fp32"] and sizes["int8_full"] < 0.5 * sizes["fp32"]
  for variant, section in litert["int8"].items():
    photos, run_eval = section["agreements"]
    assert run_eval["source"].startswith("the run's zero-shot set 'synthetic' (48 images")
    for agreement in (photos, run_eval):
      print(f"LiteRT {variant} on {agreement['source']}: cosine image "
            f"{agreement['image_cosine_mean']:.5f} text {agreement['text_cosine_mean']:.5f}, "
            f"top-1 agreement {agreement['top1_agreement']:.3f}")
      floor = 0.99 if variant == "int8" else 0.95  # full integer also rounds activations
      assert min(agreement["image_cosine_mean"], agreement["text_cosine_mean"]) >= floor
  # The run's zero-shot set is in the torch int8 section too.
  assert "run_eval_agreement" in litert_export[3]["int8_torch"]


def test_litert_rows_in_the_table(litert_export):
  table = litert_export[3]["benchmark_table"]
  assert "| student | fp32 litert (batch 1 only) |" in table
  assert "| student | int8_full litert (batch 1 only) |" in table


def test_cli_runs_on_litert_without_onnxruntime(litert_export, tmp_path, monkeypatch, capsys):
  from PIL import Image

  from clipdistill_jax.export import cli
  out = litert_export[2]
  image = tmp_path / "cat.png"
  Image.fromarray(reference_photos().images[1]).save(image)
  monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
  assert cli.main(["classify", "--model", str(out), "--labels", "cat,dog", "--json",
                   str(image)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["results"][0]["label"] in ("cat", "dog")
  # An export with neither usable runtime: one line saying why.
  only_onnx = tmp_path / "onnx_only"
  (only_onnx / "onnx").mkdir(parents=True)
  (only_onnx / "onnx" / "clipdistill_onnx.json").write_text("{}")
  assert cli.main(["classify", "--model", str(only_onnx), "--labels", "a,b", str(image)]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "onnxruntime is not available" in err and "--tflite" in err
