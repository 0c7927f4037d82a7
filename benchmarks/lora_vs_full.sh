#!/usr/bin/env bash
# LoRA (rank 8 and 32) against full-parameter RL on the ablation base (configs/ablation_default.py),
# paired by seed. The full-parameter runs are the GMPO design grid's `gmpo_full` point (the same
# base config), and each LoRA run starts from that grid's warm start of its seed
# (`warm_start.init_from`: the warm start trains the full model and its signature leaves
# `model.lora` out), so the three variants of a seed share their starting policy, data order and
# sampling keys; only the adapters (alpha 32, learning rate 1e-3, `configs/lora.py`) differ.
# Each LoRA run is timed by GNU time (peak resident set in DIR/time.txt). Afterwards ROOT holds a
# launcher manifest (the full runs linked in as point `full`) and the launcher's tables, every
# point paired with `full`.
#   usage: benchmarks/lora_vs_full.sh GRID_OUT ROOT SEED...
#   e.g.   benchmarks/lora_vs_full.sh results/default_gmpo_design results/default_lora 0 1 2
set -euo pipefail
grid=$(realpath "$1")
root=$2
shift 2
py=${PYTHON:-python}
mkdir -p "$root"
root=$(realpath "$root")
runs=()
for seed in "$@"; do
  mkdir -p "$root/runs/full"
  ln -sfn "$grid/runs/gmpo_full/seed_$seed" "$root/runs/full/seed_$seed"
  runs+=("full $seed")
  for rank in 8 32; do
    dir=$root/runs/lora$rank/seed_$seed
    runs+=("lora$rank $seed")
    if PYTHONPATH=. "$py" -c "import sys, pathlib; from experiments import launch
sys.exit(not launch.is_finished(pathlib.Path(sys.argv[1])))" "$dir"; then
      continue  # finished; an interrupted run is started again and resumes
    fi
    mkdir -p "$dir"
    /usr/bin/time -v -o "$dir/time.txt" "$py" -m gmpo_jax.main \
      --config="configs/lora.py:$rank,ablation_default" --workdir="$dir" \
      --config.seed="$seed" --config.warm_start.init_from="$grid/warm_starts/seed_$seed" \
      > "$dir/launch.log" 2>&1
  done
done
"$py" - "$root" "${runs[@]}" <<'EOF'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
runs = [dict(zip(("point", "seed"), r.split())) for r in sys.argv[2:]]
configs = {
    "full": "configs/ablation_default.py (gmpo_design grid, point gmpo_full)",
    "lora8": "configs/lora.py:8,ablation_default",
    "lora32": "configs/lora.py:32,ablation_default",
}
points = [{"name": n, "config": c, "overrides": []} for n, c in configs.items()]
manifest = {"points": points, "runs": [
    {"point": r["point"], "seed": int(r["seed"]), "workdir": f"runs/{r['point']}/seed_{r['seed']}"}
    for r in runs]}
(root / "launch.json").write_text(json.dumps(manifest, indent=2) + "\n")
EOF
"$py" experiments/launch.py --aggregate-only --out="$root" \
  --metrics=eval/pass@1:max,eval/mean@64:max,eval/pass@64:max,reward/mean:max,entropy:min,approx_kl:max
