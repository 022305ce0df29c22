#!/usr/bin/env bash
# The embedded tiny default of examples/pretrain_jam_cross.sh, end to end on a CPU laptop:
#   1. draw a picture world (megatron_jam.data.picture_world): coloured shapes as PNG files, captions,
#      how-to documents with pictures, a text-only corpus, a sentencepiece model, a prompt set
#   2. train a tiny VQ image tokenizer on its pictures (tools/train_image_tokenizer.py; a transformers JanusVQVAE)
#   3. shard it (tools/preprocess_interleaved.py --image-tokenizer): text-only and image-text prefixes, one layout
#   4. briefly pretrain two tiny parents: a Llama-style LLM on text, a CM3leon-style model on image-text (CM3)
#   5. merge them (tools/convert_checkpoint.py --method cross)
#   6. continue pretraining JAM-Cross on the 50/50 blend with 2 processes, data parallel (DDP)
#      (TP=2 for tensor + sequence parallelism instead: 3.7x slower per step on 2 CPU cores, gloo; NPROC=1 for
#      one GPU; TRAIN_ARGS="--bf16" adds flags to this step)
#   7. plot the loss (loss.png next to metrics.jsonl)
#   8. generate documents with pictures (tools/generate_interleaved.py): $OUT/generations/index.html
# Output: $OUT (default runs/jam-cross-tiny): checkpoint, model_config.json, vocab_layout.json, metrics.jsonl,
# loss.png, generations/; the world, the VQ tokenizer, shards, parents and the merged initial checkpoint stay
# in $WORK.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-runs/jam-cross-tiny}
WORK=${WORK:-runs/jam-cross-tiny-work}
NPROC=${NPROC:-2}
TP=${TP:-1}
LLM_ITERS=${LLM_ITERS:-300}
IMG_ITERS=${IMG_ITERS:-600}
TRAIN_ITERS=${TRAIN_ITERS:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ $((NPROC % TP)) -ne 0 ] || [ $((16 % NPROC)) -ne 0 ] || [ $((8 % (NPROC / TP))) -ne 0 ]; then
  echo "error: NPROC=$NPROC, TP=$TP: NPROC must be a multiple of TP and divide 16, NPROC/TP must divide 8" >&2
  exit 2
fi
rm -rf "$OUT" "$WORK"
mkdir -p "$WORK"
TRAIN_ARGS=(${TRAIN_ARGS:-})   # extra flags for step 6, e.g. TRAIN_ARGS="--bf16" on a GPU
RUN1=("$PY" -m torch.distributed.run --nproc_per_node 1 -m megatron_jam.pretrain)
RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" -m megatron_jam.pretrain)
SP=()
if [ "$TP" -gt 1 ]; then SP=(--sequence-parallel); fi   # sequence parallelism needs TP > 1
COMMON=(--seq-length 128 --micro-batch-size 4 --global-batch-size 8 --lr-warmup-iters 4 --lr-decay-style cosine
        --weight-decay 0.01 --clip-grad 1.0 --log-interval 20 --split 95,5,0)
W="$WORK/world"
PRE=("$PY" tools/preprocess_interleaved.py --tokenizer-model "$W/spm.model" --image-tokenizer "$WORK/vq"
     --num-sentinels 8 --workers 1 --no-progress-bar)

echo "== [1/8] picture world -> $W"
"$PY" -m megatron_jam.data.picture_world "$W" 2>/dev/null
# The LLM parent needs only text: it trains on one core while the VQ tokenizer trains on the other.
echo "== [2/8] VQ image tokenizer -> $WORK/vq, meanwhile the LLM parent on text ($LLM_ITERS steps, log: $WORK/llm.log)"
"$PY" tools/preprocess_interleaved.py --tokenizer-model "$W/spm.model" --input "$W/text.jsonl" --output-prefix \
    "$WORK/data/text-only" --codebook-size 1 --tokens-per-image 1 --num-sentinels 8 --workers 1 --no-progress-bar >/dev/null
"${RUN1[@]}" "${COMMON[@]}" --model-config examples/configs/parent_llm_tiny.json --data-path "$WORK/data/text-only" \
    --no-cm3 --train-iters "$LLM_ITERS" --lr 3e-3 --min-lr 3e-4 --save "$WORK/llm" > "$WORK/llm.log" 2>&1 &
