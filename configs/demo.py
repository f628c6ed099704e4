r"""The offline demo: the article's experiment in miniature, end to end on a laptop CPU.

    python -m clipdistill_jax.main --config configs/demo.py --workdir /tmp/demo

Nothing is downloaded. A small CLIP teacher is first trained contrastively on synthetic
captions ("a small red circle on the left on a dark background"); a smaller student is then
distilled from it, and the same student is trained without a teacher (contrastive only) for
the same steps, data, schedule and seed. All three are evaluated on the held-out synthetic
test split (zero-shot over 48 colour x shape classes, "a photo of a red circle."; caption
retrieval; agreement with the teacher; size, latency, memory), and the table and plots are
written to WORKDIR/report. Rerunning resumes whatever was not finished.

Student: 4x fewer parameters in each tower than the teacher (plus the shared vocabulary).
"""

from clipdistill_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.mode = "experiment"

  # The geometry both models share: 64 px images in 16 px patches, 24-token captions.
  c.student.update(dict(base="tiny", image_size=64, patch_size=16, context_length=24))
  c.experiment.update(dict(
      teacher_steps=800, teacher_lr=1e-3,
      teacher_arch=dict(projection_dim=64, text_hidden_size=64, text_intermediate_size=256,
                        text_layers=3, text_heads=4, vision_hidden_size=128,
                        vision_intermediate_size=512, vision_layers=4, vision_heads=4)))
  c.teacher.source = None  # trained by the experiment's first stage
  c.student.arch = "custom"
  c.student.custom = dict(projection_dim=32, text_hidden_size=32, text_intermediate_size=128,
                          text_layers=2, text_heads=2, vision_hidden_size=64,
                          vision_intermediate_size=256, vision_layers=2, vision_heads=2)

  c.loss.weights = dict(feature=1.0, hidden=0.5, logit_kl=1.0, attention=0.5, contrastive=0.1)
  c.loss.temperature = 2.0
  c.loss.hidden_layers = "uniform"
  c.loss.attention_layers = "uniform"

  c.data.source = "synthetic"
  c.data.num_eval_examples = 960
  c.optim.update(dict(lr=2e-3, warmup_steps=50, weight_decay=0.05, grad_clip_norm=1.0))
  c.train.update(dict(total_steps=500, batch_size=128, log_every=50, checkpoint_every=250,
                      keep_checkpoints=2))
  c.eval.update(dict(every=250, zero_shot=("synthetic",), max_examples=960, batch_size=240,
                     retrieval=True, stats_repeats=5))
  return c
