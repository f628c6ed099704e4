"""`clipdistill search|moderate|classify` over a tiny exported student's ONNX files."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from tiny_models import tiny_student

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from clipdistill_jax.data.preprocess import decode_and_preprocess  # noqa: E402
from clipdistill_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clipdistill_jax.export import cli, onnx_export  # noqa: E402
from clipdistill_jax.export import onnx_runtime as rt  # noqa: E402
from clipdistill_jax.export.samples import reference_photos  # noqa: E402
from clipdistill_jax.export.torch_export import (  # noqa: E402
  export_student,
  flax_embeddings,
  load_torch_model,
)
from clipdistill_jax.models.config import tiny_config  # noqa: E402

LABELS = "cat,astronaut,cup of coffee,rocket"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  """A tiny random student exported with fp32 and int8 ONNX files."""
  config, params = tiny_student(eos_token_id=tiny_config().text_config.eos_token_id)
  out = export_student(config, params, tmp_path_factory.mktemp("model"), load_tokenizer())
  onnx_export.export_onnx(load_torch_model(out), config, out / rt.ONNX_DIR, out)
  onnx_export.quantize_onnx_int8(out / rt.ONNX_DIR)
  return config, params, out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Photos as JPEG/PNG (one RGBA, one grayscale, one in a subfolder), plus a corrupt
  file, an empty file, a non-image and a hidden folder that must be ignored."""
  folder = tmp_path_factory.mktemp("images")
  photos = reference_photos()
  for i, (image, caption) in enumerate(zip(photos.images[:7], photos.captions, strict=False)):
    name = caption.replace(" ", "_")[:24]
    target = folder / "sub" if i == 6 else folder
    target.mkdir(exist_ok=True)
    suffix = ".png" if image.ndim == 2 or image.shape[-1] == 4 or i % 2 else ".jpg"
    PIL.Image.fromarray(image).save(target / f"{i}_{name}{suffix}")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
  (folder / "empty.png").write_bytes(b"")
  (folder / "notes.txt").write_text("not an image")
  (folder / ".thumbnails").mkdir()
  PIL.Image.fromarray(photos.images[0]).save(folder / ".thumbnails" / "ignored.png")
  return folder


def _run(capsys, *argv: str) -> tuple[int, str, str]:
  code = cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _good_images(folder):
  return sorted(p for p in folder.glob("*.*") if p.suffix in (".jpg", ".png")
                and p.name not in ("broken.jpg", "empty.png"))


def test_classify_matches_the_flax_student_end_to_end(student, images, capsys):
  config, params, out = student
  files = _good_images(images)
  code, stdout, stderr = _run(capsys, "classify", "--model", out, "--labels", LABELS,
                              "--top-k", "4", "--json", *files, images / "broken.jpg")
  assert code == 0, stderr
  result = json.loads(stdout)
  assert [r["image"] for r in result["results"]] == [str(f) for f in files]
  assert [s["image"] for s in result["skipped"]] == [str(images / "broken.jpg")]
  assert "broken.jpg" in stderr and "not a readable image" in stderr

  labels = LABELS.split(",")
  pixels = np.stack([decode_and_preprocess(f.read_bytes(), 32) for f in files])
  ids, mask = load_tokenizer(str(out))([f"a photo of {x}" for x in labels], 16)
  image_embeds, text_embeds = flax_embeddings(config, params, pixels, ids, mask)
  logits = np.exp(params["logit_scale"]) * image_embeds @ text_embeds.T
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  got = np.array([[next(t["probability"] for t in r["top"] if t["label"] == x) for x in labels]
                  for r in result["results"]])
  print(f"classify probabilities vs Flax: max abs diff {np.abs(got - expected).max():.2e}")
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_classify_lines_with_int8_and_folder_argument(student, images, capsys):
  code, stdout, stderr = _run(capsys, "classify", "--model", student[2] / rt.ONNX_DIR,
                              "--int8", "--labels", LABELS, "--top-k", "2", images)
  assert code == 0, stderr
  lines = stdout.strip().splitlines()
  assert len(lines) == len(_good_images(images)) + 1  # + the one in sub/, not .thumbnails/
  assert all(len(line.split("\t")) == 2 for line in lines)
  assert "skipped 2 file(s)" in stderr  # broken.jpg and empty.png


def test_moderate_flags_probabilities_over_the_threshold(student, images, capsys):
  files = _good_images(images)[:3]
  code, stdout, stderr = _run(capsys, "moderate", "--model", student[2], "--labels",
                              "violence,nudity,hate speech", "--threshold", "0.7", *files,
                              images / "empty.png")
  assert code == 0, stderr
  report = json.loads(stdout)
  assert report["labels"] == ["violence", "nudity", "hate speech"]
  assert report["threshold"] == 0.7 and report["neutral"] == [cli.DEFAULT_NEUTRAL]
  assert [s["image"] for s in report["skipped"]] == [str(images / "empty.png")]
  for r in report["results"]:
    probs = r["probabilities"]
    assert sum(probs.values()) + r["neutral_probability"] == pytest.approx(1, abs=1e-5)
    assert r["flagged"] == [k for k, p in probs.items() if p > 0.7]
    assert r["safe"] == (not r["flagged"])

  # Without a neutral prompt the three concepts share all the probability: with a threshold
  # under 1/3 every image must be flagged for at least one.
  code, stdout, _ = _run(capsys, "moderate", "--model", student[2], "--labels",
                         "violence,nudity,hate speech", "--threshold", "0.3", "--neutral", "",
                         *files)
  report = json.loads(stdout)
  assert code == 0 and all(r["flagged"] for r in report["results"])
  assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
             for r in report["results"])


