"""Hand the student to the PyTorch and edge worlds: HF directory, int8, ONNX, LiteRT, checks.

  convert.py         convert_workdir / export_all: what scripts/convert_to_pytorch.py runs
  run_dir.py         which run a --workdir (and --stage) names: train, experiment, ablation
  torch_export.py    HF directory (safetensors, tokenizer, preprocessor) + Flax parity
  quantize.py        int8 PyTorch (dynamic quantization) + agreement metrics
  onnx_export.py     separate vision/text ONNX files, onnxruntime parity, int8 ONNX
  onnx_runtime.py    running the ONNX files with onnxruntime + numpy + PIL only (the CLI)
  litert_export.py   separate vision/text LiteRT files from the Flax student (jax2tf)
  litert_runtime.py  running the LiteRT files with a LiteRT interpreter (the CLI's fallback)
  cli.py             the `clipdistill` command: search, moderate, classify with those files
  model_card.py      OUT/README.md, the Hugging Face model card
  benchmark.py       size and CPU latency table
  samples.py         photos + captions, and the zero-shot sets the checks use

Names below are imported on first use, so `import clipdistill_jax.export.onnx_runtime`
(the torch-free runtime) and `litert_runtime` do not pull in torch or JAX.
"""

import importlib

_LAZY = {
    "convert_workdir": "convert", "export_all": "convert", "format_report": "convert",
    "export_student": "torch_export", "load_torch_model": "torch_export",
    "ExportVerificationError": "torch_export", "load_int8": "quantize",
    "OnnxCLIP": "onnx_runtime", "LiteRTCLIP": "litert_runtime", "resolve_run": "run_dir",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
