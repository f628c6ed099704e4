"""Evaluation library: metrics on hand-made embeddings with known answers, encoding on a tiny
CLIP with and without an 8-device mesh, model_stats, and the local image-folder reader."""

import io

import jax
import numpy as np
import PIL.Image
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipdistill_jax.data.preprocess import preprocess_image
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.eval import datasets, encode, evaluate, metrics, prompts
from clipdistill_jax.eval import stats as model_stats_lib
from clipdistill_jax.models.clip import CLIPModel, init_params
from clipdistill_jax.models.config import tiny_config

CONTEXT = 16


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config(context_length=CONTEXT)
  model = CLIPModel(config)
  return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
  return Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"),
              axis_types=(AxisType.Auto,) * 2)


def _direct_embeds(model, params, *inputs):
  """The towers' embeddings straight from model.apply (jitted: eager dispatch is slower)."""
  method = CLIPModel.encode_image if len(inputs) == 1 else CLIPModel.encode_text
  out = jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=method))(params, *inputs)
  return np.asarray(out.image_embeds if len(inputs) == 1 else out.text_embeds)


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- templates --------------------------------------------------------------------------------


def test_template_sets():
  assert len(prompts.OPENAI_IMAGENET_TEMPLATES) == 80
  assert len(set(prompts.OPENAI_IMAGENET_TEMPLATES)) == 80
  assert len(prompts.SIMPLE_IMAGENET_TEMPLATES) == 7
  assert set(prompts.SIMPLE_IMAGENET_TEMPLATES) <= set(prompts.OPENAI_IMAGENET_TEMPLATES)
  assert prompts.get_templates("imagenet2012") == prompts.OPENAI_IMAGENET_TEMPLATES
  assert prompts.get_templates("cifar100") == prompts.CIFAR_TEMPLATES
  assert prompts.get_templates("folder:/x") == ("a photo of a {}.",)
  assert prompts.get_templates("a sketch of a {}.") == ("a sketch of a {}.",)
  with pytest.raises(ValueError, match="exactly one"):
    prompts.get_templates(["no placeholder"])
  assert prompts.fill_templates(["cat", "dog"], ["a {}.", "the {}!"]) == [
      "a cat.", "the cat!", "a dog.", "the dog!"]
  assert len(prompts.IMAGENET_CLASSNAMES) == 1000
  assert prompts.readable_class_names("cifar100", ["aquarium_fish", "maple_tree"]) == (
      "aquarium fish", "maple tree")
  numbered = prompts.readable_class_names("cifar10", [str(i) for i in range(10)])
  assert numbered[0] == "airplane" and numbered[-1] == "truck"


# --- zero-shot --------------------------------------------------------------------------------


def test_zero_shot_known_answer():
  num_classes, dim = 8, 8
  classifier = np.eye(num_classes, dim) * 3.0  # unnormalized on purpose
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
  weights = np.full((10, num_classes), 0.01)
  weights[np.arange(10), labels] = 1.0       # every image points at its class ...
  weights[8] = np.linspace(0.2, 0.9, 8)      # ... except image 8: its class 0 scores last
  weights[9, 4] = 2.0                        # ... and image 9: class 4 first, its class 1 second
  result = metrics.zero_shot_eval(weights @ np.eye(num_classes, dim), labels, classifier,
                                   return_logits=True)
  assert result["top1"] == pytest.approx(0.8)
  assert result["top5"] == pytest.approx(0.9)
  np.testing.assert_array_equal(result["predictions"], [0, 1, 2, 3, 4, 5, 6, 7, 7, 4])
  assert result["num_examples"] == 10
  assert result["logits"].shape == (10, 8)
  assert result["logits"].max() <= 100.0 + 1e-4

  # top5 is top-C when there are fewer than five classes.
  three = metrics.zero_shot_eval(np.eye(3)[[2, 0, 1]], [0, 1, 2], np.eye(3))
  assert three["top1"] == 0.0 and three["top5"] == 1.0


def test_zero_shot_ties_count_against_the_model():
  collapsed = metrics.zero_shot_eval(np.ones((4, 3)), [0, 1, 2, 0], np.ones((3, 3)))
  assert collapsed["top1"] == 0.0
  with pytest.raises(ValueError, match="labels must lie"):
    metrics.zero_shot_eval(np.eye(2), [0, 5], np.eye(2))


def test_classifier_averaging_normalizes_each_template_first():
  # Class 0: templates 2*e0 and e1 -> mean of the unit vectors (e0 + e1) / 2 -> renormalized.
  # Class 1: a single direction repeated.
  prompt_embeds = np.array([[2, 0, 0], [0, 1, 0], [0, 0, 5], [0, 0, 1]], np.float32)
  classifier = encode.average_template_embeddings(prompt_embeds, num_classes=2)
  np.testing.assert_allclose(classifier, [[2**-0.5, 2**-0.5, 0], [0, 0, 1]], atol=1e-6)
  with pytest.raises(ValueError, match="do not split"):
    encode.average_template_embeddings(prompt_embeds[:3], num_classes=2)


