#!/usr/bin/env bash
# The toy-scale ablation of docs/ablations.md with the float8 engine: six losses x three seeds of
# the quickstart (200 steps each), then the table and the plots. About 3 minutes a run on 2 CPU
# cores. Runs already finished are skipped, so the script can be started again after a stop.
#   scripts/float8-ablation.sh [RUNS_DIR]        (default runs/float8-ablation)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/float8-ablation}"
seeds=(1234 1235 1236)
# name -> loss overrides (the thresholds of the authors' recipes; relax_below as recipes/qwen3-30b-a3b)
declare -A losses=(
  [dppo_binary_tv]="loss.mode=dppo_binary_tv loss.low=0.15 loss.high=0.15"
  [dppo_topk_kl]="loss.mode=dppo_topk_kl loss.low=0.05 loss.high=0.05"
  [grpo]="loss.mode=grpo loss.low=0.2 loss.high=0.28"
  [cispo]="loss.mode=cispo loss.low=0.2 loss.high=0.28"
  [pg_is]="loss.mode=pg_is"
  [grpo_relax_high]="loss.mode=grpo_relax_high loss.low=0.2 loss.high=0.28 loss.relax_below=0.1"
)
order=(dppo_binary_tv dppo_topk_kl grpo cispo pg_is grpo_relax_high)
for seed in "${seeds[@]}"; do
  for name in "${order[@]}"; do
    dir="$runs/s$seed/$name"
    if grep -q '"state": "finished"' "$dir/status.json" 2>/dev/null; then continue; fi
    rm -rf "$dir"
    # shellcheck disable=SC2086
    dppo-megatron train recipes/tiny/quickstart.yaml rollout.dtype=float8 trainer.seed="$seed" \
        ${losses[$name]} --run-dir "$dir"
  done
done
python scripts/ablation_table.py "$runs" "${order[@]}"
dirs=()
for name in "${order[@]}"; do dirs+=("$runs/s1234/$name"); done
dppo-megatron plot "${dirs[@]}" --labels "${order[@]}" --out docs/ablations/float8
