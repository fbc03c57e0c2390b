#!/usr/bin/env bash
# The full pipeline in about a day on one NVIDIA DGX Spark (GB10, sm_121, 128 GB unified memory):
# FineWeb-Edu -> tokenizer -> d12 pretraining -> CORE -> SFT -> ChatCORE -> report.md -> chat.
#
#   bash runs/speedrun_dgx_spark.sh                        # in screen/tmux: it runs for hours, e.g.
#   screen -L -Logfile spark.log -S speedrun bash runs/speedrun_dgx_spark.sh
#
# Rerun the same command after a crash, a kill or a reboot: finished steps are skipped (markers in
# $NANOPIPE_BASE_DIR/runs/dgx_spark_d<DEPTH>/) and pretraining continues from its last checkpoint (--resume).
#
# Environment (defaults in brackets):
#   DEPTH [12]             model depth; every size, the batch and the token budget follow from it
#   SEQ_LEN [1024]         pretraining context length
#   DEVICE_BATCH_SIZE [64] rows per micro-batch; on an out-of-memory error halve it (gradient accumulation
#                          doubles, the result is the same); it must divide the total batch (base_train says so)
#   NUM_SHARDS [by the plan]  FineWeb-Edu shards to download (~100 MB each, the last one is validation): the
#                          tokens base_train plans for DEPTH/SEQ_LEN (its --dry-run --json), at ~5 chars a token
#   MODEL_TAG [d<DEPTH>]   checkpoint and log name (TAG, its old name, still works)
#   NANOPIPE_BASE_DIR [~/.cache/nanopipe]   data, tokenizer, checkpoints, logs
#   NANOPIPE_REPORT_DIR [report/]   report sections and report.md
#   COMPILE [1]            torch.compile the training model; a compile probe (runs/compile_probe.py, seconds)
#                          first proves it works here, else the run stops naming the fix; COMPILE=0: eager, ~2x slower
#   CUDA_HOME [searched]   the CUDA >= 13 toolkit whose ptxas Triton needs for sm_121: $CUDA_HOME, else
#                          /usr/local/cuda, else the newest /usr/local/cuda-13.* (CUDA_PREFIX=/usr/local)
#   DOLLARS_PER_HOUR [0.19]   for the report's cost line (see below)
#   WANDB_RUN [unset]      also log pretraining to wandb under this name
#   FRESH=1                start over: deletes the step markers and MODEL_TAG's checkpoints and logs and resets
#                          the report (data and tokenizer are kept: rebuilding them gives the same bytes)
#   DRY_RUN=1              do every check and the skip logic, print the GPU/network commands, run none, write nothing
#   SKIP_SETUP=1           use the python environment as it is (no runs/setup.sh)
#   NANOPIPE_SKIP_GPU_CHECK=1   skip the nvidia-smi / torch.cuda checks
#
# The recipe is upstream nanochat's current one, not the Spark fork's (README "Differences from nanochat"):
# smear + backout, RoPE base 100k, q/k x1.2, VE gate 3*sigmoid over 12 channels, per-group AdamW betas/decay,
# unembedding LR 0.008, Muon with MuonEq + Muon+ (NorMuon beta2 0.9), momentum 0.85 -> 0.97 -> 0.90, warmdown
# 0.65 to 5% of the LR, Muon weight decay 0.28 cosine to 0, 12 tokens per scaling parameter (fork: 10.5).
#
# The plan for the defaults (numbers from base_train's own derivation; the plan step prints them again for
# whatever DEPTH/SEQ_LEN you choose, with a measured step time):
#   model   d12: width 768, 6 heads of 128, seq 1024, vocab 32,768; 286M parameters, 110M of them "scaling"
#           (matmul weights + head) which set the token budget: 12 tokens per scaling parameter
#   batch   524,288 tokens per step (Power Lines auto) = 64 rows x 1024 tokens x 8 micro-batches
#   tokens  2,520 steps x 524,288 = 1.32B tokens (~27 FineWeb-Edu shards; 28 are downloaded);
#           the fork's plan was 2,205 steps = 1.16B tokens
#   compute 7.74e8 FLOPs per token, 1.02e18 FLOPs in all; Muon weight decay 0.28, LR x1.0
#   speed   uncertain, and measured by the plan step before training starts. The reference fork claims 22.4% MFU
#           of a 209 TFLOPS peak = ~60k tok/s = 6.1 h for these tokens; its published run took 12h56m end to end,
#           i.e. ~31k tok/s = 11.8 h here; its header's "1.6-3k tok/s, 15-20 h" matches d20 at seq 2048, not d12.
#           The GB10 peak itself is disputed (209 vs ~100 TFLOPS; NANOPIPE_PEAK_FLOPS=100e12 uses the lower one).
#           So expect 6-12 h of pretraining plus ~2-3 h for the rest (tokenizer, CORE, SFT, chat eval).
#   cost    DOLLARS_PER_HOUR 0.19: a ~$4,000 Spark written off over 3 years, plus ~240 W at $0.15/kWh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=runs/common.sh
source runs/common.sh  # step, start_run, and the parts shared with runs/speedrun_gpu.sh

