"""`clipdistill`: image search, content moderation and zero-shot classification with an
exported student's ONNX files (onnxruntime + numpy + PIL; no JAX or torch at run time).

  clipdistill search   --model OUT --images DIR --query "a dog" --top-k 5
  clipdistill moderate --model OUT --labels violence,nudity,"hate speech" --threshold 0.7 IMG...
  clipdistill classify --model OUT --labels cat,dog,car IMG...
  clipdistill classify --model OUT --labels 'cat,"1,000 dollars"' IMG...   (CSV-style quoting)
  clipdistill classify --model OUT --labels-file labels.txt IMG...          (one label a line)

OUT is a directory written by `scripts/convert_to_pytorch.py --onnx` (or its onnx/ folder).
Add --int8 to use the int8 files (`--quantize int8 --onnx` at export). Where onnxruntime is
not installed, or OUT has only LiteRT files (`--tflite` at export), the LiteRT files run in
a LiteRT interpreter (pip install ai-edge-litert) instead; the fp32 files of both agree with
the student to 1e-4. A file that cannot be read as an image is skipped and reported on
stderr (and in the JSON output); the command fails only when no image at all could be used.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax import errors
from clipdistill_jax.data.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from clipdistill_jax.errors import UserError
from clipdistill_jax.export.onnx_runtime import ModelNotFoundError, OnnxCLIP

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATE = "a photo of {}"
# Softmax over the banned concepts alone always sums to 1, so some concept looks likely on
# any photo; a neutral alternative lets an ordinary image put its probability elsewhere.
DEFAULT_NEUTRAL = "a harmless everyday photo"
INDEX_FORMAT = 1


class CLIError(UserError):
  """A problem the user can fix; printed as one line, exit status 1."""


# --- inputs -------------------------------------------------------------------------------------

def split_list(text: str, option: str) -> list[str]:
  """A comma-separated list, CSV-style: "quote" an item holding a comma, "" for a quote.

  Items are stripped; empty ones dropped. CLIError for an unclosed or stray quote.
  """
  try:
    rows = list(csv.reader([text], skipinitialspace=True, strict=True))
  except csv.Error as e:
    raise CLIError(f"{option} {text!r}: {e}; quote an item holding a comma as "
                   f"{option} 'cat,\"1,000 dollars\"'.") from None
  return [item.strip() for row in rows for item in row if item.strip()]


def read_labels_file(path: str) -> list[str]:
  """One label a line (UTF-8; blank lines ignored; commas are part of the label)."""
  try:
    with open(Path(path).expanduser(), encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise CLIError(f"--labels-file {path}: cannot read it ({reason}).") from None


def parse_labels(text: str | None, labels_file: str | None = None) -> list[str]:
  """Labels from --labels (comma-separated, CSV quoting) or --labels-file (one a line)."""
  if labels_file is not None:
    labels, option = read_labels_file(labels_file), "--labels-file"
  else:
    labels, option = split_list(text or "", "--labels"), "--labels"
  if not labels:
    raise CLIError(f"{option} is empty: give comma-separated labels, e.g. --labels cat,dog, or "
                   "a file with one label a line (--labels-file).")
  duplicates = sorted({label for label in labels if labels.count(label) > 1})
  if duplicates:
    raise CLIError(f"{option} repeats {', '.join(duplicates)}.")
  return labels


def check_template(template: str) -> None:
  """CLIError unless `template` has exactly the one {} that str.format fills with a label."""
  if "{}" not in template:
    raise CLIError(f"--template {template!r} has no {{}} where the label goes, e.g. "
                   f"'{DEFAULT_TEMPLATE}'.")
  try:
    template.format("label")
  except (KeyError, IndexError, ValueError) as e:
    raise CLIError(f"--template {template!r} cannot be filled ({type(e).__name__}: {e}): it "
                   "takes one {} for the label and no other fields; write a literal brace as "
                   "{{ or }}.") from None


def prompts_for(labels: Sequence[str], template: str) -> list[str]:
  check_template(template)
  return [template.format(label) for label in labels]


def parse_max_pixels(text: str) -> int | None:
  """--max-image-pixels: a number of pixels, or 'none' (or 0) for no limit."""
  if text.strip().lower() == "none":
    return None
  try:
    value = int(text.replace("_", "").replace(",", ""))
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of pixels (or 'none')")
  return value or None


def list_images(folder: Path) -> list[Path]:
  """Image files under `folder` (recursive, hidden folders skipped), sorted."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [Path(root) / f for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
  return found


