"""The tfds branch of load_zero_shot_dataset, on tfds' offline mock data (imports TensorFlow,
hence its own file)."""

import numpy as np
import pytest

from clipdistill_jax.eval import prompts
from clipdistill_jax.eval.datasets import load_zero_shot_dataset

tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_dataset_on_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=9):
    dataset = load_zero_shot_dataset("cifar10", "test", image_size=24, data_dir=str(tmp_path),
                                     max_examples=7)
    assert dataset.class_names == prompts.CIFAR10_CLASSNAMES
    assert dataset.templates == prompts.CIFAR_TEMPLATES
    batches = list(dataset.batches(4))
  assert [len(labels) for _, labels in batches] == [4, 3]
  images = np.concatenate([images for images, _ in batches])
  assert images.shape == (7, 24, 24, 3) and images.dtype == np.float32
  # CLIP-normalized pixels: within (0 - mean) / std and (1 - mean) / std.
  assert images.min() >= -1.8 and images.max() <= 2.2 and images.std() > 0.1
  labels = np.concatenate([labels for _, labels in batches])
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
  assert dataset.num_skipped == 0


def test_tfds_dataset_not_prepared_says_how_to_prepare(tmp_path):
  dataset = load_zero_shot_dataset("cifar10", "test", image_size=24, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    next(dataset.batches(4))
