#!/usr/bin/env bash
# Instruction tuning of a pretrained JAM-Cross (paper section 2.2): interleaved prompt/response
# documents (tools/preprocess_instruct.py: loss on responses only), optionally blended with
# image-text pretraining data (Table 5), plain causal LM (no CM3), weights only from --load.
#
#   TP=4 bash examples/instruct_tune_jam_cross.sh --load ckpt/jam-cross-pt --save ckpt/jam-cross-it \
#       --data-path 0.8 shards/wikihow_instruct 0.2 shards/shutterstock --train-iters 400
source "$(dirname "$0")/launch.sh"
if [ $# -eq 0 ]; then echo "usage: $0 --load PRETRAINED --save DIR --data-path ... [flags]" >&2; exit 2; fi
ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
if [ "${TP:-1}" -gt 1 ]; then ARGS+=(--sequence-parallel); fi
launch "${ARGS[@]}" "${PAPER_INSTRUCT[@]}" "${GPU_ARGS[@]}" "$@"
