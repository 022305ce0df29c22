#!/usr/bin/env bash
# JAM-Cross continued pretraining (paper section 2.1.3).
#
#   bash examples/pretrain_jam_cross.sh      # no arguments, no GPU: the embedded tiny default, end to end
#                                            # (corpus, two tiny parents, --method cross merge, TP=2 training,
#                                            #  loss plot) into runs/jam-cross-tiny/, a few minutes on 2 cores
#   TP=4 PP=2 bash examples/pretrain_jam_cross.sh --load ckpt/jam-cross --save ckpt/jam-cross-pt \
#       --data-path 0.5 shards/text 0.5 shards/imgtext --valid-data-path text=shards/wiki image=shards/coco
#   sbatch examples/slurm/pretrain_jam_cross.sbatch ...      # Slurm, srun, one task per GPU
#
# With arguments, the paper's hyper-parameters (section 3.1) are the defaults; any
# `python -m megatron_jam.pretrain` flag after the script name overrides them.
source "$(dirname "$0")/launch.sh"
if [ $# -eq 0 ] && ! has_gpu; then
  exec env PY="$PY" bash examples/tiny/run_tiny_jam_cross.sh
fi
ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
if [ "${TP:-1}" -gt 1 ]; then ARGS+=(--sequence-parallel); fi
launch "${ARGS[@]}" "${PAPER_PRETRAIN[@]}" "${GPU_ARGS[@]}" "$@"