def test_zero_shot_classifier_on_tiny_clip(tiny, tokenizer):
  model, params = tiny
  names, templates = ["cat", "dog", "red circle"], ["a photo of a {}.", "a drawing of the {}."]
  classifier = encode.zero_shot_classifier(model, params, tokenizer, names, templates,
                                             CONTEXT, batch_size=4)
  assert classifier.shape == (3, model.config.projection_dim)
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, atol=1e-5)
  ids, mask = tokenizer(prompts.fill_templates(names, templates), CONTEXT)
  direct = _direct_embeds(model, params, ids, mask)
  expected = _unit(direct.reshape(3, 2, -1).mean(axis=1))
  np.testing.assert_allclose(classifier, expected, atol=1e-5)


# --- retrieval --------------------------------------------------------------------------------


def test_retrieval_known_permutation():
  images = _unit(np.random.default_rng(0).standard_normal((6, 5)))
  perm = np.array([3, 0, 5, 1, 4, 2])
  exact = metrics.retrieval_eval(images, images[perm], text_to_image=perm)
  for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"):
    assert exact[key] == 1.0
  # Orthogonal embeddings, every caption attached to the wrong image: the correct one ties
  # at cosine 0 with the four other wrong ones and ranks behind the matching one -> rank 5.
  eye = np.eye(6)
  wrong = metrics.retrieval_eval(eye, eye, text_to_image=np.roll(np.arange(6), 1))
  assert wrong["i2t_r1"] == wrong["i2t_r5"] == wrong["t2i_r1"] == wrong["t2i_r5"] == 0.0
  assert wrong["i2t_r10"] == wrong["t2i_r10"] == 1.0


def test_retrieval_coco_style_several_captions():
  e = np.eye(4)
  images = e[:3]
  texts = np.stack([
      e[0],                      # image 0: exact
      e[3],                      # image 0: unrelated to every image (ties at 0)
      0.954 * e[0] + 0.3 * e[1],  # image 1, but closer to image 0
      0.98 * e[2] + 0.2 * e[1],   # image 1, but closer to image 2
      0.6 * e[2] + 0.8 * e[1],    # image 2, but closer to image 1
      0.3 * e[2] + 0.954 * e[3],  # image 2, weak but nothing else matches
  ])
  text_to_image = np.array([0, 0, 1, 1, 2, 2])
  result = metrics.retrieval_eval(images, texts, text_to_image)
  # Images: 0 finds caption 0 first (its other caption ranks last: ANY caption counts);
  # image 1's best caption (0.3) is beaten by image 2's caption 4 (0.8); image 2's best (0.6)
  # by image 1's caption 3 (0.98).
  assert result["i2t_r1"] == pytest.approx(1 / 3)
  assert result["i2t_r5"] == 1.0
  # Texts 0 and 5 retrieve their image first; the rest rank it second or (tied) third.
  assert result["t2i_r1"] == pytest.approx(2 / 6)
  assert result["t2i_r5"] == 1.0
  assert result["num_image_queries"] == 3 and result["num_text_queries"] == 6


def test_retrieval_matches_sorting_reference():
  rng = np.random.default_rng(1)
  images = _unit(rng.standard_normal((40, 8)))
  text_to_image = np.concatenate([np.arange(40), rng.integers(0, 40, 60)])
  texts = _unit(images[text_to_image] + 0.9 * rng.standard_normal((100, 8)))
  result = metrics.retrieval_eval(images, texts, text_to_image)
  sims = images @ texts.T
  for k in (1, 5, 10):
    top_texts = np.argsort(-sims, axis=1)[:, :k]
    i2t = np.mean([np.any(text_to_image[top_texts[i]] == i) for i in range(40)])
    top_images = np.argsort(-sims.T, axis=1)[:, :k]
    t2i = np.mean([text_to_image[j] in top_images[j] for j in range(100)])
    assert result[f"i2t_r{k}"] == pytest.approx(i2t)
    assert result[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0 < result["t2i_r1"] < result["t2i_r10"] < 1


# --- agreement and cosine -------------------------------------------------------------------


def test_teacher_agreement_and_embedding_cosine():
  assert metrics.teacher_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
  with pytest.raises(ValueError, match="same examples"):
    metrics.teacher_agreement(np.array([1, 2]), np.array([1, 2, 3]))

  rng = np.random.default_rng(2)
  teacher = rng.standard_normal((5, 4))
  assert metrics.embedding_cosine(2 * teacher, teacher) == pytest.approx(1.0)
  assert metrics.embedding_cosine(-teacher, teacher) == pytest.approx(-1.0)
  mixed = np.stack([teacher[0], -teacher[1]])
  assert metrics.embedding_cosine(mixed, teacher[:2]) == pytest.approx(0.0, abs=1e-6)

  # Student dim 3 -> teacher dim 4 through a projector.
  student = rng.standard_normal((5, 3))
  kernel = rng.standard_normal((3, 4))
  assert metrics.embedding_cosine(student, student @ kernel, projector=kernel) == (
      pytest.approx(1.0))
  assert metrics.embedding_cosine(student, student @ kernel,
                                   projector={"kernel": kernel}) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="projector"):
    metrics.embedding_cosine(student, teacher)
  with pytest.raises(ValueError, match="expected"):
    metrics.embedding_cosine(student, teacher, projector=kernel.T)