def expand_image_args(items: Sequence[str]) -> list[Path]:
  """IMAGE arguments: files as given (even missing ones: reported later), folders expanded."""
  paths: list[Path] = []
  for item in items:
    path = Path(item).expanduser()
    paths += list_images(path) if path.is_dir() else [path]
  return paths


def _importable(module: str) -> str | None:
  """None if `module` imports, else why not (one line)."""
  try:
    __import__(module)
  except ImportError as e:
    return str(e).splitlines()[0] if str(e) else f"{module} is not installed"
  return None


def load_model(args: argparse.Namespace) -> OnnxCLIP:
  """The ONNX files through onnxruntime; where onnxruntime is missing (or the export has
  only LiteRT files), the LiteRT files through a LiteRT interpreter; else a one-line why."""
  from clipdistill_jax.export import litert_runtime as lrt
  from clipdistill_jax.export.onnx_runtime import find_onnx_dir
  try:
    find_onnx_dir(args.model)
    has_onnx = True
  except ModelNotFoundError as e:
    has_onnx, onnx_missing = False, e
  try:
    lrt.find_litert_dir(args.model)
    has_litert = True
  except ModelNotFoundError:
    has_litert = False
  no_ort = _importable("onnxruntime")
  try:
    if has_onnx and (no_ort is None or not has_litert):
      if no_ort is not None:
        raise CLIError(f"onnxruntime is not available ({no_ort}) and {args.model} has no "
                       "LiteRT files to fall back on: pip install onnxruntime, or re-export "
                       "with --tflite.")
      return OnnxCLIP(args.model, int8=args.int8, threads=args.threads)
    if has_litert:
      try:
        lrt.interpreter_class()
      except ImportError as e:
        raise CLIError(f"{args.model} has LiteRT files but no runtime is installed "
                       f"({e}); or pip install onnxruntime with an --onnx export.") from e
      return lrt.LiteRTCLIP(args.model, int8=args.int8, threads=args.threads)
    raise CLIError(f"{onnx_missing} (or --tflite for LiteRT files)")
  except ModelNotFoundError as e:
    raise CLIError(str(e)) from e


def report_skipped(skipped: Sequence[tuple[str, str]]) -> None:
  if skipped:
    print(f"clipdistill: skipped {len(skipped)} file(s) that are not readable images:",
          file=sys.stderr)
    for path, reason in skipped:
      print(f"  {path}: {reason}", file=sys.stderr)


def encode_images_or_fail(model: OnnxCLIP, paths: Sequence[Path], batch_size: int,
                          max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                          ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
  if not paths:
    raise CLIError("no images given.")
  embeddings, encoded, skipped = model.encode_image_files(paths, batch_size, max_image_pixels)
  report_skipped(skipped)
  if not encoded:
    raise CLIError(f"none of the {len(paths)} image(s) could be read; see the reasons above.")
  return embeddings, encoded, skipped


# --- search: a cached index of a folder ------------------------------------------------------

def default_index_path(folder: Path, variant: str) -> Path:
  cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipdistill"
  key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
  return cache / f"index-{key}-{variant}.npz"


def _file_stamp(path: Path) -> tuple[int, int]:
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns


def load_index(path: Path, fingerprint: str) -> dict[str, tuple[tuple[int, int], np.ndarray]]:
  """{relative path: ((size, mtime_ns), embedding)} of a still-valid index, else {}."""
  if not path.exists():
    return {}
  try:
    with np.load(path, allow_pickle=False) as data:
      if int(data["format"]) != INDEX_FORMAT or str(data["fingerprint"]) != fingerprint:
        return {}  # another model (or index layout): embeddings are not comparable
      return {str(p): ((int(s), int(m)), e) for p, s, m, e in
              zip(data["paths"], data["sizes"], data["mtimes"], data["embeddings"], strict=True)}
  except Exception as e:  # truncated or foreign file: rebuild rather than fail the search
    print(f"clipdistill: ignoring unreadable index {path} ({type(e).__name__}: {e}); "
          "rebuilding it.", file=sys.stderr)
    return {}


def save_index(path: Path, fingerprint: str, entries: dict[str, tuple[tuple[int, int],
                                                                       np.ndarray]]) -> None:
  names = sorted(entries)
  dim = entries[names[0]][1].shape[-1] if names else 0
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, format=INDEX_FORMAT, fingerprint=fingerprint,
             paths=np.asarray(names, dtype=str),
             sizes=np.asarray([entries[n][0][0] for n in names], np.int64),
             mtimes=np.asarray([entries[n][0][1] for n in names], np.int64),
             embeddings=np.asarray([entries[n][1] for n in names], np.float32).reshape(-1, dim))
    os.replace(tmp, path)
  except OSError as e:
    print(f"clipdistill: could not write the index {path} ({e.strerror or e}); the next "
          "search will embed the folder again. Pass --index PATH to put it elsewhere.",
          file=sys.stderr)


