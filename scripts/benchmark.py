r"""Train-step benchmark: our jitted distillation step vs the same step in PyTorch.

    python scripts/benchmark.py --batch_size=32                  # base config, B/32 teacher
    python scripts/benchmark.py --config=configs/X.py --batch_size=32 \
        --variants=online,cached,peer --json_out=/tmp/bench.json
    python scripts/benchmark.py --config=configs/bench_tiny.py --teacher=tiny \
        --batch_size=64 --variants=loop,input          # the loop and the input pipeline

Prints a table and the JSON report (clipdistill_jax/perf/benchmark.py says what each
number is). Weights are random; the teacher is ViT-B/32-shaped unless --teacher names
'tiny' or a checkpoint directory. Each variant runs in its own process, one after another.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipdistill_jax import errors  # noqa: E402
from clipdistill_jax.perf import benchmark, default_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", default_config.__file__,
    "A configs/*.py file (default: config_lib.base_config()); --config.x.y=... overrides.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size of the timed steps.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (the median is reported).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs of each variant (alternating order); the "
                                "timed steps of all runs are pooled.")
_INTERLEAVE = flags.DEFINE_bool("interleave", False, "Run our variants in one process, their "
                                "steps in turn (drift-free ratios between them); the peer in "
                                "its own.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after the first (compiling) one.")
_VARIANTS = flags.DEFINE_list("variants", list(benchmark.DEFAULT_VARIANTS),
                              f"Any of {', '.join(benchmark.VARIANTS)}.")
_TEACHER = flags.DEFINE_string("teacher", "b32",
                               "'b32' or 'tiny' (random weights) or a checkpoint directory.")
_REMAT = flags.DEFINE_string("remat_policy", "full",
                             "Student remat policy of the 'remat' variant.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "n of the n x n x n matmul peak.")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 100, "loop: timed steps of train.train.")
_LOOP_CKPT = flags.DEFINE_integer("loop_checkpoint_every", 0, "loop: checkpoint interval "
                                  "(0: off, only the final save after the timed steps).")
_LOOP_REPEATS = flags.DEFINE_integer("loop_repeats", 3, "loop: runs of each loop, on JPEGs "
                                    "and in memory (in turn; the median counts).")
_INPUT_IMAGES = flags.DEFINE_integer("input_images", 640, "input: JPEG files written.")
_INPUT_CORES = flags.DEFINE_integer("input_cores", 0, "input: cores of the all-cores runs "
                                    "(0: every core this process may use).")
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 8, "input: timed batches per run.")
_INPUT_REPEATS = flags.DEFINE_integer("input_repeats", 2, "input: runs of each measurement "
                                     "(alternating order; the best counts).")
_INPUT_DECODERS = flags.DEFINE_list("input_decoders", ["pil", "tf"],
                                    "input: data.image_decoder values to measure.")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", False, "peer: torch.compile the models.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON report here.")
_FROM_JSON = flags.DEFINE_string("from_json", None, "Run nothing: re-derive and print the "
                                 "report saved by an earlier --json_out.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}.")
  with errors.boundary():  # user errors: `error:` lines, exit 1
    _main()


def _main() -> None:
  if _FROM_JSON.value:
    with open(_FROM_JSON.value) as f:
      report = benchmark.rederive(json.load(f))
    print(json.dumps(report, indent=2))
    print(benchmark.format_table(report))
    return
  config = _CONFIG.value
  report = benchmark.run_benchmark(
      config, batch_size=_BATCH.value, steps=_STEPS.value, warmup_steps=_WARMUP.value,
      variants=_VARIANTS.value, repeats=_REPEATS.value, interleave=_INTERLEAVE.value,
      teacher=_TEACHER.value,
      remat_policy=_REMAT.value,
      matmul_size=_MATMUL.value, log=lambda m: print(m, file=sys.stderr, flush=True),
      peer_compile=_PEER_COMPILE.value, loop_steps=_LOOP_STEPS.value,
      loop_checkpoint_every=_LOOP_CKPT.value or None, loop_repeats=_LOOP_REPEATS.value,
      input_images=_INPUT_IMAGES.value, input_cores=_INPUT_CORES.value or None,
      input_batches=_INPUT_BATCHES.value, input_repeats=_INPUT_REPEATS.value,
      input_decoders=_INPUT_DECODERS.value)
  text = json.dumps(report, indent=2)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      f.write(text + "\n")
  print(text)
  print(benchmark.format_table(report))


if __name__ == "__main__":
  app.run(main)
