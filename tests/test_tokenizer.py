"""The offline CLIP tokenizer: packaged BPE files, ids, padding, truncation, save/load."""

import gzip
import importlib.util
import json
import os
import time
import zipfile

import numpy as np
import pytest
import regex

from clipdistill_jax.data import caches
from clipdistill_jax.data import tokenizer as tokenizer_lib
from clipdistill_jax.data.tokenizer import ASSETS_DIR, Tokenizer, load_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS = 49406, 49407

CAPTIONS = [
  "a photo of a cat",
  "A PHOTO OF A CAT",
  "",
  "   ",
  "hello!!! what's up? it's 3:45pm -- ok... (really) [yes] {no} #tag @user $5 50% a&b",
  "they'll say we've done it; i'd've thought you're right, isn't it?",
  "Café au lait, naïve résumé, ÅNGSTRÖM, straße",
  "日本の猫と東京タワー",
  "emoji 🐱🐶🚀 and ☕",
  "  lots\tof\n\nwhitespace   here  ",
  "numbers 1234567 and 3.14159 and 1e-9",
  "an html &amp; entity and <b>tags</b>",
  "text with <|endoftext|> inside it",
  "supercalifragilisticexpialidocious antidisestablishmentarianism",
  " ".join(f"word{i}" for i in range(120)),
  "the quick brown fox jumps over the lazy dog " * 20,
]


def _load_build_vocab():
  spec = importlib.util.spec_from_file_location(
    "build_vocab", os.path.join(REPO_ROOT, "scripts", "build_vocab.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def build_vocab():
  return _load_build_vocab()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return load_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
  from transformers import CLIPTokenizer

  return CLIPTokenizer.from_pretrained(ASSETS_DIR)


def _merges() -> list[str]:
  with open(os.path.join(ASSETS_DIR, "merges.txt"), encoding="utf-8") as f:
    lines = f.read().split("\n")
  assert lines[0] == "#version: 0.2"
  return [line for line in lines[1:] if line]


class OpenAIReferenceBPE:
  """openai/CLIP simple_tokenizer's BPE (minus ftfy), with a vocab built from merges.txt only."""

  pattern = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
  )

  def __init__(self, byte_encoder: dict[int, str], merges: list[str]):
    self.byte_encoder = byte_encoder
    pairs = [tuple(m.split()) for m in merges]
    self.ranks = {pair: i for i, pair in enumerate(pairs)}
    symbols = list(byte_encoder.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs]
    self.encoder = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}

  def bpe(self, token: str) -> list[str]:
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return list(word)

  def encode(self, text: str) -> list[int]:
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = [self.encoder["<|startoftext|>"]]
    for piece in regex.findall(self.pattern, text):
      piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self.bpe(piece))
    return ids + [self.encoder["<|endoftext|>"]]


# ---------------------------------------------------------------- packaged files


