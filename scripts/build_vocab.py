"""Rebuild the packaged CLIP tokenizer files from the MIT-licensed BPE table in open-clip-torch.

The CLIP byte-pair table (`bpe_simple_vocab_16e6.txt.gz`, from openai/CLIP, MIT) ships inside
the open-clip-torch wheel, so the tokenizer can be rebuilt from PyPI alone, without the model
hub. This writes, into clipdistill_jax/data/assets/ (or --out):

  vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, BPE_LICENSE.txt

in the layout of openai/clip-vit-base-patch32, so `CLIPTokenizer.from_pretrained(dir)` loads it.

  python scripts/build_vocab.py                              # pip download open-clip-torch
  python scripts/build_vocab.py --wheel open_clip_torch-3.3.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# openai/CLIP's simple_tokenizer keeps lines 1..48894: 49152 - 256 byte symbols - 2 specials.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
DEFAULT_OUT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clipdistill_jax", "data", "assets"
)

OPENAI_CLIP_LICENSE = """\
MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable-unicode table, in the order openai CLIP's vocabulary uses."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  byte_values = printable[:]
  code_points = printable[:]
  extra = 0
  for b in range(256):
    if b not in byte_values:
      byte_values.append(b)
      code_points.append(256 + extra)
      extra += 1
  return dict(zip(byte_values, [chr(c) for c in code_points], strict=True))


def read_bpe_lines(wheel_path: str) -> tuple[list[str], str]:
  """Returns the decompressed BPE table's lines and the wheel's own LICENSE text."""
  with zipfile.ZipFile(wheel_path) as wheel:
    names = wheel.namelist()
    if BPE_MEMBER not in names:
      raise SystemExit(f"{wheel_path} has no {BPE_MEMBER}; pass an open-clip-torch wheel.")
    lines = gzip.decompress(wheel.read(BPE_MEMBER)).decode("utf-8").split("\n")
    license_names = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    license_names += [n for n in names if n.endswith(".dist-info/LICENSE")]
    wheel_license = wheel.read(license_names[0]).decode("utf-8") if license_names else ""
  return lines, wheel_license


def build_vocab_and_merges(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
  """Applies openai CLIP's rule: byte symbols, byte symbols + '</w>', merges, specials."""
  merges = bpe_lines[1 : NUM_MERGES + 1]
  if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
    raise SystemExit(f"BPE table has an unexpected layout (wanted {NUM_MERGES} pair lines).")
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols]
  tokens += ["".join(m.split()) for m in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE:
    raise SystemExit(f"Built {len(vocab)} unique tokens from {len(tokens)}; expected {VOCAB_SIZE}.")
  return vocab, merges


def _special_token(content: str) -> dict:
  return {
    "content": content,
    "lstrip": False,
    "normalized": True,
    "rstrip": False,
    "single_word": False,
    "special": True,
  }


def tokenizer_config(vocab: dict[str, int]) -> dict:
  return {
    "add_prefix_space": False,
    "added_tokens_decoder": {
      str(vocab[BOS_TOKEN]): _special_token(BOS_TOKEN),
      str(vocab[EOS_TOKEN]): _special_token(EOS_TOKEN),
    },
    "bos_token": BOS_TOKEN,
    "clean_up_tokenization_spaces": False,
    "do_lower_case": True,
    "eos_token": EOS_TOKEN,
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": EOS_TOKEN,
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": EOS_TOKEN,
  }


def special_tokens_map() -> dict:
  token = lambda content: {k: v for k, v in _special_token(content).items() if k != "special"}
  return {
    "bos_token": token(BOS_TOKEN),
    "eos_token": token(EOS_TOKEN),
    "pad_token": EOS_TOKEN,
    "unk_token": token(EOS_TOKEN),
  }


def license_note(wheel_name: str, wheel_license: str) -> str:
  note = (
    "clipdistill_jax/data/assets/{vocab.json,merges.txt} are derived by scripts/build_vocab.py\n"
    "from bpe_simple_vocab_16e6.txt.gz, the byte-pair table of OpenAI's CLIP\n"
    "(github.com/openai/CLIP, MIT License), as redistributed in the open_clip package\n"
    f"(github.com/mlfoundations/open_clip, MIT License; read from {wheel_name}).\n\n"
    "=== openai/CLIP license ===\n\n" + OPENAI_CLIP_LICENSE
  )
  if wheel_license:
    note += "\n=== open_clip license ===\n\n" + wheel_license.rstrip() + "\n"
  return note


def download_wheel(dest: str) -> str:
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--dest",
    dest,
    "open-clip-torch",
  ]
  subprocess.run(cmd, check=True)
  wheels = glob.glob(os.path.join(dest, "open_clip_torch-*.whl"))
  if not wheels:
    raise SystemExit(f"pip download left no open_clip_torch wheel in {dest}; pass --wheel PATH.")
  return wheels[0]


def write_assets(wheel_path: str, out_dir: str) -> None:
  bpe_lines, wheel_license = read_bpe_lines(wheel_path)
  vocab, merges = build_vocab_and_merges(bpe_lines)
  os.makedirs(out_dir, exist_ok=True)

  def write_json(name: str, obj: dict) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=2 if name != "vocab.json" else None)
      f.write("\n")

  write_json("vocab.json", vocab)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  write_json("tokenizer_config.json", tokenizer_config(vocab))
  write_json("special_tokens_map.json", special_tokens_map())
  with open(os.path.join(out_dir, "BPE_LICENSE.txt"), "w", encoding="utf-8") as f:
    f.write(license_note(os.path.basename(wheel_path), wheel_license))
  print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out_dir}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--wheel", help="open-clip-torch wheel; default: pip download it")
  parser.add_argument("--out", default=DEFAULT_OUT, help="output dir (default: packaged assets)")
  args = parser.parse_args(argv)
  if args.wheel:
    write_assets(args.wheel, args.out)
    return
  with tempfile.TemporaryDirectory() as tmp:
    write_assets(download_wheel(tmp), args.out)


if __name__ == "__main__":
  main()
