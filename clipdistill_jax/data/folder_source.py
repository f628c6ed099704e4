"""Labelled photos in class folders: ROOT/<class>/<image>, one subfolder per class.

    data.source = 'folder', data.path = '/data/pets/train'   (training; captions by templates)
    eval.zero_shot = ('folder:/data/pets/test',)             (zero-shot evaluation)

Both read the folder through list_class_folder: classes are the subfolders in sorted order
(label i = the i-th), images every file with an IMAGE_EXTENSIONS suffix below a class
folder, at any depth, in sorted order; hidden files and folders are ignored. A class name
in prompts is its folder name with underscores as spaces ('golden_retriever' -> 'golden
retriever'), unless data.class_names gives the names.

For training the folder becomes manifest rows {image_path, label} (no caption): each read
of an image draws one of data.templates, seeded like a caption list's draw, and fills it
with the class name. Order, host sharding and exact resume are the manifest's
(local.manifest_train_records).
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_class_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class folder names sorted, [(image path, label)] in sorted order) of ROOT/<class>/...

  Raises FileNotFoundError when root is not a directory or holds no images.
  """
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a directory; a class folder set wants "
                            "PATH/<class>/<image> files, one subfolder per class.")
  classes = sorted(entry.name for entry in os.scandir(root)
                   if entry.is_dir() and not entry.name.startswith("."))
  files = []
  for label, class_dir in enumerate(classes):
    for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, class_dir))):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      files += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  if not files:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/; "
                            f"found class folders {classes[:10]}.")
  return classes, files


def class_folder_rows(root: str, class_names=None) -> tuple[dict[str, list], tuple[str, ...]]:
  """({'image_path': [str], 'label': [int]}, class names for prompts) of a class folder.

  class_names: the names to use instead of the folder names (one per class folder, in sorted
  folder order); ValueError when their number differs.
  """
  from clipdistill_jax.eval.prompts import readable_class_names

  classes, files = list_class_folder(root)
  if class_names is not None:
    if len(class_names) != len(classes):
      raise ValueError(f"data.class_names has {len(class_names)} names but {root} has "
                       f"{len(classes)} class folders ({classes[:10]}); give one name per "
                       "folder, in sorted folder order.")
    names = tuple(class_names)
  else:
    names = readable_class_names("folder", classes)
  return ({"image_path": [path for path, _ in files], "label": [label for _, label in files]},
          names)
