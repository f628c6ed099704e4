"""clipdistill_jax: distill CLIP ViT-B/32 into a small student with JAX/Flax.

The public API (README, "Python API"):

    from clipdistill_jax import CLIPModel, load_pretrained, load_tokenizer, preprocess_images
    config, params = load_pretrained("openai/clip-vit-base-patch32")   # or a local directory
    model = CLIPModel(config)

  models     CLIPModel, CLIPConfig, load_pretrained, save_pretrained (HF's file format)
  inputs     load_tokenizer (CLIP BPE), preprocess_image / preprocess_images (resize, crop,
             normalize: what the model was trained on)
  encoding   encode_images, encode_texts, zero_shot_classifier (batched, jitted, mesh-aware)
  runs       base_config (every knob), run_train (one run: train.train), run_experiment
             (teacher vs distilled vs no-teacher), run_ablation (recipes x steps x seeds); the
             names of their modules (train, experiment, ablation) stay the modules

Names are imported on first use, so `import clipdistill_jax` (and the `clipdistill`
command) stays fast and imports neither JAX nor TensorFlow.
"""

import importlib
import os

# transformers is only used for its PyTorch side and file formats; keep it from importing
# TensorFlow (~15 s) or looking for Flax classes it no longer has.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")

__version__ = "0.1.0"

# name -> (module, attribute)
_LAZY = {
    "CLIPModel": ("models.clip", "CLIPModel"),
    "CLIPConfig": ("models.config", "CLIPConfig"),
    "load_pretrained": ("models.hf", "load_pretrained"),
    "save_pretrained": ("models.hf", "save_pretrained"),
    "load_tokenizer": ("data.tokenizer", "load_tokenizer"),
    "preprocess_image": ("data.preprocess", "preprocess_image"),
    "preprocess_images": ("data.preprocess", "preprocess_images"),
    "encode_images": ("eval.encode", "encode_images"),
    "encode_texts": ("eval.encode", "encode_texts"),
    "zero_shot_classifier": ("eval.encode", "zero_shot_classifier"),
    "base_config": ("config_lib", "base_config"),
    "run_train": ("train", "train"),
    "run_experiment": ("experiment", "run"),
    "run_ablation": ("ablation", "run"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *_LAZY})
