#!/usr/bin/env bash
# The embedded tiny default of examples/pretrain_jam_cross.sh, end to end on a CPU laptop:
#   1. generate a small interleaved corpus and a sentencepiece model (megatron_jam.training.tiny_corpus)
#   2. shard it (tools/preprocess_interleaved.py): text-only and image-text prefixes, one vocabulary layout
#   3. briefly pretrain two tiny parents: a Llama-style LLM on text, a CM3leon-style model on image-text (CM3)
#   4. merge them (tools/convert_checkpoint.py --method cross)
#   5. continue pretraining JAM-Cross on the 50/50 blend with 2 processes (TP=2, sequence parallel)
#      (NPROC=1 for one GPU: TP=1 without sequence parallelism; TRAIN_ARGS="--bf16" adds flags to this step)
#   6. plot the loss (loss.png next to metrics.jsonl)
# Output: $OUT (default runs/jam-cross-tiny): checkpoint, model_config.json, vocab_layout.json, metrics.jsonl,
# loss.png; the corpus, shards, parents and the merged initial checkpoint stay in $WORK.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-runs/jam-cross-tiny}
WORK=${WORK:-runs/jam-cross-tiny-work}
NPROC=${NPROC:-2}
PARENT_ITERS=${PARENT_ITERS:-40}
TRAIN_ITERS=${TRAIN_ITERS:-60}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$OUT" "$WORK"
mkdir -p "$WORK"
TRAIN_ARGS=(${TRAIN_ARGS:-})   # extra flags for step 5, e.g. TRAIN_ARGS="--bf16" on a GPU
RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" -m megatron_jam.pretrain)
SP=()
if [ "$NPROC" -gt 1 ]; then SP=(--sequence-parallel); fi   # sequence parallelism needs TP > 1 (NPROC=1: one GPU)
COMMON=(--tensor-model-parallel-size "$NPROC" "${SP[@]}" --seq-length 128 --micro-batch-size 4
        --global-batch-size 8 --lr-warmup-iters 4 --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0
        --log-interval 10 --split 95,5,0)

echo "== [1/6] corpus -> $WORK/corpus"
"$PY" -m megatron_jam.training.tiny_corpus "$WORK/corpus" >/dev/null
echo "== [2/6] shards -> $WORK/data"
PRE=("$PY" tools/preprocess_interleaved.py --tokenizer-model "$WORK/corpus/spm.model" --codebook-size 64
     --tokens-per-image 16 --num-sentinels 8 --workers 1 --no-progress-bar)
"${PRE[@]}" --input "$WORK/corpus/text.jsonl" --output-prefix "$WORK/data/text" >/dev/null
"${PRE[@]}" --input "$WORK/corpus/imgtext.jsonl" --output-prefix "$WORK/data/imgtext" \
    --vocab-layout "$WORK/data/text.vocab.json" >/dev/null
echo "== [3/6] parents: LLM on text, image-text model on image-text ($PARENT_ITERS steps each)"
"${RUN[@]}" "${COMMON[@]}" --model-config examples/configs/parent_llm_tiny.json --data-path "$WORK/data/text" \
    --no-cm3 --train-iters "$PARENT_ITERS" --lr 3e-3 --min-lr 3e-4 --save "$WORK/llm"
"${RUN[@]}" "${COMMON[@]}" --model-config examples/configs/parent_img_tiny.json --data-path "$WORK/data/imgtext" \
    --train-iters "$PARENT_ITERS" --lr 3e-3 --min-lr 3e-4 --save "$WORK/img"
echo "== [4/6] merge: --method cross --cross-every 2"
"$PY" tools/convert_checkpoint.py --method cross --llm "$WORK/llm" --img "$WORK/img" --cross-every 2 \
    --vocab-layout "$WORK/data/text.vocab.json" --seq-length 128 --save "$WORK/cross-init"
echo "== [5/6] JAM-Cross continued pretraining ($TRAIN_ITERS steps, TP=$NPROC, SP) -> $OUT"
"${RUN[@]}" "${COMMON[@]}" --load "$WORK/cross-init" --data-path 0.5 "$WORK/data/text" 0.5 "$WORK/data/imgtext" \
    --valid-data-path "text=$WORK/data/text" "image=$WORK/data/imgtext" --eval-interval 20 --eval-iters 2 \
    --train-iters "$TRAIN_ITERS" --lr 1e-3 --min-lr 1e-4 --save "$OUT" --save-interval "$TRAIN_ITERS" --log-interval 2 \
    "${TRAIN_ARGS[@]}"
echo "== [6/6] loss plot"
"$PY" -m megatron_jam.training.plot "$OUT"
cp "$WORK/data/text.vocab.json" "$OUT/vocab_layout.json"   # read by tools/generate_interleaved.py
cat <<MSG

Done. $OUT holds the checkpoint, model_config.json, metrics.jsonl and loss.png.
Next: generate an interleaved document from it, e.g.
  $PY tools/generate_interleaved.py --load $OUT --tokenizer-model $WORK/corpus/spm.model \\
      --prompt "a picture of a red cat ." --prompt "the blue dog" --output $OUT/generations
MSG
