r"""A tiny contrastive run on synthetic captions: the trainer's smoke test (seconds).

    python -m clipdistill_jax.main --config configs/tiny_train.py --workdir /tmp/tiny

No teacher: the student (tiny_config) learns from captions alone. Tests override fields.
"""

from clipdistill_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.teacher.source = None
  c.student.arch, c.student.base = "teacher", "tiny"
  c.data.source = "synthetic"
  c.optim.update(dict(lr=1e-3, warmup_steps=5, weight_decay=0.1))
  c.train.update(dict(total_steps=20, batch_size=16, log_every=5, checkpoint_every=10,
                      keep_checkpoints=2))
  c.eval.update(dict(every=10, zero_shot=("synthetic",), max_examples=256, batch_size=64))
  return c
