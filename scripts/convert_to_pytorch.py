"""Export a distilled student to PyTorch (Hugging Face), int8, ONNX and LiteRT, with checks.

  python scripts/convert_to_pytorch.py --workdir /tmp/run --out /tmp/student
  python scripts/convert_to_pytorch.py --workdir /tmp/run --out /tmp/student \
      --quantize int8 --onnx --tflite

WORKDIR is what `python -m clipdistill_jax.main --workdir` wrote: a train run
(WORKDIR/checkpoints), an experiment (WORKDIR/distilled, no_teacher, teacher: the distilled
student by default, --stage for the others) or an ablation (--stage NAME-sSTEPS-seedK).
It restores the latest (or --step) checkpoint's student and writes OUT/ (config.json,
model.safetensors, tokenizer files, preprocessor_config.json, README.md model card), which
`transformers.CLIPModel.from_pretrained(OUT)`, `CLIPProcessor.from_pretrained(OUT)` and
`pipeline("zero-shot-image-classification", model=OUT)` load offline. Then it proves the
export: PyTorch vs Flax embeddings on real photos and captions (max abs diff <= 1e-4),
int8 cosine / top-1 agreement on the photos and on the run's own zero-shot set,
onnxruntime vs PyTorch, LiteRT vs Flax, and a size + CPU latency table next to the run's
teacher. Everything it prints is also in OUT/export_report.json. Exit status 1 if a parity
check fails.

With --onnx, OUT/onnx/ holds vision_model.onnx and text_model.onnx (plus *_int8.onnx with
--quantize int8) for the `clipdistill search|moderate|classify` commands. With --tflite,
OUT/tflite/ holds vision_model.tflite and text_model.tflite (plus *_int8.tflite, dynamic
range, and *_int8_full.tflite, full integer, with --quantize int8), which the same commands
use where onnxruntime is not installed.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--workdir", required=True, help="the training run's --workdir")
  parser.add_argument("--out", required=True, help="directory to write the export into")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--quantize", choices=["int8"], default=None,
                      help="also write an int8 model (and int8 ONNX with --onnx)")
  parser.add_argument("--stage", default=None,
                      help="which run of an experiment workdir: distilled (default), "
                      "no_teacher or teacher; of an ablation workdir: its NAME-sSTEPS-seedK")
  parser.add_argument("--onnx", action="store_true",
                      help="also write separate vision/text ONNX encoders")
  parser.add_argument("--tflite", action="store_true",
                      help="also write separate vision/text LiteRT (TFLite) encoders")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer directory (default: the workdir's, else the packaged "
                      "openai CLIP tokenizer)")
  parser.add_argument("--no-benchmark", action="store_true", help="skip the latency table")
  parser.add_argument("--no-teacher", action="store_true",
                      help="benchmark the student only (the teacher rows take a few minutes "
                      "on a small CPU)")
  parser.add_argument("--random-teacher", action="store_true",
                      help="benchmark a randomly initialised ViT-B/32 as the teacher instead "
                      "of the run's own (its shape is what sets size and speed)")
  parser.add_argument("--eval-examples", type=int, default=1000,
                      help="images of the run's zero-shot set to measure int8 agreement on "
                      "(0: the photos only)")
  parser.add_argument("--batch-sizes", default="1,32",
                      help="comma-separated batch sizes for the latency table")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads for the latency table (default: torch's)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import clipdistill_jax  # noqa: F401  (sets USE_TF/USE_FLAX before transformers loads)
  from clipdistill_jax.checkpoints import CheckpointError
  from clipdistill_jax.export.convert import TEACHER_CONFIG, convert_workdir, format_report
  from clipdistill_jax.export.litert_export import LiteRTUnavailableError
  from clipdistill_jax.export.torch_export import ExportVerificationError

  try:
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
  except ValueError:
    print(f"--batch-sizes {args.batch_sizes!r}: give integers like 1,32", file=sys.stderr)
    return 2
  try:
    report = convert_workdir(
        args.workdir, args.out, step=args.step, quantize=args.quantize, onnx=args.onnx,
        tflite=args.tflite, stage=args.stage, random_teacher=args.random_teacher,
        run_eval_examples=args.eval_examples, tokenizer_path=args.tokenizer,
        run_benchmark=not args.no_benchmark,
        teacher_config=None if args.no_teacher else TEACHER_CONFIG, batch_sizes=batch_sizes,
        benchmark_threads=args.threads)
  except (ExportVerificationError, LiteRTUnavailableError, FileNotFoundError,
          FileExistsError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_report(report))
  step = f"step {report['step']}" if report["step"] is not None else "the final model"
  print(f"{step} of {report['run']} exported to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
