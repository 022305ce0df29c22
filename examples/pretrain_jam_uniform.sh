#!/usr/bin/env bash
# JAM-Uniform continued pretraining (paper section 2.1.1): a single-stack model from
#   python tools/convert_checkpoint.py --method uniform --llm LLM --img IMG --save ckpt/jam-uniform --llm-weight 0.5
# then
#   TP=8 PP=1 bash examples/pretrain_jam_uniform.sh --load ckpt/jam-uniform --save ckpt/jam-uniform-pt \
#       --data-path 0.5 shards/text 0.5 shards/imgtext
# The paper's hyper-parameters (section 3.1) are the defaults; later flags override them.
source "$(dirname "$0")/launch.sh"
if [ $# -eq 0 ]; then echo "usage: $0 --load CONVERTED_CHECKPOINT --save DIR --data-path ... [flags]" >&2; exit 2; fi
ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
if [ "${TP:-1}" -gt 1 ]; then ARGS+=(--sequence-parallel); fi
launch "${ARGS[@]}" "${PAPER_PRETRAIN[@]}" "${GPU_ARGS[@]}" "$@"
