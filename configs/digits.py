r"""The real-data development benchmark: handwritten digits, a teacher that knows more.

    python scripts/make_digits.py --out /tmp/digits
    python -m clipdistill_jax.main --config configs/digits.py:/tmp/digits --workdir /tmp/dg
    python -m clipdistill_jax.main --config configs/digits.py:/tmp/digits --workdir /tmp/dg \
        --config.mode=ablation

Real labelled images (scikit-learn's 1,797 digits, upsampled to 64 px; make_digits.py) in
the demo's design: a teacher of the demo's shape is trained contrastively on all 1,297
training images ("a handwritten digit seven", ...), then the students are distilled from it
on the first data.num_train_examples of them, and the same student is trained without a
teacher on exactly those. Zero-shot on the 500 held-out images, one folder per class,
prompted with "a handwritten digit {}".

The student and recipe are the demo's (4 x 64 vision tower, FD 200 + ICL, inherited
weights, 500 steps): 95.4 +- 0.7% top-1 over 3 seeds, 99.6% of the teacher's 95.8%, 95.2%
agreement, 15.7 points above the no-teacher student (README, "Ablation").

Every stage trains on random square crops of at least 70% of the image (data.crop_min_scale;
no flips: a mirrored digit is another glyph). On 300 images the augmentation is what lets the
teacher's knowledge through: the previous student (2 x 64 vision, clip_kd_inherit) kept 80%
of a teacher trained without crops (79.0% top-1), and 97% of the one trained with them.

The argument after the colon is the directory make_digits.py wrote.
"""

import importlib.util
import os


def _demo():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  spec = importlib.util.spec_from_file_location("clipdistill_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(data_dir: str = "/tmp/digits"):
  c = _demo()
  c.data.update(dict(source="manifest", path=os.path.join(data_dir, "train.jsonl"),
                     caption_key="caption", image_key="image", num_train_examples=300,
                     crop_min_scale=0.7))
  c.experiment.teacher_steps = 800  # 79 epochs of the 1,297 training images
  c.train.total_steps = 500
  c.ablation.update(dict(recipes=("fd_icl_inherit:loss.weights.fd=200.0", "clip_kd_inherit"),
                         steps=(500,), seeds=(0, 1, 2), baseline_steps=(500,)))
  c.eval.update(dict(zero_shot=(f"folder:{os.path.join(data_dir, 'test')}",),
                     templates="a handwritten digit {}", max_examples=500, batch_size=250,
                     retrieval=False))
  return c