def build_index(model: OnnxCLIP, folder: Path, index_path: Path, rebuild: bool,
                batch_size: int, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                ) -> tuple[list[str], np.ndarray, dict[str, Any]]:
  """(relative paths, embeddings, stats): embeds only files new or changed since last time."""
  if not folder.exists():
    raise CLIError(f"image folder {folder} does not exist.")
  if not folder.is_dir():
    raise CLIError(f"--images must be a folder; {folder} is a file (use classify for files).")
  files = list_images(folder)
  if not files:
    raise CLIError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}, "
                   "recursively).")
  fingerprint = model.fingerprint()
  cached = {} if rebuild else load_index(index_path, fingerprint)
  entries, todo, stamps = {}, [], {}
  for file in files:
    name = file.relative_to(folder).as_posix()
    try:
      stamps[name] = _file_stamp(file)
    except OSError:
      stamps[name] = (-1, -1)
    hit = cached.get(name)
    if hit is not None and hit[0] == stamps[name]:
      entries[name] = hit
    else:
      todo.append(file)
  skipped: list[tuple[str, str]] = []
  if todo:
    embeddings, encoded, skipped = model.encode_image_files(todo, batch_size, max_image_pixels)
    for path, embedding in zip(encoded, embeddings, strict=True):
      name = Path(path).relative_to(folder).as_posix()
      entries[name] = (stamps[name], embedding)
  report_skipped(skipped)
  if not entries:
    raise CLIError(f"none of the {len(files)} image(s) in {folder} could be read; see the "
                   "reasons above.")
  if todo or set(cached) != set(entries):
    save_index(index_path, fingerprint, entries)
  names = sorted(entries)
  stats = {"indexed": len(names), "embedded_now": len(todo) - len(skipped),
           "reused": len(names) - (len(todo) - len(skipped)), "index": str(index_path),
           "skipped": [{"image": p, "error": r} for p, r in skipped]}
  return names, np.stack([entries[n][1] for n in names]), stats


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
  if args.top_k < 1:
    raise CLIError("--top-k must be at least 1.")
  model = load_model(args)
  folder = Path(args.images).expanduser()
  index_path = Path(args.index) if args.index else default_index_path(folder, model.variant)
  names, embeddings, stats = build_index(model, folder, index_path, args.rebuild_index,
                                         args.batch_size, args.max_image_pixels)
  query = model.encode_texts([args.query])[0]
  scores = embeddings @ query
  order = np.argsort(-scores, kind="stable")[:args.top_k]
  results = [{"path": str(folder / names[i]), "score": float(scores[i])} for i in order]
  if not args.json:
    print(f"clipdistill: {stats['indexed']} images indexed ({stats['embedded_now']} embedded "
          f"now, {stats['reused']} from {index_path})", file=sys.stderr)
    for r in results:
      print(f"{r['score']:.4f}\t{r['path']}")
  return {"query": args.query, "results": results, **stats}


# --- moderate / classify -----------------------------------------------------------------------

def _prompt_probabilities(args: argparse.Namespace, prompts: Sequence[str]
                          ) -> tuple[OnnxCLIP, list[str], np.ndarray, list[tuple[str, str]]]:
  """The model, the images that could be encoded, their softmax over `prompts` [n, len(prompts)]
  and the (path, reason) pairs skipped: what classify and moderate both score."""
  model = load_model(args)
  embeddings, encoded, skipped = encode_images_or_fail(model, expand_image_args(args.images),
                                                       args.batch_size, args.max_image_pixels)
  return model, encoded, model.probabilities(embeddings, model.encode_texts(prompts)), skipped