def test_search_embeds_once_then_reuses_the_index(student, images, tmp_path, capsys):
  folder = tmp_path / "photos"
  folder.mkdir()
  for f in _good_images(images) + [images / "broken.jpg"]:
    (folder / f.name).write_bytes(f.read_bytes())
  index = tmp_path / "cache" / "index.npz"
  argv = ["search", "--model", student[2], "--images", folder, "--query", "a photo of a cat",
          "--top-k", "3", "--index", index, "--json"]
  code, stdout, stderr = _run(capsys, *argv)
  assert code == 0, stderr
  first = json.loads(stdout)
  good = len(_good_images(images))
  assert first["indexed"] == good and first["embedded_now"] == good
  assert [s["image"] for s in first["skipped"]] == [str(folder / "broken.jpg")]
  assert len(first["results"]) == 3 and index.exists()
  scores = [r["score"] for r in first["results"]]
  assert scores == sorted(scores, reverse=True)

  model = rt.OnnxCLIP(student[2])
  query = model.encode_texts(["a photo of a cat"])[0]
  for r in first["results"]:
    embedding = model.encode_pixels(rt.load_image_file(r["path"], 32)[None])[0]
    assert r["score"] == pytest.approx(float(embedding @ query), abs=1e-5)

  code, stdout, _ = _run(capsys, *argv)
  second = json.loads(stdout)
  assert code == 0 and second["embedded_now"] == 0 and second["reused"] == good
  assert second["results"] == first["results"]

  new = folder / "new.png"
  new.write_bytes(_good_images(images)[0].read_bytes())
  code, stdout, _ = _run(capsys, *argv[:-1])  # plain output this time
  assert code == 0
  lines = stdout.strip().splitlines()
  assert len(lines) == 3 and all(float(line.split("\t")[0]) <= 1 for line in lines)
  code, stdout, _ = _run(capsys, *argv)
  assert json.loads(stdout)["indexed"] == good + 1


def test_labels_allow_quoted_commas_and_a_file(student, images, tmp_path, capsys):
  assert cli.parse_labels("cat,dog,1,000 dollars") == ["cat", "dog", "1", "000 dollars"]
  assert cli.parse_labels('cat, dog,"1,000 dollars"') == ["cat", "dog", "1,000 dollars"]
  assert cli.parse_labels('"say ""cheese""",x') == ['say "cheese"', "x"]
  labels_file = tmp_path / "labels.txt"
  labels_file.write_text("cat\n\n1,000 dollars\n  a dog, sitting \n", encoding="utf-8")
  image = _good_images(images)[0]
  for option, value in (("--labels", 'cat,"1,000 dollars","a dog, sitting"'),
                        ("--labels-file", labels_file)):
    code, stdout, stderr = _run(capsys, "classify", "--model", student[2], option, value,
                                "--top-k", "3", "--json", image)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["labels"] == ["cat", "1,000 dollars", "a dog, sitting"]
    assert {t["label"] for t in result["results"][0]["top"]} == set(result["labels"])
  code, stdout, stderr = _run(capsys, "moderate", "--model", student[2], "--labels", "a,b",
                              "--neutral", '"a calm, ordinary photo",nothing', image)
  assert code == 0 and json.loads(stdout)["neutral"] == ["a calm, ordinary photo", "nothing"]


def test_max_image_pixels_skips_with_the_reason(student, images, capsys):
  image = _good_images(images)[0]
  code, stdout, stderr = _run(capsys, "classify", "--model", student[2], "--labels", "a,b",
                              "--max-image-pixels", "100", "--json", image,
                              _good_images(images)[1])
  assert code == 1 and "image too large" in stderr and "over the limit of 100 pixels" in stderr
  code, stdout, stderr = _run(capsys, "classify", "--model", student[2], "--labels", "a,b",
                              "--max-image-pixels", "none", "--json", image)
  assert code == 0, stderr


