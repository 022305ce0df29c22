#!/usr/bin/env bash
# Instruction tuning of a pretrained JAM-Cross (paper sections 2.2, 3.1): interleaved prompt/response
# documents (tools/preprocess_instruct.py: loss on responses only), one whole document per sample,
# optionally blended with image-text pretraining data (Table 5), the CM3 objective, weights only from
# --load, EPOCHS (15) epochs with the best one named in <save>/best_checkpointed_iteration.txt.
#
#   TP=4 bash examples/instruct_tune_jam_cross.sh --load ckpt/jam-cross-pt --save ckpt/jam-cross-it \
#       --data-path 0.8 shards/wikihow_instruct 0.2 shards/shutterstock --valid-data-path it=shards/instruct_valid
source "$(dirname "$0")/launch.sh"
if [ $# -eq 0 ]; then echo "usage: $0 --load PRETRAINED --save DIR --data-path ... [flags]" >&2; exit 2; fi
ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
if [ "${TP:-1}" -gt 1 ]; then ARGS+=(--sequence-parallel); fi
launch "${ARGS[@]}" "${PAPER_INSTRUCT[@]}" "${GPU_ARGS[@]}" "$@"
