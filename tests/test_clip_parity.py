"""Flax CLIP vs transformers' PyTorch CLIPModel, through checkpoints written by transformers."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clipdistill_jax.models import hf  # noqa: E402
from clipdistill_jax.models.clip import CLIPModel, count_params, init_params  # noqa: E402
from clipdistill_jax.models.config import CLIPConfig, tiny_config  # noqa: E402

TOL = 1e-5


def _hf_model(config: CLIPConfig, seed: int = 0):
  torch.manual_seed(seed)
  hf_config = transformers.CLIPConfig(**config.to_dict())
  hf_config._attn_implementation = "eager"  # sdpa returns no attention maps
  model = transformers.CLIPModel(hf_config).eval()
  # Random init leaves layer norms at (1, 0) and logit_scale at its default: perturb them so
  # a swapped or untransposed weight cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or name == "logit_scale":
        p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(config: CLIPConfig, batch: int, padded: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  v, t = config.vision_config, config.text_config
  pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)
  length = t.max_position_embeddings
  ids = rng.integers(1, 49000, (batch, length)).astype(np.int64)
  mask = np.ones((batch, length), np.int64)
  ids[:, 0] = 49406
  for b in range(batch):
    eot = length - 1 - (b * 3 % (length - 2)) if padded else length - 1
    ids[b, eot] = 49407
    if padded:
      ids[b, eot + 1:] = 49407  # HF's CLIP tokenizer pads with <|endoftext|>
      mask[b, eot + 1:] = 0
  return pixels, ids, mask


def _compare(hf_model, config, params, pixels, ids, mask, relative=False):
  """Max abs diff per output; relative=True divides by max(1, max |reference|)."""
  with torch.no_grad():
    ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                   output_hidden_states=True, output_attentions=True)
    # transformers 5 overwrites the towers' pooler_output with the projected features.
    ref_image_pooled = hf_model.vision_model(
        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
    ref_text_pooled = hf_model.text_model(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
  out = CLIPModel(config).apply({"params": params}, pixels, ids.astype(np.int32),
                                mask.astype(np.int32), return_hidden=True,
                                return_attention=True)
  diffs = {
      "image_embeds": (out.image_embeds, ref.image_embeds),
      "text_embeds": (out.text_embeds, ref.text_embeds),
      "logits_per_image": (out.logits_per_image, ref.logits_per_image),
      "image_pooled": (out.image_pooled, ref_image_pooled),
      "text_pooled": (out.text_pooled, ref_text_pooled),
  }
  for i, (a, b) in enumerate(zip(out.vision_hidden_states,
                                 ref.vision_model_output.hidden_states, strict=True)):
    diffs[f"vision_hidden_{i}"] = (a, b)
  for i, (a, b) in enumerate(zip(out.text_hidden_states, ref.text_model_output.hidden_states,
                                 strict=True)):
    diffs[f"text_hidden_{i}"] = (a, b)
  for i, (a, b) in enumerate(zip(out.vision_attentions, ref.vision_model_output.attentions,
                                 strict=True)):
    diffs[f"vision_attention_{i}"] = (a, b)
  for i, (a, b) in enumerate(zip(out.text_attentions, ref.text_model_output.attentions,
                                 strict=True)):
    # Rows of padded queries are not used downstream; transformers fills them differently.
    valid = mask[:, None, :, None].astype(bool)
    diffs[f"text_attention_{i}"] = (np.where(valid, a, 0), np.where(valid, b.numpy(), 0))
  def diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, float(np.max(np.abs(b)))) if relative else 1.0
    return float(np.max(np.abs(a - b))) / scale
  return {k: diff(a, b) for k, (a, b) in diffs.items()}


@pytest.mark.parametrize("eos_token_id,hidden_act,padded", [
    (2, "quick_gelu", False),        # the published openai configs: argmax pooling
    (2, "quick_gelu", True),
    (49407, "gelu", True),           # newer configs: first eos_token_id
    (49407, "quick_gelu", False),
])
def test_tiny_parity_through_transformers_checkpoint(tmp_path, eos_token_id, hidden_act,
                                                     padded):
  config = tiny_config(eos_token_id=eos_token_id, hidden_act=hidden_act)
  model = _hf_model(config)
  model.save_pretrained(tmp_path)
  loaded_config, params = hf.load_pretrained(tmp_path)
  assert loaded_config == config
  pixels, ids, mask = _inputs(config, batch=3, padded=padded)
  diffs = _compare(model, config, params, pixels, ids, mask)
  print(f"eos={eos_token_id} act={hidden_act} padded={padded}: max abs diff "
        f"{max(diffs.values()):.2e} ({max(diffs, key=diffs.get)})")
  assert max(diffs.values()) <= TOL, diffs


def test_legacy_config_pools_at_argmax_new_config_at_first_eos():
  """eos_token_id=2 pools at argmax(input_ids); any other id pools at its first occurrence."""
  legacy = tiny_config(eos_token_id=2)
  custom = tiny_config(eos_token_id=7)
  params = init_params(CLIPModel(legacy), jax.random.key(0))
  ids = np.full((1, 16), 5, np.int32)
  ids[0, 3], ids[0, 9] = 7, 49000  # the eos id first, a larger id later

  def pooled(config, position_ids):
    out = CLIPModel(config).apply({"params": params}, position_ids,
                                  method=CLIPModel.encode_text)
    return np.asarray(out.text_pooled)

  at_largest_id = tiny_config(eos_token_id=49000)
  np.testing.assert_array_equal(pooled(legacy, ids), pooled(at_largest_id, ids))
  assert not np.allclose(pooled(legacy, ids), pooled(custom, ids))


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
  config = tiny_config()
  model = _hf_model(config, seed=1)
  model.save_pretrained(tmp_path / "hf")
  _, params = hf.load_pretrained(tmp_path / "hf")
  hf.save_pretrained(config, params, tmp_path / "ours")

  reloaded, info = transformers.CLIPModel.from_pretrained(
      tmp_path / "ours", output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ref = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
  ours = {k: v for k, v in reloaded.state_dict().items() if not k.endswith("position_ids")}
  assert ref.keys() == ours.keys()
  for k in ref:
    assert torch.equal(ref[k], ours[k]), k
  pixels, ids, mask = _inputs(config, batch=2, padded=True)
  diffs = _compare(reloaded.eval(), config, params, pixels, ids, mask)
  assert max(diffs.values()) <= TOL


def test_random_init_saved_and_loaded_by_transformers(tmp_path):
  config = tiny_config()
  params = init_params(CLIPModel(config), jax.random.key(3))
  hf.save_pretrained(config, params, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
  model, info = transformers.CLIPModel.from_pretrained(
      tmp_path, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"]
  pixels, ids, mask = _inputs(config, batch=2, padded=True)
  assert max(_compare(model.eval(), config, params, pixels, ids, mask).values()) <= TOL


def test_sharded_safetensors_and_flax_msgpack(tmp_path):
  from flax.serialization import msgpack_serialize

  config = tiny_config()
  model = _hf_model(config, seed=2)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
  assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX).exists()
  _, sharded = hf.load_pretrained(tmp_path / "sharded")
  model.save_pretrained(tmp_path / "single")
  _, single = hf.load_pretrained(tmp_path / "single")
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)

  # transformers' Flax layout nests layers as layers/{i}.
  def to_hf_flax(tree):
    out = {}
    for k, v in tree.items():
      if k.startswith("layers_"):
        out.setdefault("layers", {})[k.split("_")[1]] = to_hf_flax(v)
      else:
        out[k] = to_hf_flax(v) if isinstance(v, dict) else v
    return out
  (tmp_path / "flax").mkdir()
  config.to_json_file(tmp_path / "flax" / hf.CONFIG)
  (tmp_path / "flax" / hf.FLAX_MSGPACK).write_bytes(msgpack_serialize(to_hf_flax(single)))
  _, from_msgpack = hf.load_pretrained(tmp_path / "flax")
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_msgpack, single)


def test_pickle_needs_explicit_permission(tmp_path):
  config = tiny_config()
  model = _hf_model(config)
  config.to_json_file(tmp_path / hf.CONFIG)
  torch.save(model.state_dict(), tmp_path / hf.PYTORCH_BIN)
  with pytest.raises(ValueError, match="allow_pickle"):
    hf.load_pretrained(tmp_path)
  _, params = hf.load_pretrained(tmp_path, allow_pickle=True)
  assert count_params(params) == sum(p.numel() for p in model.parameters())


def test_missing_checkpoint_errors_name_what_was_tried(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_pretrained(tmp_path / "empty")
  tiny_config().to_json_file(tmp_path / "empty" / hf.CONFIG)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_pretrained(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="local-dir"):
    hf.load_pretrained("openai/clip-vit-base-patch32-not-there")


def test_parameter_counts_pinned():
  assert count_params(hf.param_shapes(CLIPConfig())) == 151_277_313


def test_legacy_config_dicts_take_precedence_as_in_transformers():
  """config.json with both text_config and text_config_dict (and vision_*): transformers
  rebuilds each tower from the *_dict, defaults filling what it omits."""
  d = {"projection_dim": 24,
       "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 5,
                       "vocab_size": 1000},
       "text_config_dict": {"hidden_size": 32, "num_attention_heads": 2},
       "vision_config": {"hidden_size": 96, "num_attention_heads": 4, "patch_size": 16},
       "vision_config_dict": {"hidden_size": 48, "num_attention_heads": 4, "image_size": 64,
                              "patch_size": 8}}
  ours = CLIPConfig.from_dict(d)
  theirs = transformers.CLIPConfig(**json.loads(json.dumps(d)))
  for tower in ("text_config", "vision_config"):
    for field, value in vars(getattr(ours, tower)).items():
      assert getattr(getattr(theirs, tower), field) == value, (tower, field)
  assert ours.text_config.hidden_size == 32 and ours.text_config.num_hidden_layers == 12
  assert ours.text_config.vocab_size == 49408  # omitted from the *_dict: the default wins
  assert ours.vision_config.patch_size == 8 and ours.projection_dim == 24
  # Only the *_dict, or only *_config: each is read as it stands.
  only_dict = {k: v for k, v in d.items() if not k.endswith("_config")}
  assert CLIPConfig.from_dict(only_dict) == ours
  plain = CLIPConfig.from_dict({k: v for k, v in d.items() if not k.endswith("_dict")})
  assert plain.text_config.hidden_size == 64 and plain.vision_config.patch_size == 16


def test_vit_b32_shape_parity_on_real_photos():
  """Random weights at the published shape; two real photos, real captions, real tokenizer."""
  skimage_data = pytest.importorskip("skimage.data")
  from clipdistill_jax.data.preprocess import preprocess_images
  from clipdistill_jax.data.tokenizer import load_tokenizer

  config = CLIPConfig.from_dict({**CLIPConfig().to_dict(),
                                 "text_config": {**CLIPConfig().to_dict()["text_config"],
                                                 "eos_token_id": 2}})  # as published
  torch.manual_seed(0)
  hf_config = transformers.CLIPConfig(**config.to_dict())
  hf_config._attn_implementation = "eager"
  model = transformers.CLIPModel(hf_config).eval()
  assert sum(p.numel() for p in model.parameters()) == 151_277_313
  params = hf.hf_state_dict_to_flax({k: v.numpy() for k, v in model.state_dict().items()},
                                    config)
  assert count_params(params) == 151_277_313

  pixels = preprocess_images([skimage_data.astronaut(), skimage_data.chelsea()], 224)
  ids, mask = load_tokenizer()(["a photo of an astronaut", "a photo of a cat on a rug"])
  # Outputs are O(1) but B/32's hidden states reach |x| ~ 10-100, where fp32 rounding of
  # 768-wide sums alone is ~1e-5: those compare relative to their largest magnitude.
  diffs = _compare(model, config, params, pixels, ids.astype(np.int64),
                   mask.astype(np.int64), relative=True)
  print(f"ViT-B/32 shape: max relative diff {max(diffs.values()):.2e} "
        f"({max(diffs, key=diffs.get)}); embeds "
        f"{max(diffs['image_embeds'], diffs['text_embeds']):.2e}, logits "
        f"{diffs['logits_per_image']:.2e}")
  assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}
