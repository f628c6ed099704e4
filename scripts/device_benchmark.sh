#!/usr/bin/env bash
# The GPU benchmark in one run (about 8 minutes on one H100/H200-class card, 16 CPU cores):
#
#   scripts/device_benchmark.sh [--out DIR] [--wheels DIR] [--no-install] [--dry-run]
#
#  1. installs what it needs: with --wheels DIR, the wheels in DIR (for a machine that cannot
#     reach a package index) into /tmp/site, on top of the Python found; else, unless
#     --no-install, `pip install -e .[dev]` and jax's CUDA plugin;
#  2. the train step at a batch that fills the card (BATCH, default 1024), B/32-shaped teacher
#     and the article's student: online (fp32; XLA runs fp32 matmuls as TF32 on the GPU),
#     cached, bf16 (student computes in bf16, params fp32; teacher bf16), all of ours in one
#     process (--interleave), then the PyTorch peer as a GPU user writes it (autocast bf16,
#     SDPA where no attention maps are needed; PEER_COMPILE=1 adds a torch.compile run);
#  3. the input pipeline with 1 and all CPU cores against the torch DataLoader peer, at the
#     step's batch (INPUT_BATCH, default 256);
#  4. a table: images/s, model TFLOP/step, MFU against the card's dense bf16 peak
#     (PEAK_TFLOPS, default from the card's name: 989 for H100/H200 SXM), ours / peer, and
#     the input pipeline's images/s next to the step's.
# Reports land in DIR (default ./device_benchmark_out): step.json, input.json, summary.md.
# --dry-run: the same commands at toy sizes on whatever device there is (a CPU will do), no
# install: checks that the script runs end to end.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=./device_benchmark_out WHEELS="" INSTALL=1 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; INSTALL=0; shift ;;
    *) echo "unknown argument $1; see the header of $0" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 USE_TF=0 USE_FLAX=0 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS

# --- 1. install ------------------------------------------------------------------------------
if [[ -n "$WHEELS" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
elif [[ $INSTALL == 1 ]]; then
  "$PY" -m pip install -q -e ".[dev,export]" "jax[cuda12]==0.10.2"
fi
"$PY" - <<'EOF'
import jax, os
print(f"jax {jax.__version__}: {jax.default_backend()} {[d.device_kind for d in jax.devices()]}, "
      f"{os.cpu_count()} CPU cores")
EOF

# --- 2. the step -----------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  STEP_ARGS=(--config=configs/bench_tiny.py --teacher=tiny --batch_size=8 --steps=2
             --warmup_steps=1 --matmul_size=64)
  INPUT_ARGS=(--config=configs/bench_tiny.py --batch_size=8 --input_images=32
              --input_batches=1 --input_cores=2 --input_repeats=1)
else
  STEP_ARGS=(--batch_size="${BATCH:-1024}" --steps=20 --warmup_steps=3 --matmul_size=8192)
  INPUT_ARGS=(--batch_size="${INPUT_BATCH:-256}" --input_images=2048 --input_batches=6)
fi
"$PY" scripts/benchmark.py "${STEP_ARGS[@]}" --variants=online,cached,bf16 --interleave \
  --json_out="$OUT/step.json" > "$OUT/step.log" 2>&1 || { tail -40 "$OUT/step.log"; exit 1; }
"$PY" scripts/benchmark.py "${STEP_ARGS[@]}" --variants=peer \
  --json_out="$OUT/peer.json" > "$OUT/peer.log" 2>&1 || { tail -40 "$OUT/peer.log"; exit 1; }
if [[ "${PEER_COMPILE:-0}" == 1 ]]; then
  "$PY" scripts/benchmark.py "${STEP_ARGS[@]}" --variants=peer --peer_compile \
    --json_out="$OUT/peer_compiled.json" > "$OUT/peer_compiled.log" 2>&1 || true
fi
echo "step benchmark done at $((SECONDS - started)) s"

# --- 3. the input pipeline -------------------------------------------------------------------
"$PY" scripts/benchmark.py "${INPUT_ARGS[@]}" --variants=input \
  --json_out="$OUT/input.json" > "$OUT/input.log" 2>&1 || { tail -40 "$OUT/input.log"; exit 1; }
echo "input benchmark done at $((SECONDS - started)) s"

# --- 4. the table ----------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, os, subprocess, sys
out = sys.argv[1]
load = lambda name: json.load(open(os.path.join(out, name)))
step = load("step.json")
results = dict(step["results"])
results.update(load("peer.json")["results"])
if os.path.exists(os.path.join(out, "peer_compiled.json")):
  results["peer_compiled"] = load("peer_compiled.json")["results"]["peer"]
try:
  name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip()
except OSError:
  name = ""
peak = float(os.environ.get("PEAK_TFLOPS") or (989 if ("H100" in name or "H200" in name) else 0))
print(f"device: {name or 'no NVIDIA GPU'}; dense bf16 peak {peak or 'unknown'} TFLOP/s; "
      f"batch {step['settings']['batch_size']}\n")
print("| variant | s/step | images/s | model TFLOP/step | achieved TFLOP/s | MFU (bf16 peak) |")
print("|---|---:|---:|---:|---:|---:|")
for variant, r in results.items():
  if "error" in r:
    print(f"| {variant} | error: {r['error']} | | | | |")
    continue
  mfu = f"{100 * r['achieved_flops_per_s'] / (peak * 1e12):.1f}%" if peak else "-"
  print(f"| {variant} | {r['step_time']['median_s']:.4f} | {r['images_per_s']:.0f} | "
        f"{r['analytic_flops']['step'] / 1e12:.2f} | {r['achieved_flops_per_s'] / 1e12:.1f} | "
        f"{mfu} |")
rate = lambda v: results.get(v, {}).get("images_per_s")
peers = [p for p in ("peer", "peer_compiled") if rate(p)]
best_peer = max(peers, key=rate) if peers else None
for ours in ("online", "bf16"):
  if rate(ours) and best_peer:
    print(f"\n{ours} / {best_peer}: {rate(ours) / rate(best_peer):.2f}x")
for warning in step.get("warnings", []):
  print(f"\nWARNING: {warning}")
inp = load("input.json")
print("\n| input run | images/s | per core | vs peer |\n|---|---:|---:|---:|")
for run, r in inp["input"]["runs"].items():
  if "error" in r:
    print(f"| {run} | error: {r['error']} | | |")
    continue
  ratio = inp["input"]["ratio_vs_peer"].get(run)
  print(f"| {run} | {r['images_per_s']:.0f} | {inp['input']['images_per_s_per_core'][run]:.0f} "
        f"| {'-' if ratio is None else f'{ratio:.2f}x'} |")
# The first epoch decodes every image; later ones of a set that fits read the cache.
for cached in (False, True):
  fastest = max(((r["images_per_s"], run) for run, r in inp["input"]["runs"].items()
                 if "error" not in r and not run.startswith("peer")
                 and ("_cached_" in run) == cached), default=None)
  for ours in ("online", "bf16"):
    if rate(ours) and fastest:
      print(f"\ninput ({fastest[1]}) {fastest[0]:.0f} images/s vs the {ours} step's "
            f"{rate(ours):.0f}: {fastest[0] / rate(ours):.2f}x")
EOF
echo "all done in $((SECONDS - started)) s; reports in $OUT"
