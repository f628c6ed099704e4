r"""A tiny distillation config for the loop and input benchmarks, where host overhead shows.

    python scripts/benchmark.py --config=configs/bench_tiny.py --teacher=tiny \
        --batch_size=64 --variants=loop,input

The student is the tiny teacher's shape (models.config.tiny_config, 32 px), trained with the
article's losses (hidden states and attention at uniformly mapped layers): a step of a few
milliseconds, so whatever the loop adds per step is visible in loop_efficiency.
"""

from clipdistill_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.student.arch, c.student.base = "teacher", "tiny"
  c.loss.hidden_layers, c.loss.attention_layers = "uniform", "uniform"
  c.optim.update(dict(lr=1e-3, warmup_steps=5))
  c.train.update(dict(total_steps=200, batch_size=64, log_every=10, checkpoint_every=100))
  c.evals, c.eval.zero_shot = (), ()
  return c
