"""Zero-shot prompt templates and class names, selectable by name.

A template is a string with one `{}` where the class name goes. CLIP builds one classifier
row per class by averaging the text embeddings of every template filled with that class name
(see encode.zero_shot_classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

from clipdistill_jax.eval.imagenet_classnames import IMAGENET_CLASSNAMES

# The 80 ImageNet templates of OpenAI's prompt-engineering notebook (github.com/openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb; MIT), in open_clip's order.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# The 7-template subset the same notebook found nearly as good as all 80 (cheaper on CPU).
SIMPLE_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)

# CLIP's CIFAR-10/100 templates (github.com/openai/CLIP, data/prompts.md).
CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)

PHOTO_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "photo": PHOTO_TEMPLATES,
}

# What CLIP's paper used per dataset; anything else (e.g. a local folder) gets "a photo of a".
DATASET_TEMPLATES: dict[str, str] = {
    "imagenet2012": "openai_imagenet",
    "imagenet_v2": "openai_imagenet",
    "cifar10": "cifar",
    "cifar100": "cifar",
}

# Datasets whose tfds label names are ids rather than words.
DATASET_CLASSNAMES: dict[str, tuple[str, ...]] = {
    "imagenet2012": IMAGENET_CLASSNAMES,
    "imagenet_v2": IMAGENET_CLASSNAMES,
}

# CIFAR label names, identical to what a prepared tfds cifar10/cifar100 lists (underscores as
# spaces). Used when the dataset info carries only numbers (tfds sets the names while
# preparing the data, so e.g. tfds.testing.mock_data has none).
CIFAR10_CLASSNAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSNAMES: tuple[str, ...] = tuple(name.replace("_", " ") for name in """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split())
FALLBACK_CLASSNAMES: dict[str, tuple[str, ...]] = {
    "cifar10": CIFAR10_CLASSNAMES,
    "cifar100": CIFAR100_CLASSNAMES,
}


def _base_name(dataset: str) -> str:
  """'imagenet_v2/matched-frequency:3.0.0' -> 'imagenet_v2'; 'folder:/x' -> 'folder'."""
  return dataset.split(":", 1)[0].split("/", 1)[0]


def get_templates(name_or_dataset: str | Sequence[str]) -> tuple[str, ...]:
  """Templates by set name ('openai_imagenet', 'simple_imagenet', 'cifar', 'photo'), by
  dataset name (its CLIP-paper default), or an explicit list of '{}' templates passed through.
  """
  if not isinstance(name_or_dataset, str):
    templates = tuple(name_or_dataset)
    for template in templates:
      _check_template(template)
    return templates
  if name_or_dataset in TEMPLATE_SETS:
    return TEMPLATE_SETS[name_or_dataset]
  if "{}" in name_or_dataset:
    return (_check_template(name_or_dataset),)
  return TEMPLATE_SETS[DATASET_TEMPLATES.get(_base_name(name_or_dataset), "photo")]


def _check_template(template: str) -> str:
  if isinstance(template, str) and template.count("{}") == 1:
    try:
      template.format("x")  # other braces ('{style}', '{0}') would fail at evaluation
      return template
    except (IndexError, KeyError, ValueError):
      pass
  raise ValueError(f"Template {template!r} must be a string with exactly one '{{}}' where the "
                   "class name goes (and no other braces), e.g. 'a photo of a {}.'.")


def eval_templates(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
  """config.eval.templates checked and resolved: None (each dataset's own), a template-set
  name (TEMPLATE_SETS), one '{}' template, or a list/tuple of them (from a config file, or a
  command line such as --config.eval.templates="('a photo of a {}.', 'a picture of a {}.')").

  Unlike get_templates, a string that is neither a set name nor a template is an error (a
  typo must not fall back to 'a photo of a {}.'). Raises ValueError naming the fix; called
  before training so that a bad list fails in seconds, not at the first evaluation.
  """
  if value is None:
    return None
  example = ("e.g. --config.eval.templates=\"('a photo of a {}.', 'a picture of a {}.')\", "
             f"or one of the sets {sorted(TEMPLATE_SETS)}")
  if isinstance(value, str):
    if value in TEMPLATE_SETS:
      return TEMPLATE_SETS[value]
    if "{}" not in value:
      raise ValueError(f"eval.templates={value!r} is neither a template set nor a template with "
                       f"'{{}}'; {example}.")
    try:
      return (_check_template(value),)
    except ValueError as e:
      raise ValueError(f"eval.templates: {e} For several templates give a list, {example}."
                       ) from None
  if not isinstance(value, Sequence) or not value:
    raise ValueError(f"eval.templates={value!r}: give a non-empty list of '{{}}' templates, "
                     f"{example}.")
  try:
    return tuple(_check_template(template) for template in value)
  except ValueError as e:
    raise ValueError(f"eval.templates: {e}") from None


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major list of prompts: all templates of class 0, then class 1, ..."""
  return [template.format(name) for name in class_names for template in templates]


def readable_class_names(dataset: str, label_names: Sequence[str]) -> tuple[str, ...]:
  """Class names to put in prompts: CLIP's list where the labels are ids, else the label names
  with underscores as spaces (tfds cifar100: 'aquarium_fish' -> 'aquarium fish')."""
  base = _base_name(dataset)
  known = DATASET_CLASSNAMES.get(base)
  if known is None and all(str(name).isdigit() for name in label_names):
    known = FALLBACK_CLASSNAMES.get(base)
  if known is not None:
    if len(known) != len(label_names):
      raise ValueError(f"{dataset} has {len(label_names)} labels but the class-name list has "
                       f"{len(known)}; pass class names explicitly.")
    return known
  return tuple(str(name).replace("_", " ") for name in label_names)