@pytest.mark.parametrize("argv_tail,message", [
    (["classify", "--model", "{missing}", "--labels", "a,b", "{image}"], "does not exist"),
    (["classify", "--model", "{hf_only}", "--labels", "a,b", "{image}"], "--onnx"),
    (["search", "--model", "{model}", "--images", "{empty}", "--query", "x"], "no images"),
    (["search", "--model", "{model}", "--images", "{missing}", "--query", "x"],
     "does not exist"),
    (["classify", "--model", "{model}", "--labels", "a,b", "{broken}", "{missing}"],
     "none of the 2 image(s) could be read"),
    (["classify", "--model", "{model}", "--labels", " , ", "{image}"], "--labels is empty"),
    (["classify", "--model", "{model}", "--labels", "a,b", "--template", "x", "{image}"],
     "no {}"),
    (["moderate", "--model", "{model}", "--labels", "a", "--threshold", "1.5", "{image}"],
     "not a probability"),
    (["classify", "--model", "{int8_less}", "--int8", "--labels", "a,b", "{image}"],
     "no int8 ONNX files"),
    # Checked before any work: a bad template is reported even when the model is missing.
    (["classify", "--model", "{missing}", "--labels", "a,b", "--template",
      "a {} photo in {style}", "{image}"], "cannot be filled (KeyError: 'style')"),
    (["moderate", "--model", "{missing}", "--labels", "a", "--template", "a {} or {}",
      "{image}"], "cannot be filled (IndexError"),
    (["classify", "--model", "{missing}", "--labels", "a,b", "--top-k", "0", "{image}"],
     "--top-k must be at least 1"),
    (["classify", "--model", "{model}", "--labels", 'a,"b', "{image}"], "quote an item"),
    (["classify", "--model", "{model}", "--labels-file", "{missing}", "{image}"],
     "--labels-file"),
])
def test_bad_inputs_give_one_clear_error(student, images, tmp_path, capsys, argv_tail,
                                         message):
  empty = tmp_path / "empty"
  empty.mkdir()
  hf_only = tmp_path / "hf_only"
  hf_only.mkdir()
  (hf_only / "config.json").write_text("{}")
  int8_less = tmp_path / "int8_less"
  int8_less.mkdir()
  for f in (student[2] / rt.ONNX_DIR).iterdir():
    if "int8" not in f.name:
      (int8_less / f.name).write_bytes(f.read_bytes())
  manifest = rt.read_manifest(int8_less)
  del manifest["files"]["int8"]
  rt.write_manifest(int8_less, manifest)
  names = {"missing": tmp_path / "nope", "hf_only": hf_only, "model": student[2],
           "empty": empty, "image": _good_images(images)[0], "broken": images / "broken.jpg",
           "int8_less": int8_less}
  argv = [a.format(**names) if a.startswith("{") and a != "{}" else a for a in argv_tail]
  code, stdout, stderr = _run(capsys, *argv)
  assert code == 1
  assert stderr.count("clipdistill: error:") == 1 and message in stderr, stderr


def test_module_entry_point_runs_without_torch_or_jax(student, images):
  env = {**os.environ, "PYTHONWARNINGS": "ignore"}
  image = str(_good_images(images)[0])
  result = subprocess.run(
      [sys.executable, "-m", "clipdistill_jax.export.cli", "classify", "--model", str(student[2]),
       "--labels", LABELS, image], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(image)

  probe = ("import sys; from clipdistill_jax.export import cli; "
           f"code = cli.main(['classify', '--model', {str(student[2])!r}, '--labels', 'a,b', "
           f"{image!r}]); heavy = sorted(m for m in ('torch', 'jax', 'transformers', "
           "'tensorflow', 'flax') if m in sys.modules); print('HEAVY', heavy); "
           "sys.exit(code or bool(heavy))")
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "HEAVY []" in result.stdout


def test_damaged_export_files_are_one_error_line(student, images, tmp_path, capsys):
  """A truncated ONNX file (onnxruntime's InvalidProtobuf) and a manifest that is not JSON:
  one `clipdistill: error:` line naming the file and the fix, exit 1, no traceback."""
  _, _, out = student
  image = _good_images(images)[0]
  truncated = tmp_path / "truncated"
  shutil.copytree(out, truncated)
  onnx_file = truncated / rt.ONNX_DIR / rt.VISION_FILE
  onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
  code, stdout, err = _run(capsys, "classify", "--model", truncated, "--labels", "a,b", image)
  assert code == 1 and not stdout
  assert err.count("\n") == 1 and err.startswith(f"clipdistill: error: {onnx_file} cannot be "
                                                 "loaded by onnxruntime"), err
  assert "re-run scripts/convert_to_pytorch.py" in err

  bad_manifest = tmp_path / "bad_manifest"
  shutil.copytree(out, bad_manifest)
  manifest = bad_manifest / rt.ONNX_DIR / rt.MANIFEST
  manifest.write_text(manifest.read_text()[:40])
  code, stdout, err = _run(capsys, "classify", "--model", bad_manifest, "--labels", "a,b", image)
  assert code == 1 and not stdout
  assert err.count("\n") == 1 and err.startswith(f"clipdistill: error: {manifest} is not "
                                                 "valid JSON"), err


def test_traceback_switch_shows_the_user_errors_traceback(student, images, tmp_path, capsys,
                                                          monkeypatch):
  _, _, out = student
  bad_manifest = tmp_path / "bad_manifest"
  shutil.copytree(out, bad_manifest)
  (bad_manifest / rt.ONNX_DIR / rt.MANIFEST).write_text("{")
  monkeypatch.setenv("CLIPDISTILL_TRACEBACK", "1")
  with pytest.raises(rt.DamagedModelError):
    cli.main(["classify", "--model", str(bad_manifest), "--labels", "a,b",
              str(_good_images(images)[0])])
