"""Manifests: the rows of a JSONL / CSV / TSV file listing images and their captions.

A manifest is JSONL (one {"image": path, "caption": text} object a line) or CSV/TSV with a
header row; read_manifest has the rules. Relative image paths are relative to the manifest's
folder; paths may be anything tf.io.gfile reads (local, gs://). local.py turns the rows into
tf.data record streams.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence

from clipdistill_jax.data.tf_pipeline import import_tf

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "jpg")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")
JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")
DELIMITERS = {".csv": ",", ".tsv": "\t"}
QUOTING = ("none", "csv")
_LOGGED_BAD_ROWS = 5  # bad rows logged one by one before only the total

logger = logging.getLogger(__name__)


class _BadRows:
  """Rows that cannot be read: a ValueError naming file and line, or (skip) counted."""

  def __init__(self, path: str, skip: bool, hint: str = ""):
    self.path, self.skip, self.hint = path, skip, hint
    self.count = 0

  def __call__(self, line: str | int, reason: str, layout: bool = False) -> None:
    """layout: the row's fields could not be told apart (where the quoting hint helps)."""
    where = f"{self.path}:{line}"
    if not self.skip:
      hint = self.hint if layout else ""
      raise ValueError(f"Manifest {where}: {reason}.{hint} Fix the row, or set "
                       "data.skip_bad_rows=True to skip such rows.")
    self.count += 1
    if self.count <= _LOGGED_BAD_ROWS:
      logger.warning("Manifest %s: skipping a bad row: %s.", where, reason)

  def log_total(self, num_rows: int) -> None:
    if self.count:
      logger.warning("Manifest %s: skipped %d bad row(s) of %d (data.skip_bad_rows=True).",
                     self.path, self.count, num_rows)


def read_manifest(path: str, *, image_key: str | None, caption_key: str | None,
                  label_key: str | None = None, quoting: str | None = None,
                  skip_bad_rows: bool = False) -> dict[str, list]:
  """{'image_path': [str], 'caption': [[str, ...]] (+ 'label': [int]) from a manifest.

  Every row keeps one or more captions, verbatim. Formats, by extension:
    * .jsonl / .ndjson / .json: one JSON object a line (blank lines ignored). A caption is a
      string or a list of strings (several captions of one image: training draws one per
      epoch, evaluation uses them all). Columns are the union of every row's keys.
    * .csv / .tsv: a header row naming the columns, then one row a line. `quoting`:
      'csv' (a field may be "quoted", with "" for a quote inside it: what pandas and
      Python's csv write) or 'none' (quotes are ordinary characters: CC3M's TSVs); default
      None: 'none' for .tsv, 'csv' for .csv. Every row must have as many fields as the
      header, and a row may not span lines (an unclosed quote would swallow the rows after
      it).
  Columns are found by name: image_key / caption_key, else the usual names (IMAGE_COLUMNS,
  CAPTION_COLUMNS).

  A bad row (invalid JSON; a JSON value that is not an object; a wrong number of fields; a
  stray or unclosed quote; an image path, caption or label of the wrong type) raises a
  one-line ValueError naming the file and line, or with skip_bad_rows=True is skipped,
  counted and logged. Rows without an image path or a caption, and rows whose captions are
  all empty or whitespace, are dropped with a warning giving the counts.
  Raises FileNotFoundError (no such file), KeyError (a column not found), ValueError (an
  unknown extension or quoting, text that is not UTF-8, no usable row).
  """
  tf = import_tf()
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"Manifest {path} does not exist; set data.path to a .jsonl/.csv.")
  with tf.io.gfile.GFile(path, "rb") as f:
    text = _decode_text(f.read(), path)
  extension = os.path.splitext(path)[1].lower()
  if extension in JSON_EXTENSIONS:
    if quoting is not None:
      raise ValueError(f"data.manifest_quoting={quoting!r} is for CSV/TSV manifests; {path} is "
                       "JSON lines. Leave it None.")
    bad = _BadRows(path, skip_bad_rows)
    rows = _json_rows(text, bad)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
  elif extension in DELIMITERS:
    quoting = quoting or ("none" if extension == ".tsv" else "csv")
    if quoting not in QUOTING:
      raise ValueError(f"data.manifest_quoting={quoting!r}; choose one of {QUOTING} (or None: "
                       "'none' for .tsv, 'csv' for .csv).")
    other = "none" if quoting == "csv" else "csv"
    bad = _BadRows(path, skip_bad_rows,
                   f" (Read with data.manifest_quoting={quoting!r}; if the file is quoted "
                   f"otherwise, set it to {other!r}.)")
    columns, rows = _delimited_rows(text, path, DELIMITERS[extension], quoting, bad)
  else:
    raise ValueError(f"Manifest {path}: unknown extension {extension!r}; use .jsonl, .csv or .tsv.")
  num_rows = len(rows) + bad.count
  if not num_rows:
    raise ValueError(f"Manifest {path} has no rows.")
  image_key = _pick_column(image_key, IMAGE_COLUMNS, columns, "image", path)
  caption_key = _pick_column(caption_key, CAPTION_COLUMNS, columns, "caption", path)
  if label_key is not None:
    _pick_column(label_key, (), columns, "label", path)

  base = os.path.dirname(path)
  out: dict[str, list] = {"image_path": [], "caption": []}
  if label_key is not None:
    out["label"] = []
  dropped = {"without an image path": 0, "without a caption": 0,
             "whose captions are all empty or whitespace": 0}
  for line, row in rows:
    image, captions = row.get(image_key), row.get(caption_key)
    if image is None or (isinstance(image, str) and not image.strip()):
      dropped["without an image path"] += 1
      continue
    if not isinstance(image, str):
      bad(line, f"the image path {image_key!r} is {_kind(image)}, not a string")
      continue
    if captions is None:
      dropped["without a caption"] += 1
      continue
    if isinstance(captions, str):
      captions = [captions]
    elif not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
      bad(line, f"the caption {caption_key!r} is {_kind(captions)}; give a string or a list "
          "of strings")
      continue
    captions = [c for c in captions if c.strip()]
    if not captions:
      dropped["whose captions are all empty or whitespace"] += 1
      continue
    if label_key is not None:
      label = _label(row.get(label_key))
      if label is None:
        bad(line, f"the label {label_key!r} is {_kind(row.get(label_key))}, not an integer")
        continue
      out["label"].append(label)
    out["image_path"].append(_resolve(image, base))
    out["caption"].append(captions)
  bad.log_total(num_rows)
  if any(dropped.values()):
    logger.warning("Manifest %s: dropped %d of %d rows: %s.", path, sum(dropped.values()),
                   num_rows, ", ".join(f"{n} {why}" for why, n in dropped.items() if n))
  if not out["image_path"]:
    raise ValueError(f"Manifest {path}: no row has both an image path ({image_key!r}) and a "
                     f"non-empty caption ({caption_key!r}).")
  return out


