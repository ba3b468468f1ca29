#!/usr/bin/env bash
# The single-machine path: the learner's ranks and the rollout servers on this machine.
#   launch/local.sh recipes/tiny/quickstart.yaml loss.mode=grpo
# It is `dppo-megatron train`; SLURM jobs (`dppo-megatron submit`, launch/slurm/job.sbatch) run
# the same trainer, with srun + torchrun instead.
set -euo pipefail
exec "${PYTHON:-python3}" -m dppo_megatron train "$@"