LLM_PID=$!
if ! "$PY" tools/train_image_tokenizer.py --input "$W/imgtext.jsonl" "$W/interleaved.jsonl" --save "$WORK/vq" \
    --num-threads 1 ${VQ_ITERS:+--train-iters "$VQ_ITERS"} > "$WORK/vq.log" 2>&1; then
  kill "$LLM_PID" 2>/dev/null || true
  tail -20 "$WORK/vq.log"; echo "error: the VQ tokenizer failed to train (log: $WORK/vq.log)" >&2; exit 1
fi
tail -1 "$WORK/vq.log"   # its summary: reconstruction error before/after, codebook usage, seconds
wait "$LLM_PID" || { tail -20 "$WORK/llm.log"; echo "error: the LLM parent failed (log: $WORK/llm.log)" >&2; exit 1; }
grep -E " iteration +[0-9]+/" "$WORK/llm.log" | tail -1 | sed 's/.*metrics: *//' || true
echo "== [3/8] shards -> $WORK/data"
"${PRE[@]}" --input "$W/text.jsonl" --output-prefix "$WORK/data/text" >/dev/null
"${PRE[@]}" --input "$W/imgtext.jsonl" "$W/interleaved.jsonl" --output-prefix "$WORK/data/imgtext" \
    --vocab-layout "$WORK/data/text.vocab.json" >/dev/null
echo "== [4/8] image-text parent on image-text, CM3 ($IMG_ITERS steps, $NPROC processes, data parallel)"
"${RUN[@]}" "${COMMON[@]}" --model-config examples/configs/parent_img_tiny.json --data-path "$WORK/data/imgtext" \
    --train-iters "$IMG_ITERS" --global-batch-size 16 --micro-batch-size $((16 / NPROC)) --lr 5e-3 --min-lr 3e-4 \
    --log-interval 100 --save "$WORK/img"
echo "== [5/8] merge: --method cross --cross-every 2"
"$PY" tools/convert_checkpoint.py --method cross --llm "$WORK/llm" --img "$WORK/img" --cross-every 2 \
    --vocab-layout "$WORK/data/text.vocab.json" --seq-length 128 --save "$WORK/cross-init" >/dev/null
echo "== [6/8] JAM-Cross continued pretraining ($TRAIN_ITERS steps, $NPROC processes, TP=$TP) -> $OUT"
"${RUN[@]}" "${COMMON[@]}" --tensor-model-parallel-size "$TP" "${SP[@]}" --micro-batch-size $((8 * TP / NPROC)) \
    --load "$WORK/cross-init" \
    --data-path 0.5 "$WORK/data/text" 0.5 "$WORK/data/imgtext" --valid-data-path "text=$WORK/data/text" \
    "image=$WORK/data/imgtext" --eval-interval 100 --eval-iters 4 --train-iters "$TRAIN_ITERS" --lr 3e-3 \
    --min-lr 1e-4 --log-interval 50 --save "$OUT" --save-interval "$TRAIN_ITERS" "${TRAIN_ARGS[@]}"
echo "== [7/8] loss plot"
"$PY" -m megatron_jam.training.plot "$OUT"
echo "== [8/8] generation -> $OUT/generations"
# The run folder is self-contained (vocab_layout.json, tokenizer/, image_tokenizer/): --load is all it needs.
GEN=("$PY" tools/generate_interleaved.py --load "$OUT" --cfg-scale 3.5 --image-top-p 0.9 --max-new-tokens 100
     --no-progress-bar)
"${GEN[@]}" --prompts-file examples/tiny/prompts.jsonl --output "$OUT/generations" >/dev/null
cat <<MSG

Done. Open $OUT/generations/index.html: documents written by the model, with its pictures decoded by
the VQ tokenizer. $OUT also holds the checkpoint, model_config.json, metrics.jsonl and loss.png.
Next: how well do its pictures follow the prompt, with and without guidance?
  $PY tools/evaluate_generation.py --load $OUT --prompts-file $W/prompts.jsonl --cfg-scale 1 2 3.5 5 \\
      --output $OUT/prompt_following.json
MSG
