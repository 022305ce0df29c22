#!/usr/bin/env bash
# The JAM paper's ablations (Tables 2-5) rerun at small scale on the picture world, with a report:
#   bash examples/study/run_study.sh --quick            # under 5 minutes on 2 CPU cores
#   bash examples/study/run_study.sh                    # the default (docs/study.md), under 30 minutes
#   bash examples/study/run_study.sh --seeds 1 2 3 --output runs/study-3seeds
#   bash examples/study/run_study.sh --num-layers 8 --hidden-size 256 --train-iters 2000 --jobs 1   # a GPU
# World -> VQ tokenizer -> shards -> two parents (once) -> JAM-Uniform, JAM-Width (copy, average),
# JAM-Cross (k=1, 2, 4) from the same parents -> instruction tuning of JAM-Cross k=2 with and without
# image-text data; each through the project's tools. Output: $OUTPUT/report.md (default runs/study), its
# PNGs, summary.json and every tool's JSON and log. Flags: python -m megatron_jam.study --help.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export JAM_STUDY_COMMAND="bash examples/study/run_study.sh $*"
exec "$PY" -m megatron_jam.study "$@"