def _decode_text(data: bytes, path: str) -> str:
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"Manifest {path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                     "re-save the file as UTF-8.") from None


def _json_rows(text: str, bad: _BadRows) -> list[tuple[int, dict]]:
  """(line number, object) of every non-blank line."""
  rows = []
  # Lines end at "\n" only: str.splitlines would also split inside strings at U+2028 etc.
  for number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      bad(number, f"not valid JSON ({e.msg} at column {e.colno})")
      continue
    if not isinstance(row, dict):
      bad(number, f"{_kind(row)} in JSON, not an object such as "
          '{"image": "a.jpg", "caption": "a dog"}')
      continue
    rows.append((number, row))
  return rows


def _delimited_rows(text: str, path: str, delimiter: str, quoting: str, bad: _BadRows
                    ) -> tuple[list[str], list[tuple[int, dict]]]:
  """(header columns, [(line number, {column: field})]) of a CSV/TSV manifest."""
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True,
                      quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
  header: list[str] | None = None
  rows: list[tuple[int, dict]] = []
  while True:
    first_line = reader.line_num + 1
    try:
      fields = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      lines = _lines(first_line, reader.line_num)
      if header is None:
        raise ValueError(f"Manifest {path}:{lines}: cannot read the header row ({e}).") from None
      bad(lines, f"a stray or unclosed quote ({e})" if quoting == "csv"
          else f"cannot be read ({e})", layout=True)
      continue
    if not fields or not "".join(fields).strip():
      continue  # blank line
    lines = _lines(first_line, reader.line_num)
    if header is None:
      header = [name.strip() for name in fields]
      duplicates = sorted({name for name in header if header.count(name) > 1})
      if duplicates:
        raise ValueError(f"Manifest {path}:{lines}: the header row repeats {duplicates}.")
      continue
    if reader.line_num > first_line:
      bad(lines, "a quoted field spans lines (an unclosed quote swallows the rows after it)",
          layout=True)
    elif len(fields) != len(header):
      bad(lines, f"{len(fields)} fields where the header has {len(header)} ({header})",
          layout=True)
    else:
      rows.append((first_line, dict(zip(header, fields, strict=True))))
  return header or [], rows


def _lines(first: int, last: int) -> str:
  return str(first) if last <= first else f"{first}-{last}"


def _kind(value) -> str:
  names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
           int: "a number", float: "a number", type(None): "missing"}
  return names.get(type(value), type(value).__name__)


def _label(value) -> int | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, str):
    try:
      return int(value.strip())
    except ValueError:
      return None
  return None


def _pick_column(requested: str | None, candidates: Sequence[str], columns: Sequence[str],
                 what: str, path: str) -> str:
  header_hint = (" (the first line must be a header row naming the columns)"
                 if os.path.splitext(path)[1].lower() in DELIMITERS else "")
  if requested is not None:
    if requested not in columns:
      raise KeyError(f"Manifest {path} has no {what} column {requested!r}; columns: {columns}"
                     f"{header_hint}. Set data.{what}_key to one of them.")
    return requested
  for name in candidates:
    if name in columns:
      return name
  raise KeyError(f"Manifest {path}: no {what} column among {columns}{header_hint} (looked for "
                 f"{candidates}); set data.{what}_key.")


def _resolve(image_path: str, base: str) -> str:
  if "://" in image_path or os.path.isabs(image_path):
    return image_path
  return os.path.join(base, image_path)
