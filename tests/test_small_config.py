"""The article's own command, end to end: `python -m clipdistill_jax.main --config
configs/small.py`, then `scripts/convert_to_pytorch.py` on its workdir.

Stand-ins, as a machine without network needs them: the teacher is a CLIP with random
weights written by transformers into a temporary directory (--config.teacher.source=DIR);
tensorflow_datasets.testing.mock_data serves coco_captions and cifar10. Everything else is
configs/small.py as written (mode 'experiment', recipe 'clip_kd_inherit', the article's
student), at 2 steps of batch 2, evaluated on 4 mock examples with one prompt template
instead of OpenAI's 80 (each model encodes 10 prompts, not 800), exported without the
latency table.

The teacher is not ViT-B/32 itself: configs/small.py pins the student (the article's widths)
and cuts it from the teacher's weights, so any teacher at least as wide and deep works, and
its shape comes from its config.json. The smallest such teacher (the student's widths, 8
layers, ViT-B/32's 224 px in 32 px patches and 77 tokens) keeps the weights at 120 MB in
float16 instead of ViT-B/32's 300 MB and halves the teacher's compile and eval time.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from trainer_procs import REPO, main_env

ARTICLE_STUDENT_TEACHER = dict(
    projection_dim=256,
    text_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=6, max_position_embeddings=77),
    vision_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=8, image_size=224, patch_size=32))

# Runs `python -m clipdistill_jax.main` with sys.argv as given, inside mock_data. tfds' random
# generator cannot draw coco_captions (its bounding boxes come out with min > max, and the
# caption ids and texts with different lengths): the examples below carry the features the
# pipeline reads, of the datasets' own types (encoded images where the reader skips decoding).
MOCK_RUNNER = textwrap.dedent("""\
    import runpy, sys
    from unittest import mock

    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    NUM_EXAMPLES = 4


    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
      rng = np.random.default_rng(len(str(split)))
      images = rng.integers(0, 256, (NUM_EXAMPLES, 32, 32, 3), dtype=np.uint8)
      skip = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)
      image = (tf.constant([tf.io.encode_png(i).numpy() for i in images]) if skip
               else tf.constant(images))
      if self.name == "coco_captions":
        captions = [[f"a photo of thing {i}", f"thing {i} on a table"]
                    for i in range(NUM_EXAMPLES)]
        return tf.data.Dataset.from_tensor_slices(
            {"image": image, "captions": {"text": tf.constant(captions)}})
      labels = np.arange(NUM_EXAMPLES) % self.info.features["label"].num_classes
      return tf.data.Dataset.from_tensor_slices({"image": image, "label": labels})


    sys.argv = sys.argv[1:]  # [module or script, its arguments...]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, as_dataset_fn=as_dataset), \\
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
      if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
      else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  os.environ.setdefault("USE_TF", "0")
  import torch
  import transformers

  out = tmp_path_factory.mktemp("teacher")
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(**ARTICLE_STUDENT_TEACHER))
  model.to(torch.float16).save_pretrained(out)
  return out


@pytest.mark.slow
def test_small_config_end_to_end_then_convert(teacher_dir, tmp_path):
  workdir = tmp_path / "small"
  command = [sys.executable, "-c", MOCK_RUNNER, "clipdistill_jax.main",
             "--config", "configs/small.py",
             "--workdir", str(workdir), f"--config.teacher.source={teacher_dir}",
             "--config.train.total_steps=2", "--config.train.batch_size=2",
             "--config.optim.warmup_steps=1", "--config.train.log_every=1",
             "--config.train.checkpoint_every=2", "--config.eval.every=0",
             "--config.eval.max_examples=4", "--config.eval.batch_size=100",
             "--config.eval.stats_repeats=1", "--config.eval.templates=a photo of a {}."]
  env = main_env(devices=1)
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  rows = {row["model"]: row for row in
          json.loads((workdir / "report" / "results.json").read_text())["rows"]}
  assert set(rows) == {"Teacher", "Student-Distilled", "Student-NoTeacher"}
  for row in rows.values():
    assert row["zero_shot_examples"] == 4
    assert 0.0 <= row["zero_shot_top1"] <= 1.0
    assert 0.0 <= row["retrieval_i2t_r1"] <= 1.0
  assert rows["Student-Distilled"]["params_m"] == pytest.approx(60.248193, abs=1e-6)
  for stage in ("distilled", "no_teacher"):
    assert (workdir / stage / "checkpoints" / "2").is_dir(), stage

  out = tmp_path / "student"
  convert = subprocess.run(
      [sys.executable, "-c", MOCK_RUNNER, "scripts/convert_to_pytorch.py", "--workdir",
       str(workdir), "--out", str(out), "--no-benchmark"],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
  assert convert.returncode == 0, convert.stderr[-4000:]
  assert (out / "model.safetensors").is_file()
  assert f"exported to {out}" in convert.stdout
