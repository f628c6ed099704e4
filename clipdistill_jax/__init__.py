"""clipdistill_jax: distill CLIP ViT-B/32 into a small student with JAX/Flax."""

import os

# transformers is only used for its PyTorch side and file formats; keep it from importing
# TensorFlow (~15 s) or looking for Flax classes it no longer has.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")

__version__ = "0.1.0"