# --- encoding ---------------------------------------------------------------------------------


def test_encode_images_and_texts_with_and_without_mesh(tiny, tokenizer, mesh):
  model, params = tiny
  size = model.config.vision_config.image_size
  images = np.random.default_rng(3).standard_normal((13, size, size, 3)).astype(np.float32)
  direct = _direct_embeds(model, params, images)
  # Uneven input batches (5 + 8) re-cut into fixed batches; the last one padded.
  plain = encode.encode_images(model, params, [images[:5], images[5:]], batch_size=4)
  assert plain.shape == (13, model.config.projection_dim)
  np.testing.assert_allclose(plain, direct, atol=1e-5)
  sharded = encode.encode_images(model, params, images, batch_size=4, mesh=mesh)
  np.testing.assert_allclose(sharded, plain, atol=1e-5)
  # Params already sharded (replicated) on the mesh pass straight through.
  on_mesh = jax.device_put(params, NamedSharding(mesh, P()))
  np.testing.assert_allclose(
      encode.encode_images(model, on_mesh, iter([images]), batch_size=8, mesh=mesh),
      plain, atol=1e-5)

  texts = ["a photo of a cat", "a dog", "", "two red circles on a noisy background", "x",
           "a photo of a cat", "the end"]
  ids, mask = tokenizer(texts, CONTEXT)
  direct_text = _direct_embeds(model, params, ids, mask)
  plain_text = encode.encode_texts(model, params, tokenizer, texts, CONTEXT, batch_size=3)
  np.testing.assert_allclose(plain_text, direct_text, atol=1e-5)
  sharded_text = encode.encode_texts(model, params, tokenizer, texts, CONTEXT, batch_size=3,
                                       mesh=mesh)
  np.testing.assert_allclose(sharded_text, plain_text, atol=1e-5)
  assert encode.encode_texts(model, params, tokenizer, [], CONTEXT).shape == (0, 24)


def test_evaluate_zero_shot_and_retrieval_on_synthetic(tiny, tokenizer):
  from clipdistill_jax.data.defaults import default_data_config
  from clipdistill_jax.data.pipeline import make_eval_dataset

  model, params = tiny
  size = model.config.vision_config.image_size
  ours = datasets.load_zero_shot_dataset("synthetic", "test", size, max_examples=10)
  result = evaluate.evaluate_zero_shot(model, params, tokenizer, ours, context_length=CONTEXT,
                                       batch_size=4)
  assert len(result["labels"]) == len(result["predictions"]) == 10
  assert result["classifier"].shape == (len(ours.class_names), 24)
  assert result["image_embeds"].shape == (10, 24)
  assert 0.0 <= result["top1"] <= result["top5"] <= 1.0

  # The input pipeline's eval set (padded last batch, 'mask') gives the same examples.
  data_config = default_data_config()
  data_config.num_eval_examples = 10
  pipeline = make_eval_dataset(data_config, batch_size=4, image_size=size,
                               context_length=CONTEXT, tokenizer=tokenizer, process_index=0,
                               process_count=1, pad_remainder=True)
  same = evaluate.evaluate_zero_shot(model, params, tokenizer, pipeline,
                                     context_length=CONTEXT, batch_size=4)
  np.testing.assert_array_equal(same["labels"], result["labels"])
  np.testing.assert_allclose(same["image_embeds"], result["image_embeds"], atol=1e-5)
  assert same["top1"] == result["top1"]

  retrieval = evaluate.evaluate_retrieval(model, params, pipeline, batch_size=4)
  assert retrieval["num_text_queries"] == retrieval["num_image_queries"] == 10
  np.testing.assert_allclose(retrieval["image_embeds"], result["image_embeds"], atol=1e-5)
  batches = list(pipeline)
  keep = np.concatenate([b["mask"] for b in batches])
  ids = np.concatenate([b["input_ids"] for b in batches])[keep]
  mask = np.concatenate([b["attention_mask"] for b in batches])[keep]
  np.testing.assert_allclose(retrieval["text_embeds"],
                             _direct_embeds(model, params, ids, mask), atol=1e-5)
  expected = metrics.retrieval_eval(retrieval["image_embeds"], retrieval["text_embeds"],
                                     np.arange(10))
  assert all(retrieval[k] == expected[k] for k in expected)


