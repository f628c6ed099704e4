"""The peer: the same distillation step written the straightforward way in PyTorch.

transformers' CLIPModel as teacher (eval, no_grad) and student, nn.Linear projectors, the
losses of clipdistill_jax/losses.py written out in torch, torch.optim.AdamW (with CLIP's
no-decay groups), fp32, every core. On a GPU (spec device 'cuda', the default where torch
sees one) it is what a GPU user writes: the same step under torch.autocast bf16 (spec amp,
default on for cuda), SDPA attention where the losses need no attention maps, and with spec
compile the student and teacher wrapped in torch.compile. This is what a user would
otherwise write; the benchmark runs it in its own process
(`python -m clipdistill_jax.perf.peer --spec S --out O`) so its memory and threads do not mix
with ours. Both start from the same weights and batch,
so their first-step losses must agree (a check that they compute the same step).
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from typing import Any

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from clipdistill_jax.perf import common  # noqa: E402

# ours (optim.decay_mask): no decay on biases, LayerNorm scales, token/position embeddings,
# class embedding and logit scale; the patch-embedding conv kernel does decay.
_NO_DECAY = re.compile(r"(\.bias|(layer_?norm\d*|layrnorm)\.weight|(token|position)_embedding\."
                       r"weight|class_embedding|logit_scale)$")
_LOG_EPS = 1e-8


def _l2(x: torch.Tensor) -> torch.Tensor:
  return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-24))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
  if mask is None:
    return values.mean()
  return (values * mask).sum() / torch.clamp(mask.sum(), min=1.0)


class PeerLoss(nn.Module):
  """ours (losses.DistillLoss) in torch: projectors + the weighted components."""

  def __init__(self, spec: dict[str, Any], student_cfg, teacher_cfg):
    super().__init__()
    self.w = {k: float(v) for k, v in spec["weights"].items() if float(v) > 0}
    self.temperature = float(spec["temperature"])
    self.maps = {k: [tuple(p) for p in spec[k]] for k in (
        "vision_hidden_layers", "text_hidden_layers", "vision_attention_layers",
        "text_attention_layers")}
    if "hidden" not in self.w:
      self.maps["vision_hidden_layers"] = self.maps["text_hidden_layers"] = []
    if "attention" not in self.w:
      self.maps["vision_attention_layers"] = self.maps["text_attention_layers"] = []

    def identity_linear(d_in, d_out):  # ours: kernel eye(d_in, d_out), no bias
      layer = nn.Linear(d_in, d_out, bias=False)
      with torch.no_grad():
        layer.weight.copy_(torch.eye(d_out, d_in))
      return layer

    self.image_proj = self.text_proj = None
    if "feature" in self.w:
      self.image_proj = identity_linear(student_cfg.projection_dim, teacher_cfg.projection_dim)
      self.text_proj = identity_linear(student_cfg.projection_dim, teacher_cfg.projection_dim)
    self.hidden_proj = nn.ModuleDict()
    for tower, s_width, t_width in (
        ("vision", student_cfg.vision_config.hidden_size, teacher_cfg.vision_config.hidden_size),
        ("text", student_cfg.text_config.hidden_size, teacher_cfg.text_config.hidden_size)):
      for i, j in self.maps[f"{tower}_hidden_layers"]:
        self.hidden_proj[f"{tower}_{i}_{j}"] = identity_linear(s_width, t_width)

  @property
  def needs_hidden(self) -> bool:
    return bool(self.maps["vision_hidden_layers"] or self.maps["text_hidden_layers"])

  @property
  def needs_attentions(self) -> bool:
    return bool(self.maps["vision_attention_layers"] or self.maps["text_attention_layers"])

  def forward(self, s, t, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    parts: dict[str, torch.Tensor] = {}
    if "feature" in self.w:
      cos_i = (_l2(self.image_proj(s.image_embeds)) * _l2(t.image_embeds)).sum(-1)
      cos_t = (_l2(self.text_proj(s.text_embeds)) * _l2(t.text_embeds)).sum(-1)
      parts["feature"] = 0.5 * ((1 - cos_i).mean() + (1 - cos_t).mean())
    # (tower, student output, teacher output, token mask): text padding is masked out.
    both = (("vision", s.vision_model_output, t.vision_model_output, None),
            ("text", s.text_model_output, t.text_model_output, mask))
    if "hidden" in self.w:
      towers = []
      for tower, s_out, t_out, m in both:
        pairs = self.maps[f"{tower}_hidden_layers"]
        if pairs:
          per = [_masked_mean(((self.hidden_proj[f"{tower}_{i}_{j}"](s_out.hidden_states[i])
                                - t_out.hidden_states[j]) ** 2).mean(-1), m) for i, j in pairs]
          towers.append(torch.stack(per).mean())
      parts["hidden"] = torch.stack(towers).mean()
    if "attention" in self.w:
      towers = []
      for tower, s_out, t_out, m in both:
        pairs = self.maps[f"{tower}_attention_layers"]
        if pairs:
          per = []
          for i, j in pairs:
            p = t_out.attentions[j - 1].mean(1)
            q = s_out.attentions[i - 1].mean(1)
            terms = p * (torch.log(torch.clamp(p, min=_LOG_EPS))
                         - torch.log(torch.clamp(q, min=_LOG_EPS)))
            if m is not None:
              terms = terms * m[:, None, :]
            per.append(_masked_mean(terms.sum(-1), m))
          towers.append(torch.stack(per).mean())
      parts["attention"] = torch.stack(towers).mean()
    if "logit_kl" in self.w:
      temp = self.temperature
      s_logits, t_logits = s.logits_per_image / temp, t.logits_per_image / temp
      kl = 0.0
      for dim in (1, 0):
        log_p, log_q = F.log_softmax(t_logits, dim), F.log_softmax(s_logits, dim)
        kl = kl + (log_p.exp() * (log_p - log_q)).sum(dim).mean()
      parts["logit_kl"] = 0.5 * kl * temp ** 2
    if "contrastive" in self.w:
      labels = torch.arange(s.logits_per_image.shape[0], device=s.logits_per_image.device)
      parts["contrastive"] = 0.5 * (F.cross_entropy(s.logits_per_image, labels)
                                    + F.cross_entropy(s.logits_per_image.T, labels))
    total = sum(self.w[k] * v for k, v in parts.items())
    return total, {f"loss/{k}": float(v) for k, v in {**parts, "total": total}.items()}


def _optimizer(student: nn.Module, loss: PeerLoss, o: dict[str, Any]) -> torch.optim.AdamW:
  decay, no_decay = [], []
  for module in (student, loss):
    for name, p in module.named_parameters():
      (no_decay if _NO_DECAY.search(name) else decay).append(p)
  return torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])


def run(spec: dict[str, Any]) -> dict[str, Any]:
  from transformers import CLIPModel

  device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
  amp = spec.get("amp", device == "cuda")
  threads = spec.get("threads") or os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  started = time.perf_counter()
  need_maps = any(spec["loss"][k] for k in ("vision_attention_layers", "text_attention_layers")
                  ) and spec["loss"]["weights"].get("attention", 0) > 0
  # Attention probabilities are only returned by the eager implementation.
  attn = "eager" if need_maps else "sdpa"
  teacher = CLIPModel.from_pretrained(spec["teacher_dir"], attn_implementation=attn).eval().to(
      device)
  for p in teacher.parameters():
    p.requires_grad_(False)
  student = CLIPModel.from_pretrained(spec["student_dir"], attn_implementation=attn).train().to(
      device)
  loss_fn = PeerLoss(spec["loss"], student.config, teacher.config).to(device)
  run_teacher, run_student = teacher, student
  if spec.get("compile"):
    run_teacher, run_student = torch.compile(teacher), torch.compile(student)
  o = spec["optim"]
  opt = _optimizer(student, loss_fn, o)
  trainable = list(student.parameters()) + list(loss_fn.parameters())
  max_log_scale = math.log(o["max_logit_scale"])

  batch = common.make_batch(spec["batch_size"], **spec["batch_shape"], seed=spec["seed"])
  pixel_values = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(device)
  input_ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
  mask = torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(device)
  mask_f = mask.float()
  flags = dict(output_hidden_states=loss_fn.needs_hidden,
               output_attentions=loss_fn.needs_attentions)

  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bool(amp))

  def step() -> dict[str, float]:  # float() of the losses waits for the device
    with autocast:
      with torch.no_grad():
        t_out = run_teacher(pixel_values=pixel_values, input_ids=input_ids,
                            attention_mask=mask, **flags)
      s_out = run_student(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask,
                          **flags)
      total, metrics = loss_fn(s_out, t_out, mask_f)
    opt.zero_grad(set_to_none=True)
    total.backward()
    if o.get("grad_clip_norm"):
      torch.nn.utils.clip_grad_norm_(trainable, o["grad_clip_norm"])
    opt.step()
    with torch.no_grad():
      student.logit_scale.clamp_(max=max_log_scale)
    return metrics

  setup_s = time.perf_counter() - started
  first = step()
  for _ in range(spec["warmup_steps"]):
    step()
  n, runs = spec["matmul_size"], spec["matmul_runs"]
  a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)

  def matmul():
    out = torch.matmul(a, b)
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  before = common.matmul_peak(matmul, n, runs, "before steps")
  reset_ok = common.reset_peak_rss()
  rss_before = common.rss_bytes()
  times, paired_peaks, cpu = common.time_steps_with_peak(step, matmul, n, spec["steps"])
  peak = common.peak_rss_bytes()
  mm = common.best_peak([before, common.matmul_peak(matmul, n, runs, "after steps")])
  return {
      "name": "peer", "framework": f"torch {torch.__version__}", "threads": threads,
      "attn_implementation": attn, "setup_s": setup_s, "device": device,
      "amp_bf16": bool(amp), "compiled": bool(spec.get("compile")),
      "device_kind": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
      "step_time": common.summarize_times(times), "first_step_losses": first,
      "step_cpu": common.summarize_times(cpu),
      "paired_matmul_flops_per_s": paired_peaks,
      "rss_before_steps_bytes": rss_before, "peak_rss_bytes": peak,
      "peak_rss_reset": reset_ok,
      "matmul": mm,
      "python": platform.python_version(),
  }


def main(argv: list[str] | None = None) -> None:
  common.child_main(run, __doc__, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