def test_assets_follow_the_openai_vocabulary_rule(build_vocab):
  with open(os.path.join(ASSETS_DIR, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  merges = _merges()
  assert len(merges) == 48894
  assert len(vocab) == 49408
  symbols = list(build_vocab.bytes_to_unicode().values())
  assert [vocab[s] for s in symbols] == list(range(256))
  assert [vocab[s + "</w>"] for s in symbols] == list(range(256, 512))
  assert vocab["".join(merges[0].split())] == 512
  assert vocab["".join(merges[-1].split())] == 49405
  assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
  assert os.path.isfile(os.path.join(ASSETS_DIR, "BPE_LICENSE.txt"))


def test_build_vocab_reproduces_packaged_assets(build_vocab, tmp_path):
  # A stand-in wheel holding the same BPE table (header + merges) must rebuild every
  # packaged tokenizer file byte for byte.
  table = "\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *_merges(), "extra rank1 lines"])
  wheel = tmp_path / "open_clip_torch-0.0.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr(build_vocab.BPE_MEMBER, gzip.compress(table.encode("utf-8")))
    zf.writestr("open_clip_torch-0.0.0.dist-info/licenses/LICENSE", "MIT stand-in\n")
  out = tmp_path / "assets"
  build_vocab.main(["--wheel", str(wheel), "--out", str(out)])
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
    with open(out / name, "rb") as rebuilt, open(os.path.join(ASSETS_DIR, name), "rb") as packaged:
      assert rebuilt.read() == packaged.read(), name
  assert "MIT stand-in" in (out / "BPE_LICENSE.txt").read_text()


# ---------------------------------------------------------------- ids


def test_known_ids(tok):
  ids, mask = tok(["a photo of a cat", "a diagram", "a dog"], context_length=7)
  np.testing.assert_array_equal(ids[0], [BOS, 320, 1125, 539, 320, 2368, EOS])
  np.testing.assert_array_equal(ids[1], [BOS, 320, 22697, EOS, EOS, EOS, EOS])
  np.testing.assert_array_equal(ids[2], [BOS, 320, 1929, EOS, EOS, EOS, EOS])
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS, EOS, EOS, 49408)


@pytest.mark.parametrize("context_length", [77, 16])
def test_matches_transformers(tok, hf_tok, context_length):
  ids, mask = tok(CAPTIONS, context_length=context_length)
  ref = hf_tok(CAPTIONS, padding="max_length", truncation=True, max_length=context_length)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape == (len(CAPTIONS), context_length)
  np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"]))


def test_matches_openai_reference_bpe(tok, build_vocab):
  reference = OpenAIReferenceBPE(build_vocab.bytes_to_unicode(), _merges())
  # The reference skips ftfy/html cleanup, so leave out text that those would change.
  captions = [c for c in CAPTIONS if "<|" not in c and "&" not in c]
  ids, mask = tok(captions, context_length=400)
  for row, row_mask, caption in zip(ids, mask, captions, strict=True):
    assert row[row_mask == 1].tolist() == reference.encode(caption), caption


def test_padding_and_mask(tok):
  ids, mask = tok(["a photo of a cat", ""], context_length=77)
  np.testing.assert_array_equal(mask.sum(1), [7, 2])
  np.testing.assert_array_equal(ids[1, :2], [BOS, EOS])
  assert (ids[0, 7:] == tok.pad_id).all() and (mask[0, 7:] == 0).all()
  # HF's text tower pools at argmax(input_ids): padding with EOS keeps that the first EOS.
  np.testing.assert_array_equal(ids.argmax(1), [6, 1])


def test_truncation_keeps_eos_last(tok):
  long_text = "the quick brown fox jumps over the lazy dog " * 10
  full, _ = tok([long_text], context_length=400)
  ids, mask = tok([long_text], context_length=16)
  assert mask.all()
  np.testing.assert_array_equal(ids[0, :15], full[0, :15])
  assert ids[0, -1] == EOS and (ids[0, :-1] != EOS).all()


def test_input_validation(tok):
  single, _ = tok("a photo of a cat", context_length=8)
  batch, _ = tok(["a photo of a cat"], context_length=8)
  np.testing.assert_array_equal(single, batch)
  empty_ids, empty_mask = tok([], context_length=16)
  assert empty_ids.shape == empty_mask.shape == (0, 16)
  with pytest.raises(ValueError, match="context_length"):
    tok(["x"], context_length=1)
  with pytest.raises(TypeError, match="strings"):
    tok([b"bytes caption"])


def test_large_batch_is_fast(tok):
  captions = [f"a photo of dog number {i}, running on the beach." for i in range(4000)]
  start = time.perf_counter()
  ids, _ = tok(captions)
  elapsed = time.perf_counter() - start
  assert ids.shape == (4000, 77)
  assert elapsed < 10.0, f"tokenizing 4000 captions took {elapsed:.1f}s"


# ---------------------------------------------------------------- loading and saving


def _write_byte_level_tokenizer(directory, build_vocab) -> None:
  """A different (merge-free, 514-token) CLIP-style tokenizer, to tell sources apart."""
  symbols = list(build_vocab.bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(build_vocab.tokenizer_config({"<|startoftext|>": 512, "<|endoftext|>": 513}), f)


def test_checkpoint_tokenizer_takes_precedence(tmp_path, build_vocab):
  checkpoint = tmp_path / "ckpt"
  _write_byte_level_tokenizer(str(checkpoint), build_vocab)
  own = load_tokenizer(str(checkpoint))
  assert own.source == str(checkpoint)
  assert (own.vocab_size, own.bos_id, own.eos_id, own.pad_id) == (514, 512, 513, 513)
  ids, mask = own(["cat"], context_length=8)
  # 'c', 'a', 't</w>' as byte-level symbols: no merges in this vocabulary.
  np.testing.assert_array_equal(ids[0], [512, 66, 64, 83 + 256, 513, 513, 513, 513])

  bare = tmp_path / "bare"
  bare.mkdir()
  assert load_tokenizer(str(bare)).source == ASSETS_DIR
  assert load_tokenizer(str(tmp_path / "missing")).source == ASSETS_DIR
  assert load_tokenizer(None).source == ASSETS_DIR
  with pytest.raises(FileNotFoundError, match="load_tokenizer"):
    Tokenizer(str(bare))


def test_save_round_trip(tok, tmp_path):
  from transformers import CLIPTokenizer

  out = tmp_path / "exported"
  tok.save(str(out))
  assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(
    os.listdir(out)
  )
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert "local_files_only" not in config and config["model_max_length"] == 77
  want_ids, want_mask = tok(CAPTIONS, context_length=32)
  reloaded = CLIPTokenizer.from_pretrained(str(out))
  ref = reloaded(CAPTIONS, padding="max_length", truncation=True, max_length=32)
  np.testing.assert_array_equal(want_ids, np.asarray(ref["input_ids"]))
  np.testing.assert_array_equal(want_mask, np.asarray(ref["attention_mask"]))
  # The exported vocab.json/merges.txt alone (what older loaders read) give the same ids.
  (out / "tokenizer.json").unlink()
  ids, _ = tokenizer_lib.load_tokenizer(str(out))(CAPTIONS, context_length=32)
  np.testing.assert_array_equal(ids, want_ids)
  assert tok.decode(want_ids[0]) == "a photo of a cat"


def test_token_cache_returns_what_the_tokenizer_returns_and_tokenizes_each_caption_once():
  tokenizer = load_tokenizer()
  calls = []

  def counting(texts, context_length):
    calls.append(list(texts))
    return tokenizer(texts, context_length)

  cache = caches.TokenCache(counting, 16, max_entries=3)
  batches = [["a cat", "a dog", "a cat"], ["a dog", "a bird", "a fish on a very long line " * 4],
             ["a cat", "a fish on a very long line " * 4, "a dog"], []]
  for texts in batches:
    got = cache(texts)
    want = tokenizer(texts, 16)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(g, w)
      assert g.dtype == np.int32 and g.shape == (len(texts), 16)
  # Kept: the first 3 distinct captions; the 4th (over max_entries) is tokenized at each use.
  assert len(cache) == 3
  assert calls[1:3] == [["a bird", "a fish on a very long line " * 4],
                        ["a fish on a very long line " * 4]]