# DEPTH 12, SEQ_LEN 1024, DEVICE_BATCH_SIZE 64 unless set; MODEL_TAG; COMPILE
settings_from_depth 12 1024 64
compile_setting
DOLLARS_PER_HOUR=${DOLLARS_PER_HOUR:-0.19}

# ---------------------------------------------------------------------------------------------------------
# prerequisites: a GPU, a CUDA 13 ptxas for sm_121, the python environment, disk for the shards, a compiler
# that works; all checked before anything is written

if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
    list_gpus
    echo "GPU: $(echo "$gpus" | head -n 1)"
    case "$gpus" in
        *GB10*) ;;
        *) warn "this script's settings are tuned for a DGX Spark (GB10); for other GPUs see runs/speedrun_gpu.sh" ;;
    esac
    [ "$(echo "$gpus" | wc -l)" -eq 1 ] || warn "$(echo "$gpus" | wc -l) GPUs visible: this script uses one" \
                                                "(runs/speedrun_gpu.sh uses all)"
fi

# Triton's bundled ptxas does not know sm_121a: torch.compile needs the CUDA 13 toolkit's (REFERENCE §1.7)
find_cuda_toolkit
case "${gpus:-}" in *GB10*) need_cuda13_for_compile ;; esac

# cu130 wheels (runs/setup.sh's default index; it adds Triton where the aarch64 wheels lack it)
setup_python https://download.pytorch.org/whl/cu130
shards_from_plan  # NUM_SHARDS
check_disk 15  # GB for checkpoints, chat data and the eval bundle, besides the missing shards
compile_probe

# ---------------------------------------------------------------------------------------------------------
# the run

lock_base_dir
start_run "dgx_spark_$MODEL_TAG" "$MODEL_TAG"

train_flags=(--depth "$DEPTH" --max-seq-len "$SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE"
             --model-tag "$MODEL_TAG")
if [ "$COMPILE" = "1" ]; then train_flags+=(--compile); fi
wandb_flag=()
if [ -n "${WANDB_RUN:-}" ]; then wandb_flag=(--wandb "$WANDB_RUN"); fi

cat <<EOF
== settings: depth $DEPTH (tag $MODEL_TAG), seq $SEQ_LEN, $DEVICE_BATCH_SIZE rows per micro-batch, total batch and steps
   derived by base_train; $NUM_SHARDS FineWeb-Edu shards; compile: $COMPILE; base dir $NANOPIPE_BASE_DIR.
   Reference for d12/seq 1024: 2,520 steps x 524,288 = 1.32B tokens, 1.02e18 FLOPs. At the fork's claimed 22.4% MFU
   (~60k tok/s) that is 6.1 h; its published 12h56m run implies ~31k tok/s (11.8 h); its header's 1.6-3k tok/s
   fits d20, not d12. The measurement below (base_train --dry-run on this GPU) is the one to believe.
EOF
# a few timed micro-batches on this GPU: parameters, tokens, FLOPs, tok/s, MFU, memory, ETA; also fails fast
# on a bad DEVICE_BATCH_SIZE, an out-of-memory batch or a broken torch.compile, before any download
step plan "$PY" -m scripts.base_train "${train_flags[@]}" --dry-run

# FineWeb-Edu (the first 8 shards now, the rest in the background), tok_train, tok_eval, eval_bundle, chat_data
data_and_tokenizer_steps

# save every 200 steps (~20-60 min): a crash or reboot loses at most that; CORE runs in base_eval, not mid-run
step base_train "$PY" -m scripts.base_train "${train_flags[@]}" --eval-every 500 --save-every 200 \
    --core-metric-every -1 --sample-every 1000 "${wandb_flag[@]}" --resume
step base_eval "$PY" -m scripts.base_eval --model-tag "$MODEL_TAG" --device-batch-size 16
step chat_sft "$PY" -m scripts.chat_sft --model-tag "$MODEL_TAG" --device-batch-size 16 --mixture real
step chat_eval "$PY" -m scripts.chat_eval -i sft --model-tag "$MODEL_TAG"

finish_run  # report.md, and where the report and the model are
