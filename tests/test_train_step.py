"""The jitted, sharded update step: meshes agree with one device; loss falls; NaN guard."""

import copy

import jax
import numpy as np
import pytest

from clipdistill_jax import config_lib, optim, run_builder, sharding
from clipdistill_jax.data.synthetic import SyntheticCaptions
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.models import hf
from clipdistill_jax.models.clip import CLIPModel, init_params
from clipdistill_jax.models.config import tiny_config

# f32 on CPU: sharded reductions are reassociated, so agreement is to rounding, not bits.
# The key-projection bias has an exactly zero true gradient (softmax ignores a per-row shift);
# with Adam's default eps=1e-8 its rounding noise becomes +-lr steps, so the comparison runs
# with eps=1e-6, which keeps such updates proportional to the (tiny) gradient.
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher")
  config = tiny_config()
  hf.save_pretrained(config, init_params(CLIPModel(config), jax.random.key(7)), path)
  return str(path)


def _config(teacher_dir, **overrides):
  c = config_lib.base_config()
  c.teacher.source = teacher_dir
  c.student.arch = "custom"
  c.student.custom = dict(projection_dim=16, text_hidden_size=24, text_intermediate_size=48,
                          text_layers=1, text_heads=2, vision_hidden_size=32,
                          vision_intermediate_size=64, vision_layers=2, vision_heads=2)
  c.loss.hidden_layers = "uniform"
  c.optim.lr, c.optim.warmup_steps, c.optim.eps = 1e-3, 1, 1e-6
  c.train.batch_size = 8
  for k, v in overrides.items():
    target = c
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


def _batches(n, batch_size, config):
  data = SyntheticCaptions(image_size=config.vision_config.image_size, seed=0)
  tok = load_tokenizer()
  for step in range(n):
    images, captions, _ = data.examples(range(step * batch_size, (step + 1) * batch_size))
    ids, mask = tok(captions, context_length=config.text_config.max_position_embeddings)
    from clipdistill_jax.data.preprocess import preprocess_images
    yield {"image": preprocess_images(images, config.vision_config.image_size),
           "input_ids": ids, "attention_mask": mask}


def _run(config, mesh_shape, steps=3):
  config = copy.deepcopy(config)
  config.train.total_steps, config.mesh.shape = 10, mesh_shape
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  run = run_builder.build_run(config, mesh=mesh)
  models, state, shardings = run.models, run.state, run.state_shardings
  step_fn, teacher = run.step_fn, run.teacher_params
  losses = []
  with jax.set_mesh(mesh):
    for batch in _batches(steps, config.train.batch_size, models.student_config):
      state, metrics = step_fn(state, sharding.shard_host_batch(batch, mesh), teacher)
      losses.append(jax.device_get(metrics))
  return jax.device_get(state), losses, shardings


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(teacher_dir, mesh_shape):
  config = _config(teacher_dir)
  single_state, single_losses, _ = _run(config, (1, 1, 1))
  state, step_losses, shardings = _run(config, mesh_shape)
  for a, b in zip(single_losses, step_losses, strict=True):
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=LOSS_RTOL, atol=1e-6, err_msg=k)
  diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                 single_state["params"], state["params"])
  worst = max(jax.tree_util.tree_leaves(diffs))
  loss_rel = max(abs(b["loss/total"] / a["loss/total"] - 1)
                 for a, b in zip(single_losses, step_losses, strict=True))
  print(f"mesh {mesh_shape}: max |param diff| after 3 steps = {worst:.2e}, "
        f"max loss rel diff {loss_rel:.2e}")
  assert worst <= PARAM_ATOL
  if mesh_shape[1] > 1:  # fsdp really shards the weights
    spec = shardings["params"]["student"]["vision_model"]["encoder"]["layers_0"]["mlp"][
        "fc1"]["kernel"].spec
    assert "fsdp" in str(spec)


def test_all_components_logged_and_loss_falls(teacher_dir):
  config = _config(teacher_dir, **{"loss.weights": dict(
      feature=1.0, hidden=1.0, logit_kl=1.0, attention=1.0, contrastive=1.0)})
  _, step_losses, _ = _run(config, (1, 1, 1), steps=8)
  for key in ("loss/feature", "loss/hidden", "loss/logit_kl", "loss/attention",
              "loss/contrastive", "loss/total", "grad_norm", "learning_rate"):
    assert key in step_losses[0] and np.isfinite(step_losses[0][key]), key
  assert step_losses[-1]["loss/total"] < step_losses[0]["loss/total"]


def test_weight_decay_mask_and_logit_scale_clamp():
  params = init_params(CLIPModel(tiny_config()), jax.random.key(0))
  mask = optim.decay_mask(params)
  assert mask["visual_projection"]["kernel"]
  assert not mask["logit_scale"]
  assert not mask["vision_model"]["pre_layrnorm"]["scale"]
  assert not mask["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["bias"]
  assert not mask["text_model"]["embeddings"]["token_embedding"]["embedding"]
  params["logit_scale"] = np.float32(10.0)
  assert float(optim.clamp_logit_scale(params, 100.0)["logit_scale"]) == pytest.approx(
      np.log(100.0))


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear", "constant"])
def test_schedules_warm_up_then_follow_their_shape(name):
  c = config_lib.base_config().optim
  c.schedule, c.lr, c.warmup_steps = name, 1.0, 10
  schedule = optim.make_schedule(c, 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  end = float(schedule(100))
  assert end == pytest.approx(1.0 if name == "constant" else 0.0, abs=1e-6)
