r"""Writes the real-data development set: scikit-learn's 1,797 handwritten digits as images.

    python scripts/make_digits.py --out /tmp/digits
    python -m clipdistill_jax.main --config configs/digits.py:/tmp/digits --workdir /tmp/dg \
        --config.mode=ablation

The digits (UCI's optical recognition set, 8x8 at 17 grey levels, shipped inside the
scikit-learn wheel: nothing is downloaded) are upsampled to 64 px, shuffled with a fixed
seed and split: OUT/train.jsonl (1,297 rows, captions in words from several templates,
"a handwritten digit seven") and OUT/test/<class>/ (500 held-out images, one folder per
class name, read as a 'folder:' zero-shot set). The teacher trains on all of train.jsonl,
the students on its first data.num_train_examples rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten digit {}", "the number {} written by hand",
                     "a scan of a handwritten {}", "a black and white image of the digit {}",
                     "a {} written with a pen")
EVAL_TEMPLATE = "a handwritten digit {}"
NUM_TEST = 500
IMAGE_SIZE = 64


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0, help="shuffle and caption seed")
  args = parser.parse_args()
  from sklearn.datasets import load_digits

  digits = load_digits()
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(digits.target))
  out = Path(args.out)
  (out / "train").mkdir(parents=True, exist_ok=True)
  rows = []
  for rank, i in enumerate(order):
    # 0..16 ink levels -> 0..255, white ink on black as the scans are stored, then 64 px.
    pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE),
                                                      Image.Resampling.BICUBIC).convert("RGB")
    name = CLASS_NAMES[digits.target[i]]
    if rank < NUM_TEST:
      folder = out / "test" / name
      folder.mkdir(parents=True, exist_ok=True)
      image.save(folder / f"{i:04d}.png")
    else:
      image.save(out / "train" / f"{i:04d}.png")
      template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
      rows.append({"image": f"train/{i:04d}.png", "caption": template.format(name),
                   "label": int(digits.target[i])})
  with open(out / "train.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  print(f"wrote {len(rows)} training rows to {out / 'train.jsonl'} and {NUM_TEST} test images "
        f"to {out / 'test'}")


if __name__ == "__main__":
  main()
