#!/usr/bin/env bash
# JAM-Cross continued pretraining.
#
#   bash examples/pretrain_jam_cross.sh                 # laptop: the embedded tiny model, 2 CPU processes
#   NPROC=8 TP=2 PP=2 bash examples/pretrain_jam_cross.sh --model-config ckpt/model_config.json ...
#   sbatch --nodes=4 --ntasks-per-node=8 examples/pretrain_jam_cross.sh ...   # Slurm: srun, one task per GPU
#
# Extra arguments are passed to `python -m megatron_jam.pretrain` (Megatron-LM flag names).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${JAM_SKIP_INSTALL:-}" ]; then bash scripts/install.sh; fi
VENV=${JAM_VENV:-.venv}
PY=python3
[ "$VENV" != "none" ] && PY="$VENV/bin/python"

TP=${TP:-2}
PP=${PP:-1}
NPROC=${NPROC:-2}
ARGS=(
  --tensor-model-parallel-size "$TP"
  --pipeline-model-parallel-size "$PP"
  --micro-batch-size "${MBS:-4}"
  --global-batch-size "${GBS:-16}"
  --train-iters "${TRAIN_ITERS:-60}"
  --lr "${LR:-3e-3}" --min-lr 3e-4 --lr-warmup-iters 5 --lr-decay-style cosine
  --weight-decay 0.01 --clip-grad 1.0
  --log-interval "${LOG_INTERVAL:-5}"
)
[ "$TP" -gt 1 ] && ARGS+=(--sequence-parallel)

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${JAM_NO_SRUN:-}" ]; then
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=${MASTER_PORT:-29500}
  exec srun --kill-on-bad-exit=1 "$PY" -m megatron_jam.pretrain "${ARGS[@]}" "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" -m megatron_jam.pretrain "${ARGS[@]}" "$@"
