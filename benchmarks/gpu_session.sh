#!/usr/bin/env bash
# One prepared GPU session for issue 16 (decode and utilization), run as ONE device call of
# at most 9 minutes (limits 150 + 170 + 110 + 90 s, plus ~15 s of setup). It runs, in
# this order, each part under its own time limit:
#   1. benchmarks/decode_bench.py --steps-per-check 1 8: tokens/s of `sampling.generate` with
#      1 and 8 decode steps per finish check (llama-100m and Qwen2.5-0.5B, bf16, B = 64,
#      256 new tokens), and whether both return the same tokens;
#   2. benchmarks/utilization_bench.py at Qwen2.5-0.5B shapes, B = 64, cache 1024: copy
#      bandwidth, decode bandwidth (cache donated, and the copying step), train-step MFU;
#   3. benchmarks/attention_memory_bench.py: dense ('xla') vs blockwise, scratch memory and
#      time at T = 1024 and 4096 (bf16, Qwen2.5-0.5B, B = 1), then blockwise (block 512) vs
#      cuDNN, interleaved repetitions.
# Every output goes to $OUT/ (env.txt, decode_steps_per_check.md, utilization.md,
# attention_memory.md, attention_cudnn.md, summary.md); the summary is printed at the end.
# A part that fails or runs out of time is marked FAILED in the summary, the later parts
# still run, and the script exits 1.
#
# The call to make (device tool `run`, from the repository root's checkout; no carry):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
# Nothing needs downloading first: the nvidia-h200 image has jax 0.11.2 with the CUDA 13
# plugin, flax, chex, optax and numpy (/work/.library/device/KINDS.md, seen 2026-11), and
# gmpo_jax is imported from the tree (PYTHONPATH=.), as in the H100 session of 2026-11-24
# (jax 0.11.2 there too). The pin (jax 0.10.2) cannot travel: its jaxlib alone installs to
# ~350 MB here, far over the 64 MiB a call may carry. Only if a later image lacks jax, fetch
# the pinned CUDA wheels here (not committed: /.whl/ is in .gitignore), check that
# `du -sh .whl` fits under 64 MiB, and call with carry=[".whl"]:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl jax==0.10.2 jaxlib==0.10.2 \
#     jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2
# (this script installs .whl/*.whl into /tmp/site when `import jax` fails and .whl exists).
#
# Tested on the CPU with shrunken shapes (tiny model, short lengths; OUT defaults to
# results/gpu_session_dry):
#   bash benchmarks/gpu_session.sh --cpu-dry-run
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  dry_run=1
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-dry-run]" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ $dry_run == 1 ]]; then
  OUT="${OUT:-results/gpu_session_dry}"
  python=(nice -n 19 "${PYTHON:-.venv/bin/python}")
  export JAX_PLATFORMS=cpu
else
  : "${OUT:?OUT is unset: run this through the device tool, or pass --cpu-dry-run}"
  python=("${PYTHON:-python3}")
fi
mkdir -p "$OUT"

if ! "${python[@]}" -c 'import jax' 2>/dev/null; then
  if [[ -d .whl ]]; then
    "${python[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "FATAL: no jax importable and no .whl folder carried (see the header)" >&2
    exit 1
  fi
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git metadata)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    2>/dev/null || echo "nvidia-smi: not available"
  "${python[@]}" -c 'import sys, jax, flax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__)
print("backend", jax.default_backend(), "|", jax.devices())'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
backend=$("${python[@]}" -c 'import jax; print(jax.default_backend())')
if [[ $dry_run == 0 && $backend != gpu ]]; then
  echo "FATAL: jax sees backend '$backend', not gpu" >&2
  exit 1
fi

if [[ $dry_run == 1 ]]; then
  util_args=(--config tiny --batch 4 --cache 64 --train-batch 1 --train-length 32
             --copy-mib 64 --dtype float32 --peak-tflops 0.16)
  attn_args=(--config tiny --lengths 64 128 --time 64 128 --run --reps 1)
  attn_sweep_args=(--config tiny --sweep-blocks 64 --time 64 --reps 1 --dense-max 0)
  decode_args=(--config tiny --batch 4 --new-tokens 16 --reps 1)
else
  # 989 TFLOP/s: dense bf16 peak of the H200 SXM (the H100's, by NVIDIA's datasheet).
  util_args=(--config qwen2.5-0.5b --batch 64 --cache 1024 --peak-tflops 989)
  attn_args=(--config qwen2.5-0.5b --dtype bfloat16 --lengths 1024 4096 --time 1024 4096
             --run --reps 5)
  attn_sweep_args=(--config qwen2.5-0.5b --dtype bfloat16 --sweep-blocks 512 --cudnn
                   --time 1024 4096 --reps 5 --dense-max 0)
  decode_args=(--config llama-100m qwen2.5-0.5b --batch 64 --new-tokens 256 --dtype bfloat16
               --reps 5)
fi

failed=()
# part NAME SECONDS ARGS...: runs a benchmark under a time limit into $OUT/NAME.md.
part() {
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (limit ${seconds}s): $*"
  local start=$SECONDS status=0
  timeout -k 10 "$seconds" "${python[@]}" "$@" > "$OUT/$name.md" 2>&1 || status=$?
  echo "--- $name: exit $status after $((SECONDS - start))s" | tee -a "$OUT/$name.md"
  if [[ $status != 0 ]]; then
    failed+=("$name (exit $status)")
    tail -n 20 "$OUT/$name.md" >&2
  fi
}

# The decode loop question first: if the session is cut short, its answer is in.
part decode_steps_per_check 150 benchmarks/decode_bench.py --steps-per-check 1 8 \
  "${decode_args[@]}"
part utilization 170 benchmarks/utilization_bench.py "${util_args[@]}"
part attention_memory 110 benchmarks/attention_memory_bench.py "${attn_args[@]}"
part attention_cudnn 90 benchmarks/attention_memory_bench.py "${attn_sweep_args[@]}"

{
  echo "# GPU session summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s)"
  echo
  sed 's/^/    /' "$OUT/env.txt"
  for name in decode_steps_per_check utilization attention_memory attention_cudnn; do
    echo
    echo "## $name"
    echo
    # The tables and headers; the full logs (warnings included) are in $OUT/$name.md.
    grep -E '^(\||#|- |device:|---)' "$OUT/$name.md" || echo "(no table)"
  done
  echo
  if [[ ${#failed[@]} == 0 ]]; then
    echo "all parts passed"
  else
    echo "FAILED: ${failed[*]}"
  fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
[[ ${#failed[@]} == 0 ]]
