# Sourced by the example scripts: install if needed, then run `python -m megatron_jam.pretrain`
# under torchrun (one node) or srun (Slurm: one task per GPU, rank and master address from
# Slurm's variables). Usage: launch ARG...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${JAM_SKIP_INSTALL:-}" ]; then bash scripts/install.sh; fi
VENV=${JAM_VENV:-.venv}
PY=python3
[ "$VENV" != "none" ] && PY="$VENV/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

launch() {
  if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${JAM_NO_SRUN:-}" ]; then
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-29500}
    exec srun --kill-on-bad-exit=1 "$PY" -m megatron_jam.pretrain "$@"
  fi
  local nproc=${NPROC:-$(has_gpu && nvidia-smi -L | wc -l || echo 2)}
  exec "$PY" -m torch.distributed.run --nproc_per_node "$nproc" -m megatron_jam.pretrain "$@"
}

# Paper section 3.1 (continued pretraining): lr 3e-5, 500 warm-up steps, 8M-token global batches
# (2048 x 4096 tokens), sequence length 4096, about 5,960 steps.
PAPER_PRETRAIN=(--seq-length 4096 --global-batch-size 2048 --micro-batch-size 1 --lr 3e-5 --min-lr 3e-6
                --lr-warmup-iters 500 --lr-decay-style cosine --train-iters 5960 --weight-decay 0.1
                --clip-grad 1.0 --log-interval 10 --save-interval 500 --eval-interval 500 --eval-iters 20)
# Instruction tuning (sections 2.2, 3.1): lr 1e-5, 300 warm-up steps, 1M-token batches, the CM3 objective as
# in every experiment of the paper, 15 epochs with a validation and a checkpoint after each (the lowest average
# validation perplexity named in <save>/best_checkpointed_iteration.txt; the paper kept the 9th epoch by hand).
# Instruction prefixes train one whole document per sample (--whole-documents auto), responses only
# (--prompt-loss to train on prompts too: the paper does not say).
PAPER_INSTRUCT=(--seq-length 4096 --global-batch-size 256 --micro-batch-size 1 --lr 1e-5 --min-lr 1e-6
                --lr-warmup-iters 300 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
                --train-epochs "${EPOCHS:-15}" --finetune --log-interval 10)
# Retrieval augmentation (section 3.1: CLIP + MIPS, near duplicates skipped, 20% query dropout) where the
# paper trains with it: the image-text (Shutterstock-like) data of both phases. Up to RETRIEVAL_K (3, as
# CM3leon) retrieved documents go before each of its samples, so every image-text --data-path prefix needs
# PREFIX.neighbors.npy (tools/build_retrieval_index.py + tools/retrieve.py; docs/training_data.md section 5)
# or the run stops naming it; text-only and instruction prefixes are trained packed. RETRIEVAL=0 switches it
# off (e.g. the paper's "without retrieval" instruct model, tuned on instruction data only).
RETRIEVAL_ARGS=()
if [ "${RETRIEVAL:-1}" != "0" ]; then RETRIEVAL_ARGS=(--retrieval-k "${RETRIEVAL_K:-3}"); fi
PAPER_PRETRAIN+=("${RETRIEVAL_ARGS[@]}")
PAPER_INSTRUCT+=("${RETRIEVAL_ARGS[@]}")
GPU_ARGS=()
if has_gpu; then
  GPU_ARGS=(--bf16 --use-distributed-optimizer --num-workers 2)
  # Transformer Engine specs where TE is installed (NGC images); Megatron-Core's local specs otherwise.
  if "$PY" -c "import transformer_engine" >/dev/null 2>&1; then GPU_ARGS+=(--transformer-impl transformer_engine); fi
fi
