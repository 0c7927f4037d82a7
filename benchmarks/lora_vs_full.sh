#!/usr/bin/env bash
# LoRA (rank 8 and 32, configs/lora.py) against full-parameter RL (configs/default.py), per seed:
# the full run first (it trains and caches the warm start), whose warm_start/ the LoRA runs of
# the seed reuse (the cache does not depend on model.lora), so all three start from one policy.
# Peak memory: the maximum resident set of the whole process (GNU time, DIR/time.txt); the
# held-out pass@1 gain is summary.json's eval_gain, s/step the mean of metrics.jsonl's time/step.
#   usage: benchmarks/lora_vs_full.sh ROOT SEED...
set -euo pipefail
root=$1; shift
py=${PYTHON:-python}
for seed in "$@"; do
  for variant in full lora8 lora32; do
    dir=$root/$variant-s$seed
    [[ -f $dir/summary.json ]] && continue
    mkdir -p "$dir"
    case $variant in
      full) config=configs/default.py ;;
      lora8) config=configs/lora.py:8 ;;
      lora32) config=configs/lora.py:32 ;;
    esac
    if [[ $variant != full && ! -d $dir/warm_start ]]; then
      cp -r "$root/full-s$seed/warm_start" "$dir/warm_start"
    fi
    /usr/bin/time -v -o "$dir/time.txt" "$py" -m gmpo_jax.main --config="$config" \
      --workdir="$dir" --config.seed="$seed" --config.progress=False > "$dir/log.txt" 2>&1
  done
done
