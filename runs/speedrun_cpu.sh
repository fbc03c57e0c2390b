#!/usr/bin/env bash
# The offline main job: the whole pipeline on the built-in synthetic world, on CPU, no network needed.
#
#   bash runs/speedrun_cpu.sh
#
# set-up -> synthetic data -> tokenizer -> pretraining -> base eval (CORE on the world's tasks, bpb) -> SFT
# -> chat eval of the base and the SFT model (the SFT one with and without the calculator) -> report.md.
# About 22 minutes on 2 CPU cores, set-up included (report/example.md is one such run).
#
# Rerunning continues where it stopped: finished steps are skipped and training resumes from its last
# checkpoint (kill it at any point and run it again). FRESH=1 starts over (new checkpoints and report).
# Overrides: NANOPIPE_BASE_DIR (default ~/.cache/nanopipe), NANOPIPE_REPORT_DIR, DEPTH, VOCAB, SEQ_LEN,
# BASE_STEPS, SFT_STEPS, SAVE_EVERY, CORE_MAX_PER_TASK, CHAT_EVAL_PROBLEMS, DOLLARS_PER_HOUR,
# MODEL_TAG (default d<DEPTH>; TAG is its old name),
# OMP_NUM_THREADS (default 1), SKIP_SETUP=1 (skip runs/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != "1" ]; then bash runs/setup.sh; fi
# shellcheck source=runs/common.sh
source runs/common.sh

export NANOPIPE_BASE_DIR="${NANOPIPE_BASE_DIR:-$HOME/.cache/nanopipe}"
export NANOPIPE_DATA=synthetic
export NANOPIPE_DEVICE="${NANOPIPE_DEVICE:-cpu}"
# one thread per process: these models are small, and two threads on two busy cores ran 2-4x slower here
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DEPTH="${DEPTH:-4}"
VOCAB="${VOCAB:-2048}"
SEQ_LEN="${SEQ_LEN:-256}"
BASE_STEPS="${BASE_STEPS:-200}"
SFT_STEPS="${SFT_STEPS:-400}"
SAVE_EVERY="${SAVE_EVERY:-25}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:--1}"
CHAT_EVAL_PROBLEMS="${CHAT_EVAL_PROBLEMS:--1}"  # -1: every held-out item (200 per task)
DOLLARS_PER_HOUR="${DOLLARS_PER_HOUR:-0.10}"  # what a small 2-core cloud VM costs, for the report's estimate
model_tag_setting "d$DEPTH"

start_run "cpu_$MODEL_TAG" "$MODEL_TAG"
echo "nanopipe CPU speedrun: depth $DEPTH, seq $SEQ_LEN, vocab $VOCAB, $BASE_STEPS pretraining + $SFT_STEPS SFT steps"
echo "base dir: $NANOPIPE_BASE_DIR"

step data        "$PY" -m scripts.dataset synthetic
step tok_train   "$PY" -m scripts.tok_train --vocab-size "$VOCAB"
step tok_eval    "$PY" -m scripts.tok_eval
step base_train  "$PY" -m scripts.base_train --depth "$DEPTH" --head-dim 64 --max-seq-len "$SEQ_LEN" \
                     --device-batch-size 16 --total-batch-size 8192 --num-iterations "$BASE_STEPS" \
                     --matrix-lr 0.06 --embedding-lr 1.0 --unembedding-lr 0.02 \
                     --warmup-ratio 0.02 --warmdown-ratio 0.4 --eval-every 50 --eval-tokens 65536 \
                     --save-every "$SAVE_EVERY" --sample-every -1 --core-metric-every -1 \
                     --model-tag "$MODEL_TAG" --resume
step base_eval   "$PY" -m scripts.base_eval --device-batch-size 16 --eval-tokens 65536 \
                     --max-per-task "$CORE_MAX_PER_TASK" --model-tag "$MODEL_TAG"
step chat_sft    "$PY" -m scripts.chat_sft --num-iterations "$SFT_STEPS" --device-batch-size 8 \
                     --eval-every 100 --val-conversations 200 --save-every "$SAVE_EVERY" \
                     --model-tag "$MODEL_TAG" --resume
step chat_eval_base "$PY" -m scripts.chat_eval -i base --max-per-task "$CHAT_EVAL_PROBLEMS" --max-new-tokens 64 \
                     --model-tag "$MODEL_TAG"
step chat_eval   "$PY" -m scripts.chat_eval -i sft --max-per-task "$CHAT_EVAL_PROBLEMS" --max-new-tokens 64 \
                     --tool-ablation --model-tag "$MODEL_TAG"
"$PY" -m nanopipe.report generate --dollars-per-hour "$DOLLARS_PER_HOUR"

report_dir="${NANOPIPE_REPORT_DIR:-report}"
echo
echo "done in $(elapsed)."
echo "  report: $report_dir/report.md"
echo "  models: $NANOPIPE_BASE_DIR/checkpoints/{base,sft}/$MODEL_TAG"
echo "  chat:   $PY -m scripts.chat_cli --model-tag $MODEL_TAG   (or -p \"What is the capital of ...?\" for one answer)"
echo
echo "the SFT model answers the README's example prompts (greedy, scripts.chat_cli --demo -t 0):"
"$PY" -m scripts.chat_cli --demo -t 0 --model-tag "$MODEL_TAG"