def test_evaluate_retrieval_counts_every_caption_of_every_image(tiny, tokenizer):
  """Batches carrying caption lists (text_image: the row each caption describes), a padded
  last row without captions: every caption is a text query of its own image."""
  model, params = tiny
  size = model.config.vision_config.image_size
  rng = np.random.default_rng(0)
  texts = [["a red circle", "a round red thing"], ["a blue square"],
           ["a green star", "a star", "green"], ["a cup"]]
  batches = []
  for rows, mask in ((texts[:2] + [[]], [True, True, False]), (texts[2:], [True, True])):
    flat = [t for row in rows for t in row]
    ids, attention = tokenizer(flat, CONTEXT)
    first_ids, first_mask = tokenizer([row[0] if row else "" for row in rows], CONTEXT)
    batches.append({
        "image": rng.standard_normal((len(rows), size, size, 3)).astype(np.float32),
        "input_ids": first_ids, "attention_mask": first_mask, "mask": np.asarray(mask),
        "text_input_ids": ids, "text_attention_mask": attention,
        "text_image": np.repeat(np.arange(len(rows), dtype=np.int32), [len(r) for r in rows])})
  result = evaluate.evaluate_retrieval(model, params, batches, batch_size=4)
  assert result["text_to_image"].tolist() == [0, 0, 1, 2, 2, 2, 3]
  assert result["num_text_queries"] == 7 and result["num_image_queries"] == 4
  ids, attention = tokenizer([t for row in texts for t in row], CONTEXT)
  np.testing.assert_allclose(result["text_embeds"], _direct_embeds(model, params, ids, attention),
                             atol=1e-5)
  expected = metrics.retrieval_eval(result["image_embeds"], result["text_embeds"],
                                     [0, 0, 1, 2, 2, 2, 3])
  assert all(result[k] == expected[k] for k in expected)


# --- model stats ----------------------------------------------------------------------------


def test_model_stats_on_tiny_model(tiny):
  model, params = tiny
  stats = model_stats_lib.model_stats(model, params, model.config, batch_sizes=(2,), repeats=2)
  counts = model_stats_lib.tower_param_counts(params)
  assert stats["params_vision"] == counts["params_vision"] > 0
  assert stats["params_vision"] + stats["params_text"] + 1 == stats["params_total"]  # + scale
  assert stats["size_mb_fp32"] == pytest.approx(stats["params_total"] * 4 / 1e6)
  assert stats["size_mb_bf16"] == pytest.approx(stats["size_mb_fp32"] / 2)
  for tower in ("image", "text"):
    assert stats[f"{tower}_latency_ms_b2"] > 0
    assert stats[f"{tower}_throughput_b2"] == pytest.approx(
        2 * 1e3 / stats[f"{tower}_latency_ms_b2"])
  assert stats["latency_ms_b2"] == stats["image_latency_ms_b2"]
  assert stats["throughput_b2"] == stats["image_throughput_b2"]
  assert stats["peak_memory_mb"] >= stats["size_mb_fp32"]
  assert stats["xla_memory_mb"] >= stats["size_mb_fp32"]
  assert stats["peak_memory_method"] and stats["memory_batch_size"] == 2


# --- local image folders --------------------------------------------------------------------


def _png(array):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_folder_dataset_skips_and_counts_corrupt_images(tmp_path):
  rng = np.random.default_rng(4)
  pictures = {("cat", "a.png"): rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
              ("cat", "b.png"): rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
              ("dog_house", "c.png"): rng.integers(0, 256, (40, 18, 3), dtype=np.uint8)}
  for (label, name), pixels in pictures.items():
    (tmp_path / label).mkdir(exist_ok=True)
    (tmp_path / label / name).write_bytes(_png(pixels))
  (tmp_path / "dog_house" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (tmp_path / "dog_house" / "notes.txt").write_text("not an image, not counted")

  dataset = datasets.load_zero_shot_dataset(f"folder:{tmp_path}", "test", image_size=16)
  assert dataset.class_names == ("cat", "dog house")
  assert dataset.num_examples == 4
  with pytest.warns(UserWarning, match="Skipped 1 unreadable"):
    batches = list(dataset.batches(3))
  assert dataset.num_skipped == 1
  images = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 1])
  expected = np.stack([preprocess_image(p, 16) for p in pictures.values()])
  np.testing.assert_allclose(images, expected, atol=1e-6)

  with pytest.raises(FileNotFoundError, match="one subfolder per class"):
    datasets.load_zero_shot_dataset(f"folder:{tmp_path}/missing", "test", 16)