def cmd_moderate(args: argparse.Namespace) -> dict[str, Any]:
  if not 0 < args.threshold <= 1:
    raise CLIError(f"--threshold {args.threshold} is not a probability in (0, 1].")
  labels = parse_labels(args.labels, args.labels_file)
  neutral = split_list(args.neutral, "--neutral") if args.neutral else []
  prompts = prompts_for(labels, args.template) + neutral
  model, encoded, probs, skipped = _prompt_probabilities(args, prompts)
  results = []
  for path, row in zip(encoded, probs, strict=True):
    label_probs = {label: float(p) for label, p in zip(labels, row, strict=False)}
    flagged = [label for label, p in label_probs.items() if p > args.threshold]
    results.append({"image": path, "flagged": flagged, "safe": not flagged,
                    "probabilities": label_probs,
                    "neutral_probability": float(row[len(labels):].sum())})
  return {"labels": labels, "neutral": neutral, "template": args.template,
          "threshold": args.threshold, "model": str(model.directory), "variant": model.variant,
          "results": results, "skipped": [{"image": p, "error": r} for p, r in skipped]}


def cmd_classify(args: argparse.Namespace) -> dict[str, Any]:
  if args.top_k < 1:
    raise CLIError("--top-k must be at least 1.")
  labels = parse_labels(args.labels, args.labels_file)
  prompts = prompts_for(labels, args.template)
  model, encoded, probs, skipped = _prompt_probabilities(args, prompts)
  results = []
  for path, row in zip(encoded, probs, strict=True):
    top = np.argsort(-row, kind="stable")[:args.top_k]
    results.append({"image": path, "label": labels[top[0]],
                    "top": [{"label": labels[i], "probability": float(row[i])} for i in top]})
    if not args.json:
      ranked = ", ".join(f"{labels[i]} {row[i]:.3f}" for i in top)
      print(f"{path}\t{ranked}")
  return {"labels": labels, "template": args.template, "results": results,
          "skipped": [{"image": p, "error": r} for p, r in skipped]}


# --- argument parsing --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="clipdistill", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", required=True,
                     help="exported directory (convert_to_pytorch.py --onnx or --tflite)")
    sub.add_argument("--int8", action="store_true", help="use the int8 ONNX files")
    sub.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    sub.add_argument("--threads", type=int, default=None,
                     help="CPU threads of the runtime (onnxruntime or LiteRT)")
    sub.add_argument("--max-image-pixels", type=parse_max_pixels,
                     default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                     help="skip larger images (default %(default)s, PIL's decompression-bomb "
                     "limit; 'none' or 0 for no limit)")

  def labels(sub: argparse.ArgumentParser, example: str) -> None:
    given = sub.add_mutually_exclusive_group(required=True)
    given.add_argument("--labels", help=f"comma-separated, e.g. {example}; quote a label "
                       'holding a comma: \'cat,"1,000 dollars"\'')
    given.add_argument("--labels-file", metavar="FILE", help="a text file, one label a line")

  search = commands.add_parser("search", help="find the images in a folder that best match "
                               "a text query (the folder is embedded once and cached)")
  common(search)
  search.add_argument("--images", required=True, help="folder of images (searched recursively)")
  search.add_argument("--query", required=True, help='text to search for, e.g. "a dog"')
  search.add_argument("--top-k", type=int, default=5)
  search.add_argument("--index", default=None,
                      help="index file (default: ~/.cache/clipdistill/index-<folder>.npz)")
  search.add_argument("--rebuild-index", action="store_true",
                      help="embed every image again instead of reusing the index")
  search.add_argument("--json", action="store_true", help="print JSON instead of lines")
  search.set_defaults(run=cmd_search)

  moderate = commands.add_parser("moderate", help="zero-shot flag images whose probability "
                                 "for a banned concept exceeds a threshold (JSON out)")
  common(moderate)
  labels(moderate, "violence,nudity,hate speech")
  moderate.add_argument("--threshold", type=float, default=0.7)
  moderate.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help="prompt for each label; {} is the label")
  moderate.add_argument("--neutral", default=DEFAULT_NEUTRAL,
                        help="comma-separated prompts (quoted like --labels) competing with "
                        "the labels but never flagged ('' for none: softmax over the labels "
                        "alone)")
  moderate.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
  moderate.set_defaults(run=cmd_moderate, json=True)

  classify = commands.add_parser("classify", help="zero-shot classification of images")
  common(classify)
  labels(classify, "cat,dog,car")
  classify.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help="prompt for each label; {} is the label")
  classify.add_argument("--top-k", type=int, default=3)
  classify.add_argument("--json", action="store_true", help="print JSON instead of lines")
  classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
  classify.set_defaults(run=cmd_classify)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.batch_size < 1:
    print("clipdistill: error: --batch-size must be at least 1.", file=sys.stderr)
    return 2
  try:
    result = args.run(args)
  except errors.USER_ERRORS as e:  # one line, no traceback (CLIPDISTILL_TRACEBACK=1: one)
    return errors.report(e, "clipdistill")
  if args.json:
    print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
