"""Hugging Face CLIP checkpoints <-> Flax params.

Our Flax tree carries transformers' module names, so the whole mapping is `_LEAF_RULES`:
a flax leaf name, the HF leaf name, and how the array is laid out on each side.
`layers_3` in a Flax path is `layers.3` in a PyTorch key; nothing else is renamed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill_jax.errors import UserError
from clipdistill_jax.models.config import CLIPConfig

Params = dict[str, Any]


class CheckpointError(UserError, ValueError):
  """An HF checkpoint that cannot be read as a CLIP: damaged, incomplete or mismatched."""

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
PYTORCH_BIN = "pytorch_model.bin"
CONFIG = "config.json"

# (parent module pattern, flax leaf, hf leaf, flax->hf transform, hf->flax transform).
# Patterns match the dotted parent path; the first matching row wins.
_LEAF_RULES: list[tuple[str, str, str, Callable, Callable]] = [
    (r".*patch_embedding$", "kernel", "weight",            # conv: HWIO <-> OIHW
     lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
    (r".*", "kernel", "weight", lambda a: a.T, lambda a: a.T),   # Dense: [in,out] <-> [out,in]
    (r".*", "embedding", "weight", lambda a: a, lambda a: a),    # nn.Embed
    (r".*", "scale", "weight", lambda a: a, lambda a: a),        # nn.LayerNorm
    (r".*", "bias", "bias", lambda a: a, lambda a: a),
    (r".*", "class_embedding", "class_embedding", lambda a: a, lambda a: a),
    (r".*", "logit_scale", "logit_scale", lambda a: a, lambda a: a),
]
# Buffers transformers may store that carry no learned state.
_IGNORED_HF_KEYS = re.compile(r".*position_ids$")


def _hf_rule(path: tuple[str, ...]) -> tuple[str, Callable, Callable]:
  """(hf key, flax->hf transform, hf->flax transform) of a Flax parameter path."""
  parent = ".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1])
  for pattern, flax_leaf, hf_leaf, to_hf, to_flax in _LEAF_RULES:
    if path[-1] == flax_leaf and re.fullmatch(pattern, parent):
      return (f"{parent}.{hf_leaf}" if parent else hf_leaf), to_hf, to_flax
  raise KeyError(f"no HF name for Flax parameter {'/'.join(path)}")


def flax_to_hf_state_dict(params: Params) -> dict[str, np.ndarray]:
  """Flat {hf_key: array} in PyTorch layout."""
  out = {}
  for path, value in _flatten(params):
    key, to_hf, _ = _hf_rule(path)
    array = to_hf(np.asarray(value))
    out[key] = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d logit_scale 0-d
  return out


def hf_state_dict_to_flax(state: dict[str, np.ndarray], config: CLIPConfig) -> Params:
  """Nested Flax params from a flat HF state dict; checks every expected key is present."""
  params: Params = {}
  used, missing = set(), []
  for path, spec in _flatten(param_shapes(config)):
    key, _, to_flax = _hf_rule(path)
    if key not in state:
      missing.append(key)
      continue
    value = to_flax(np.asarray(state[key]))
    if value.shape != tuple(spec.shape):
      raise CheckpointError(f"{key}: checkpoint shape {value.shape} does not match the config's "
                       f"{tuple(spec.shape)}; is config.json the one saved with these weights?")
    _set(params, path, value)
    used.add(key)
  unexpected = [k for k in state if k not in used and not _IGNORED_HF_KEYS.match(k)]
  if missing or unexpected:
    raise CheckpointError(f"checkpoint does not match a CLIPModel with this config: missing "
                     f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                     f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
  return params


# --- loading --------------------------------------------------------------------------------

def load_pretrained(name_or_path: str | os.PathLike, *, allow_pickle: bool = False,
                    dtype: Any = np.float32) -> tuple[CLIPConfig, Params]:
  """Reads an HF CLIP checkpoint: a local directory or a hub id (needs a network).

  Weights are taken from, in order: model.safetensors, a sharded safetensors index,
  flax_model.msgpack, and pytorch_model.bin only with allow_pickle=True (unpickling runs
  arbitrary code). Returns (config, params) with params as numpy arrays of `dtype`.
  """
  directory = _resolve_directory(str(name_or_path))
  config = _read_config(directory / CONFIG)
  tried = []
  if (directory / SAFETENSORS).exists():
    state = _read_safetensors([directory / SAFETENSORS])
  elif (directory / SAFETENSORS_INDEX).exists():
    index = _read_json(directory / SAFETENSORS_INDEX)
    shards = sorted(set(index["weight_map"].values()))
    state = _read_safetensors([directory / s for s in shards])
  elif (directory / FLAX_MSGPACK).exists():
    return config, _cast(_read_flax_msgpack(directory / FLAX_MSGPACK), dtype)
  elif (directory / PYTORCH_BIN).exists():
    if not allow_pickle:
      raise CheckpointError(
          f"{directory} only has {PYTORCH_BIN}, a pickle: loading it runs code from the file. "
          "Pass allow_pickle=True if you trust it, or convert it once to safetensors "
          "(transformers: CLIPModel.from_pretrained(dir).save_pretrained(dir)).")
    import torch
    state = {k: v.float().numpy() for k, v in
             torch.load(directory / PYTORCH_BIN, map_location="cpu", weights_only=True).items()}
  else:
    tried = [SAFETENSORS, SAFETENSORS_INDEX, FLAX_MSGPACK, PYTORCH_BIN]
    raise FileNotFoundError(f"no CLIP weights in {directory}: looked for {', '.join(tried)}.")
  try:
    params = hf_state_dict_to_flax(state, config)
  except CheckpointError as e:  # name the checkpoint: the user may have several
    raise CheckpointError(f"{directory}: {e}") from e
  return config, _cast(params, dtype)


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: "
                          "copy or download it again.") from e


def _read_config(path: Path) -> CLIPConfig:
  """config.json as a CLIPConfig; CheckpointError naming the file when it is not one."""
  data = _read_json(path)
  try:
    return CLIPConfig.from_dict(data)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path} is not a CLIP config.json ({type(e).__name__}: {e}); point "
                          "at a directory written by transformers' CLIPModel.save_pretrained."
                          ) from e


def _resolve_directory(name_or_path: str) -> Path:
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    if not (path / CONFIG).exists():
      raise FileNotFoundError(f"{path} has no {CONFIG}; point at a directory written by "
                              "transformers' save_pretrained or by clipdistill_jax.")
    return path
  if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
    raise FileNotFoundError(f"checkpoint directory {name_or_path!r} does not exist.")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(
        name_or_path, allow_patterns=[CONFIG, "*.safetensors", SAFETENSORS_INDEX, FLAX_MSGPACK,
                                      "*.json", "*.txt"]))
  except Exception as e:  # no network, unknown repo, offline mode...
    raise FileNotFoundError(
        f"could not load CLIP checkpoint {name_or_path!r}. Tried: a local directory of that "
        f"name (none), then the Hugging Face hub ({type(e).__name__}: {e}). On a machine "
        "without network, download it elsewhere (huggingface-cli download "
        f"{name_or_path} --local-dir DIR), copy DIR over and pass its path instead."
    ) from e


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  state: dict[str, np.ndarray] = {}
  for f in files:
    try:
      state.update(load_file(str(f)))
    except Exception as e:
      if "bfloat16" in str(e) or "BF16" in str(e):
        from safetensors.torch import load_file as load_torch
        state.update({k: v.float().numpy() for k, v in load_torch(str(f)).items()})
      else:
        raise CheckpointError(f"could not read {f}: {e}. The file is damaged or incomplete: "
                              "copy or download it again.") from e
  return state


def _read_flax_msgpack(path: Path) -> Params:
  from flax.serialization import msgpack_restore
  tree = msgpack_restore(path.read_bytes())
  tree = tree.get("params", tree)

  def rename(node):
    if not isinstance(node, dict):
      return np.asarray(node)
    out = {}
    for k, v in node.items():
      if k == "layers" and isinstance(v, dict):  # transformers' Flax: layers/{i}/...
        out.update({f"layers_{i}": rename(sub) for i, sub in v.items()})
      else:
        out[k] = rename(v)
    return out
  return rename(tree)


# --- saving ---------------------------------------------------------------------------------

def save_pretrained(config: CLIPConfig, params: Params, out_dir: str | os.PathLike) -> Path:
  """Writes config.json + model.safetensors that `transformers.CLIPModel` loads directly."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  state = flax_to_hf_state_dict(params)
  tmp = out / (SAFETENSORS + ".tmp")
  save_file(state, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, out / SAFETENSORS)  # never leave a half-written checkpoint behind
  config.to_json_file(out / CONFIG)
  return out


# --- pytree helpers -------------------------------------------------------------------------

def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  items = []
  for k, v in tree.items():
    if isinstance(v, dict):
      items.extend(_flatten(v, prefix + (k,)))
    else:
      items.append((prefix + (k,), v))
  return items


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def param_shapes(config: CLIPConfig) -> Params:
  """The Flax parameter tree of `config` as ShapeDtypeStructs (nothing allocated)."""
  import flax.linen as nn
  import jax

  from clipdistill_jax.models.clip import CLIPModel, dummy_inputs
  return nn.unbox(jax.eval_shape(
      lambda: CLIPModel(config).init(jax.random.key(0), *dummy_inputs(config)))["params"])


def _cast(params: Params, dtype: Any) -> Params:
  import jax
  return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dtype), params)
