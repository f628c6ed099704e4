"""The train-step benchmark (ours vs the PyTorch peer) on tiny models.

One benchmark run (three child processes: our online step, our cached step, the peer) is
shared by the report tests; its children compile at LLVM -O0 to keep this file fast.
"""

import json

import pytest
from tiny_models import tiny_distill_config

from clipdistill_jax.perf import benchmark, common

FAST_CHILDREN = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


# --- the benchmark report -------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(tmp_path_factory):
  return benchmark.run_benchmark(
      tiny_distill_config(), batch_size=4, steps=2, warmup_steps=0,
      variants=("online", "cached", "peer"), teacher="tiny", matmul_size=128, matmul_runs=3,
      num_devices=1,
      workdir=str(tmp_path_factory.mktemp("bench")), child_env=FAST_CHILDREN, log=print)


def test_report_has_every_field_for_ours_and_the_peer(report):
  json.dumps(report)  # serializable as printed
  for name in ("online", "cached", "peer"):
    r = report["results"][name]
    assert "error" not in r, r.get("stderr_tail")
    for key in ("step_time", "images_per_s", "analytic_flops", "achieved_flops_per_s",
                "fraction_of_matmul_peak", "matmul", "peak_rss_bytes", "first_step_losses"):
      assert key in r, (name, key)
    assert r["step_time"]["runs"] == 2 and r["step_time"]["median_s"] > 0
    assert r["step_cpu"]["runs"] == 2 and r["step_cpu"]["median_s"] > 0  # process CPU
    assert r["images_per_s"] == pytest.approx(4 / r["step_time"]["median_s"])
    assert r["matmul"]["flops_per_s"] > 0 and len(r["matmul"]["measurements"]) == 2
    assert r["peak_rss_bytes"] > 0
  for name in ("online", "cached"):
    r = report["results"][name]
    assert r["xla_flops"] > 0 and r["compile_s"] > 0
    # XLA also counts elementwise work (Adam over the 49408-row token embedding dominates a
    # tiny model), so it is at least the analytic matmul count (on ViT-B/32 within 0.1%).
    assert r["xla_flops"] > 0.9 * r["analytic_flops"]["step"]
  online, cached = (report["results"][k]["analytic_flops"] for k in ("online", "cached"))
  assert online["teacher_forward"] > 0 and cached["teacher_forward"] == 0
  for key in ("online_vs_peer", "cached_vs_online", "online_vs_peer_peak_normalized",
              "cached_vs_online_peak_normalized"):
    assert report["ratios"][key] > 0, key
  for name in ("online", "cached", "peer"):  # one step, one peak timed right after it
    r = report["results"][name]
    assert len(r["paired_matmul_flops_per_s"]) == len(r["step_time"]["all_s"]) == 2
    assert 0 < r["fraction_of_matmul_peak"] and 0 < r["fraction_of_best_matmul_peak"]
  # A saved report re-derives to the same figures (scripts/benchmark.py --from_json).
  again = benchmark.rederive(json.loads(json.dumps(report)))
  assert again["ratios"] == pytest.approx(report["ratios"])
  table = benchmark.format_table(report)
  assert "| online |" in table and "| peer |" in table and "online_vs_peer" in table


def test_ours_and_the_peer_compute_the_same_step(report):
  ours, peer = (report["results"][k]["first_step_losses"] for k in ("online", "peer"))
  for component in ("feature", "hidden", "logit_kl", "attention", "contrastive", "total"):
    assert ours[f"loss/{component}"] > 0
    assert peer[f"loss/{component}"] == pytest.approx(ours[f"loss/{component}"], rel=2e-4,
                                                      abs=1e-6), component


def test_cached_step_loss_matches_the_online_step(report):
  online, cached = (report["results"][k]["first_step_losses"] for k in ("online", "cached"))
  for component in ("feature", "logit_kl", "contrastive"):  # cached embeddings are bf16
    assert cached[f"loss/{component}"] == pytest.approx(online[f"loss/{component}"],
                                                        rel=1e-2), component
  assert cached["loss/hidden"] == 0 and cached["loss/attention"] == 0


def test_analytic_flops_of_vit_b32():
  b32 = benchmark.teacher_config_for("b32").to_dict()
  forward = common.clip_forward_flops(b32, 1)
  # ~ 2 x params x tokens: 85M vision weights x 50 tokens + 38M text x 77 tokens.
  assert 14.0e9 < forward < 15.5e9
  step = common.train_step_flops(b32, b32, 2, online_teacher=True)
  assert step["step"] == pytest.approx(4 * common.clip_forward_flops(b32, 2))


def test_interleaved_variants_share_one_process(tmp_path):
  report = benchmark.run_benchmark(
      tiny_distill_config(), batch_size=4, steps=2, warmup_steps=0,
      variants=("online", "cached"), interleave=True, teacher="tiny", matmul_size=128,
      matmul_runs=3, num_devices=1, workdir=str(tmp_path), child_env=FAST_CHILDREN,
      log=print)
  for name in ("online", "cached"):
    r = report["results"][name]
    assert "error" not in r, r.get("stderr_tail")
    assert r["interleaved_with"] == ["online", "cached"]
    assert r["step_time"]["runs"] == 2 and len(r["paired_matmul_flops_per_s"]) == 2
  assert report["ratios"]["cached_vs_online"] > 0
  online, cached = (report["results"][k]["first_step_losses"] for k in ("online", "cached"))
  assert cached["loss/feature"] == pytest.approx(online["loss/feature"], rel=1e-2)
