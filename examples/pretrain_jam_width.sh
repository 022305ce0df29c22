#!/usr/bin/env bash
# JAM-Width continued pretraining (paper section 2.1.2): a single-stack model from
#   python tools/convert_checkpoint.py --method width --llm LLM --img IMG --save ckpt/jam-width --width-init copy
# then
#   TP=8 PP=2 bash examples/pretrain_jam_width.sh --load ckpt/jam-width --save ckpt/jam-width-pt \
#       --data-path 0.5 shards/text 0.5 shards/imgtext
# The paper's hyper-parameters (section 3.1) are the defaults; later flags override them.
source "$(dirname "$0")/launch.sh"
if [ $# -eq 0 ]; then echo "usage: $0 --load CONVERTED_CHECKPOINT --save DIR --data-path ... [flags]" >&2; exit 2; fi
ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
if [ "${TP:-1}" -gt 1 ]; then ARGS+=(--sequence-parallel); fi
launch "${ARGS[@]}" "${PAPER_PRETRAIN[@]}" "${GPU_ARGS[@]}" "$@"
