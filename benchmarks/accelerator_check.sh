#!/usr/bin/env bash
# The training steps on a lent GPU or TPU, in one run that ends with one
# table (markdown, for the README):
#
#   benchmarks/accelerator_check.sh [--steps=N] [--dtypes=bfloat16,float32]
#       [--peak-tflops=T] [--workers=W] [--data-dir=DIR] [--out=DIR]
#   benchmarks/accelerator_check.sh --cpu-dry-run    # the plumbing, on a CPU
#
# 1. Our warm-up, SPCL and self-training steps (benchmarks.step_vs_pytorch)
#    at the recipe's sizes (configs/gta5.py: warm-up and SPCL 4 source
#    images of 1280x720 + 4 target images of 1024x512; self-training 8
#    target crops of 1024x512), DeepLab-v2 ResNet-101, in bfloat16 and then
#    float32, each beside the PyTorch reference step of the released design
#    (CUDA only: skipped on a TPU or without a CUDA build of torch): seconds
#    per step (mean of N timed steps after an untimed first call), images/s,
#    TFLOP/s from XLA's cost analysis of our step, MFU against the chip's
#    dense bfloat16 peak (--peak-tflops, env PEAK_TFLOPS, else the table
#    KNOWN_PEAK_TFLOPS in benchmarks/step_vs_pytorch.py: H100/H200 989, A100
#    312, V100 125, TPU v4 275, v5e 197, ...), and peak memory: the compiled
#    step's buffer assignment on this device (benchmarks.memory.peak_bytes;
#    `python -m benchmarks.memory --config=configs/gta5.py` compiles the
#    same steps without running them) and the allocators' measured peaks.
# 2. The input pipeline's rate with the warm-up's source transforms at
#    1280x720 (benchmarks.input_pipeline_throughput, 0 and W worker
#    processes; W defaults to half the CPU cores), beside what our
#    bfloat16 SPCL step consumes. Without --data-dir (env DATA_DIR) the
#    tiny demo is built into the output directory (64x128 records resized
#    up: a real 1280x720 file costs more to decode); DATASET and SPLIT
#    choose another built dataset.
#
# Each step_vs_pytorch run is its own process (bfloat16 first), so a run cut
# short still leaves the finished ones' tables; logs and JSON go to --out
# (default: a new temporary directory). Aimed at < 8 minutes on an
# H100-class GPU; the compiles dominate (one per stage and dtype). With no
# GPU or TPU it stops at once (exit 2). --cpu-dry-run runs all of it on the
# CPU at tiny sizes (32x64, batch 1, DeepLab-v2 ResNet-18, one timed step,
# XLA without LLVM optimisation) to check the script, not the speed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
dry=0
steps=5
dtypes=bfloat16,float32
peak=${PEAK_TFLOPS:-}
workers=${WORKERS:-}
data_dir=${DATA_DIR:-}
out=
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) dry=1 ;;
    --steps=*) steps=${arg#*=} ;;
    --dtypes=*) dtypes=${arg#*=} ;;
    --peak-tflops=*) peak=${arg#*=} ;;
    --workers=*) workers=${arg#*=} ;;
    --data-dir=*) data_dir=${arg#*=} ;;
    --out=*) out=${arg#*=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "accelerator_check: unknown argument '$arg' (see --help)" >&2
       exit 2 ;;
  esac
done
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
started=$SECONDS
say() { echo "[accelerator_check $((SECONDS - started)) s] $*"; }

step_flags=(--model=deeplabv2_resnet101 --steps="$steps" --untimed_steps=1)
# stages|source height|width|target height|width|batch per domain
groups=("warmup,spcl|720|1280|512|1024|4" "self_training|512|1024|512|1024|8")
pipeline_size=720,1280
pipeline_batches=10
if (( dry )); then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  step_flags=(--model=deeplabv2_resnet18 --steps=1 --untimed_steps=1)
  groups=("warmup,spcl,self_training|32|64|32|64|1")
  dtype_runs=("$dtypes")    # one process for every case
  pipeline_size=32,64
  pipeline_batches=2
  workers=${workers:-0}
else
  backend=$("$PYTHON" -c 'import jax; print(jax.default_backend(), jax.devices())' 2>/dev/null | tail -n 1) \
    || backend='none (JAX does not import)'
  if [[ $backend != gpu* && $backend != tpu* && $backend != cuda* && $backend != rocm* ]]; then
    echo "accelerator_check: no GPU or TPU: JAX's default backend is $backend." >&2
    echo "  Install JAX for the accelerator (e.g. pip install -U 'jax[cuda12]' or 'jax[tpu]')," >&2
    echo "  or check the script on this CPU with --cpu-dry-run." >&2
    exit 2
  fi
  IFS=, read -r -a dtype_runs <<< "$dtypes"   # one process per dtype
  if [[ $backend == tpu* ]]; then
    say "TPU: no PyTorch reference (it needs CUDA)"
    step_flags+=(--notorch)
  elif ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    say "torch has no CUDA device: no PyTorch reference"
    step_flags+=(--notorch)
  fi
  workers=${workers:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
fi
if [[ -n $peak ]]; then
  step_flags+=(--peak_tflops="$peak")
fi
out=${out:-$(mktemp -d -t accelerator_check.XXXXXX)}
mkdir -p "$out"
say "backend: ${backend:-cpu (dry run)}; output in $out"

# 1. the training steps, ours and PyTorch's
run=0
for dtype in "${dtype_runs[@]}"; do
  for group in "${groups[@]}"; do
    IFS='|' read -r stages h w th tw batch <<< "$group"
    run=$((run + 1))
    say "steps: $stages $dtype ${h}x${w} / ${th}x${tw}, batch $batch"
    if ! "$PYTHON" -m benchmarks.step_vs_pytorch "${step_flags[@]}" \
        --stage="$stages" --dtype="$dtype" --height="$h" --width="$w" \
        --target_height="$th" --target_width="$tw" --batch="$batch" \
        --output="$out/steps_$run.json" > "$out/steps_$run.log" 2>&1; then
      say "FAILED: $stages $dtype (last lines of $out/steps_$run.log):"
      tail -n 15 "$out/steps_$run.log"
    fi
    grep -v '^[IWE][0-9]\{4\} ' "$out/steps_$run.log" || true
  done
done

# 2. the input pipeline
dataset=${DATASET:-sim2real_demo/default}
split=${SPLIT:-source_train}
if [[ -z $data_dir ]]; then
  data_dir=$out/tfds
  dataset=sim2real_demo/tiny
  say "building the tiny demo dataset into $data_dir"
  "$PYTHON" -m data_prep.build --dataset sim2real_demo --config tiny \
    --data_dir "$data_dir" > "$out/build.log" 2>&1 \
    || { say "FAILED: dataset build (see $out/build.log)"; }
fi
say "input pipeline: $dataset:$split at $pipeline_size, workers 0 and $workers"
workers_list=0
if (( workers > 0 )); then workers_list=0,$workers; fi
"$PYTHON" -m benchmarks.input_pipeline_throughput --data_dir="$data_dir" \
  --dataset="$dataset" --split="$split" --size="$pipeline_size" --batch=4 \
  --batches="$pipeline_batches" --workers="$workers_list" \
  > "$out/pipeline.log" 2>&1 \
  || say "FAILED: input pipeline (see $out/pipeline.log)"
grep -v '^[IWE][0-9]\{4\} ' "$out/pipeline.log" || true

# 3. one table
say "done"
"$PYTHON" - "$out" "$(nproc)" <<'EOF'
import glob, json, os, re, sys

out, cores = sys.argv[1], int(sys.argv[2])
results = []
for path in sorted(glob.glob(os.path.join(out, 'steps_*.json')),
                   key=lambda p: int(re.findall(r'\d+', p)[-1])):
  with open(path) as f:
    results.extend(json.load(f))


def fmt(value, spec):
  return '-' if value is None else format(value, spec)


head = results[0] if results else {}
print(f"\n## accelerator check: {head.get('jax_device', '?')}, "
      f"{head.get('model', '?')} (PyTorch on "
      f"{head.get('torch_device', '?')}), peak "
      f"{fmt(head.get('peak_tflops') or None, '.0f')} TFLOP/s bf16 dense\n")
print('| stage | dtype | batch (source / target size) | ours s/step | '
      'PyTorch s/step | ours/PyTorch | ours images/s | PyTorch images/s | '
      'ours TFLOP/s | ours MFU % | peak GiB compiled | peak GiB allocator '
      '(ours / PyTorch) |')
print('|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
for r in results:
  t = r['table']
  print(f"| {r['stage']} | {r['dtype']} | {r['batch_sizes']} "
        f"({r['source_size']} / {r['target_size']}) | "
        f"{fmt(t['s/step'][0], '.3f')} | {fmt(t['s/step'][1], '.3f')} | "
        f"{fmt(t['s/step'][2], '.2f')} | {fmt(t['images/s'][0], '.1f')} | "
        f"{fmt(t['images/s'][1], '.1f')} | {fmt(t['TFLOP/s'][0], '.1f')} | "
        f"{fmt(t['MFU %'][0], '.1f')} | "
        f"{fmt(t['peak GiB (compiled)'][0], '.1f')} | "
        f"{fmt(t['peak GiB (allocator)'][0], '.1f')} / "
        f"{fmt(t['peak GiB (allocator)'][1], '.1f')} |")

rates = {}
with open(os.path.join(out, 'pipeline.log')) as f:
  for line in f:
    match = re.search(r'workers=(\d+):\s+([\d.]+) images/s', line)
    if match:
      rates[int(match.group(1))] = float(match.group(2))
consumed = [r['table']['images/s'][0] for r in results
            if r['stage'] == 'spcl' and r['dtype'] == 'bfloat16']
consumed = consumed[0] if consumed else None
print('\n| input pipeline (warm-up transforms) | images/s | per CPU core '
      '| pipeline / bfloat16 SPCL step |')
print('|---|---:|---:|---:|')
for w, rate in sorted(rates.items()):
  per_core = rate / max(w, 1)
  print(f"| {w} workers | {rate:.1f} | {per_core:.1f} | "
        f"{fmt(rate / consumed if consumed else None, '.2f')} |")
if not rates:
  print('| (no result: see pipeline.log) | - | - | - |')
print(f"\n(bfloat16 SPCL step consumes {fmt(consumed, '.1f')} images/s; the "
      f"goal is a pipeline >= 2x that; {cores} CPU cores)")
EOF
say "total $((SECONDS - started)) s; logs and JSON in $out"
