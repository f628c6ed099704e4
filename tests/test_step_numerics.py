"""The step's knobs keep its numbers: gradient accumulation (k micro-batches = one batch of
k times the size, and the logged learning rate is the applied one), remat (same loss and
gradients), a bf16 teacher and a bf16-compute student (loss within bf16 rounding of fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_distill_config, tiny_student

from clipdistill_jax import optim, run_builder, sharding
from clipdistill_jax.models import hf
from clipdistill_jax.models.config import tiny_config
from clipdistill_jax.perf.common import make_batch

# bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4% per operation); a loss summed
# over a few layers of such rounding lands within about 1% of fp32.
BF16_RTOL = 2e-2


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher")
  config, params = tiny_student(eos_token_id=tiny_config().text_config.eos_token_id, seed=3)
  hf.save_pretrained(config, params, str(path))
  return str(path)


def _config(teacher_dir, **overrides):
  return tiny_distill_config(**{"teacher.source": teacher_dir, **overrides})


def _batch(config, batch_size, seed):
  models = run_builder.build_models(config)
  text, vision = models.student_config.text_config, models.student_config.vision_config
  return make_batch(batch_size, vision.image_size, models.context_length, text.vocab_size,
                    text.eos_token_id, seed=seed)


def _run_steps(config, batches, total_updates):
  """The trainer's jitted step on one device over `batches`: (final params, metrics list)."""
  models = run_builder.build_models(config)
  loss = run_builder.make_loss(config, models)
  k = config.optim.grad_accum_steps
  tx, schedule = optim.make_optimizer(config.optim, total_updates)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state, shardings = run_builder.init_state(config, models, loss, tx, mesh, jax.random.key(0))
  teacher, teacher_shardings = run_builder.place_teacher(models, mesh, config.mesh.rules)
  step = jax.jit(run_builder.make_train_step(models, loss, tx, schedule, 100.0, grad_accum_steps=k),
                 in_shardings=(shardings, sharding.batch_sharding(mesh), teacher_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  metrics = []
  with jax.set_mesh(mesh):
    for batch in batches:
      state, m = step(state, sharding.shard_host_batch(batch, mesh), teacher)
      metrics.append(jax.device_get(m))
  return jax.device_get(state["params"]), metrics, schedule


def test_grad_accumulation_equals_one_big_batch_and_logs_the_applied_lr(teacher_dir):
  # Per-example losses only: a contrastive or logit-KL term couples the examples of a batch
  # (a softmax over it), so k micro-batches cannot equal one big batch for those.
  per_example = {"loss.weights": dict(feature=1.0, fd=1.0, icl=0.0, hidden=0.0, logit_kl=0.0,
                                      attention=0.0, contrastive=0.0),
                 "optim.schedule": "warmup_linear", "optim.warmup_steps": 1,
                 "optim.lr": 1e-3, "optim.eps": 1e-6}
  big = _config(teacher_dir, **per_example, **{"optim.grad_accum_steps": 1})
  accum = _config(teacher_dir, **per_example, **{"optim.grad_accum_steps": 2})
  batches = [_batch(big, 8, seed) for seed in range(3)]
  halves = [{k: v[i:i + 4] for k, v in b.items()} for b in batches for i in (0, 4)]

  big_params, big_metrics, schedule = _run_steps(big, batches, total_updates=3)
  accum_params, accum_metrics, _ = _run_steps(accum, halves, total_updates=3)

  for a, b in zip(jax.tree_util.tree_leaves(accum_params), jax.tree_util.tree_leaves(big_params),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-5)
  for i, m in enumerate(big_metrics):  # the big batch's loss is the mean of its halves'
    halves_loss = (accum_metrics[2 * i]["loss/total"] + accum_metrics[2 * i + 1]["loss/total"])
    np.testing.assert_allclose(halves_loss / 2, m["loss/total"], rtol=1e-5)
  # Updates apply schedule(0), schedule(1), schedule(2) = 0, lr, lr / 2: each micro-batch
  # logs the rate of the update its gradient goes into, not schedule(micro-step).
  expected = [float(schedule(s // 2)) for s in range(6)]
  np.testing.assert_allclose([float(m["learning_rate"]) for m in accum_metrics], expected)
  np.testing.assert_allclose(expected, [0, 0, 1e-3, 1e-3, 5e-4, 5e-4], rtol=1e-6)
  np.testing.assert_allclose([float(m["learning_rate"]) for m in big_metrics],
                             expected[::2])


def _loss_and_grads(config, batch):
  """Loss and gradients of the config's student at the same initial params (key 0)."""
  models = run_builder.build_models(config)
  loss = run_builder.make_loss(config, models)
  tx, _ = optim.make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state, _ = run_builder.init_state(config, models, loss, tx, mesh, jax.random.key(0))
  hidden, attention = loss.needs_hidden_states, loss.needs_attentions
  inputs = (batch["image"], batch["input_ids"], batch["attention_mask"])

  @jax.jit
  def run(params, teacher_params):
    teacher_out = models.teacher.apply({"params": teacher_params}, *inputs,
                                       return_hidden=hidden, return_attention=attention)

    def loss_fn(p):
      out = models.student.apply({"params": p["student"]}, *inputs, return_hidden=hidden,
                                 return_attention=attention)
      return loss(p["projectors"], out, teacher_out, batch["attention_mask"])[0]
    return jax.value_and_grad(loss_fn)(params)

  with jax.set_mesh(mesh):
    value, grads = run(state["params"], jax.tree_util.tree_map(jnp.asarray,
                                                               models.teacher_params))
  return float(value), jax.device_get(grads), jax.device_get(state["params"])


@pytest.fixture(scope="module")
def fp32_reference(teacher_dir):
  config = _config(teacher_dir)
  batch = _batch(config, 4, seed=0)
  return batch, _loss_and_grads(config, batch)


def test_remat_gives_the_same_loss_and_gradients(teacher_dir, fp32_reference):
  batch, (loss_fp32, grads_fp32, _) = fp32_reference
  loss_remat, grads_remat, _ = _loss_and_grads(
      _config(teacher_dir, **{"student.remat_policy": "full"}), batch)
  np.testing.assert_allclose(loss_remat, loss_fp32, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_remat), jax.tree_util.tree_leaves(grads_fp32),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_teacher_loss_within_bf16_rounding_of_fp32(teacher_dir, fp32_reference):
  batch, (loss_fp32, _, _) = fp32_reference
  loss_bf16, _, _ = _loss_and_grads(_config(teacher_dir, **{"teacher.dtype": "bfloat16"}),
                                    batch)
  assert loss_bf16 != loss_fp32  # the teacher really ran in bf16
  np.testing.assert_allclose(loss_bf16, loss_fp32, rtol=BF16_RTOL)


def test_bf16_student_computes_in_bf16_with_fp32_params(teacher_dir, fp32_reference):
  batch, (loss_fp32, _, _) = fp32_reference
  loss_bf16, grads, params = _loss_and_grads(
      _config(teacher_dir, **{"student.dtype": "bfloat16"}), batch)
  assert loss_bf16 != loss_fp32
  np.testing.assert_allclose(loss_bf16, loss_fp32, rtol=BF16_RTOL)
  # Master weights and their gradients stay fp32; only the compute is bf16.
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {np.dtype(np.float32)}
