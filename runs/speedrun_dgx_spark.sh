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
#   NUM_SHARDS [by depth]  FineWeb-Edu shards to download (~100 MB each, the last one is validation)
#   NANOPIPE_BASE_DIR [~/.cache/nanopipe]   data, tokenizer, checkpoints, logs
#   NANOPIPE_REPORT_DIR [report/]   report sections and report.md
#   COMPILE [1 with a CUDA 13 toolkit, else 0]   torch.compile the training model
#   DOLLARS_PER_HOUR [0.19]   for the report's cost line (see below)
#   WANDB_RUN [unset]      also log pretraining to wandb under this name
#   FRESH=1                forget the step markers and reset the report (checkpoints stay: delete
#                          $NANOPIPE_BASE_DIR/checkpoints/base/d<DEPTH> to retrain from scratch)
#   DRY_RUN=1              do every check and the skip logic, print the GPU/network commands, run none, write nothing
#   SKIP_SETUP=1           use the python environment as it is (no runs/setup.sh)
#   NANOPIPE_SKIP_GPU_CHECK=1   skip the nvidia-smi / torch.cuda checks
#
# The plan for the defaults (numbers from base_train's own derivation, REFERENCE.md §2.3; the plan step
# prints them again for whatever DEPTH/SEQ_LEN you choose, with a measured step time):
#   model   d12: width 768, 6 heads of 128, seq 1024, vocab 32,768; 286M parameters, 110M of them "scaling"
#           (matmul weights + head) which set the token budget: 10.5 tokens per scaling parameter
#   batch   524,288 tokens per step (Power Lines auto) = 64 rows x 1024 tokens x 8 micro-batches
#   tokens  2,205 steps x 524,288 = 1.16B tokens (~23 FineWeb-Edu shards; 25 are downloaded)
#   compute 7.74e8 FLOPs per token, 8.9e17 FLOPs in all
#   speed   uncertain, and measured by the plan step before training starts. The reference fork claims 22.4% MFU
#           of a 209 TFLOPS peak = ~60k tok/s = 5.3 h of pretraining; its published run took 12h56m end to end,
#           i.e. ~31k tok/s = 10.4 h; its header's "1.6-3k tok/s, 15-20 h" matches d20 at seq 2048, not d12.
#           The GB10 peak itself is disputed (209 vs ~100 TFLOPS; NANOPIPE_PEAK_FLOPS=100e12 uses the lower one).
#           So expect 5-11 h of pretraining plus ~2-3 h for the rest (tokenizer, CORE, SFT, chat eval).
#   cost    DOLLARS_PER_HOUR 0.19: a ~$4,000 Spark written off over 3 years, plus ~240 W at $0.15/kWh.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "error: $*" >&2; exit 2; }
warn() { echo "warning: $*" >&2; }
is_count() { case "$1" in '' | *[!0-9]* | 0*) return 1 ;; esac; }

DRY_RUN=${DRY_RUN:-0}
DEPTH=${DEPTH:-12}
SEQ_LEN=${SEQ_LEN:-1024}
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-64}
DOLLARS_PER_HOUR=${DOLLARS_PER_HOUR:-0.19}
for var in DEPTH SEQ_LEN DEVICE_BATCH_SIZE; do
    is_count "${!var}" || die "$var=${!var}: must be a positive whole number"
done
# data needed: tokens = 10.5 x scaling params = 10.5 x (12 L w^2 + w x 32768) with width w = 64 L; at ~5 chars
# per token and ~250M chars per shard, rounded up, plus the val shard (d12: 25 shards, d20: 93)
plan_tokens=$(( 105 * (12 * DEPTH * (64 * DEPTH) ** 2 + 64 * DEPTH * 32768) / 10 ))
NUM_SHARDS=${NUM_SHARDS:-$(( plan_tokens * 5 / 250000000 + 2 ))}
if ! is_count "$NUM_SHARDS" || [ "$NUM_SHARDS" -lt 2 ]; then
    die "NUM_SHARDS=$NUM_SHARDS: need a whole number of at least 2 (train shards + the val shard)"
fi
MODEL_TAG="d$DEPTH"
export NANOPIPE_BASE_DIR="${NANOPIPE_BASE_DIR:-$HOME/.cache/nanopipe}"
export OMP_NUM_THREADS=1

# ---------------------------------------------------------------------------------------------------------
# prerequisites: a GPU, a CUDA 13 ptxas for sm_121, disk for the shards

if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
    command -v nvidia-smi >/dev/null \
        || die "no nvidia-smi on PATH: this script trains on an NVIDIA GPU and none is visible; install the NVIDIA driver, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    if ! gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1) || [ -z "$gpus" ]; then
        first_line=${gpus%%$'\n'*}
        die "nvidia-smi sees no GPU (${first_line:-it lists none}): check the driver with \`nvidia-smi\`, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    fi
    echo "GPU: $(echo "$gpus" | head -n 1)"
    case "$gpus" in
        *GB10*) ;;
        *) warn "this script's settings are tuned for a DGX Spark (GB10); for other GPUs see runs/speedrun_gpu.sh" ;;
    esac
    [ "$(echo "$gpus" | wc -l)" -eq 1 ] || warn "$(echo "$gpus" | wc -l) GPUs visible: this script uses one (runs/speedrun_gpu.sh uses all)"
fi

# Triton's bundled ptxas does not know sm_121a: torch.compile needs the CUDA 13 toolkit's (REFERENCE §1.7)
cuda_home=${CUDA_HOME:-/usr/local/cuda-13.0}
cuda_release=$("$cuda_home/bin/ptxas" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\)\..*/\1/p') || true
if [ -n "$cuda_release" ] && [ "$cuda_release" -ge 13 ]; then
    export CUDA_HOME="$cuda_home" TRITON_PTXAS_PATH="$cuda_home/bin/ptxas"
    export PATH="$cuda_home/bin:$PATH" LD_LIBRARY_PATH="$cuda_home/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "CUDA $cuda_release toolkit: $cuda_home (TRITON_PTXAS_PATH=$TRITON_PTXAS_PATH)"
    COMPILE=${COMPILE:-1}
else
    warn "no CUDA 13 toolkit in $cuda_home (${cuda_release:+its ptxas is CUDA $cuda_release; }set CUDA_HOME to yours): torch.compile may fail on sm_121, so the run proceeds without --compile (slower)"
    COMPILE=${COMPILE:-0}
fi

data_dir="$NANOPIPE_BASE_DIR/data/fineweb-edu"
shards_present=0
for f in "$data_dir"/shard_*.parquet; do
    if [ -e "$f" ]; then shards_present=$((shards_present + 1)); fi
done
# ~100 MB per missing shard, plus 15 GB for checkpoints, chat data and the eval bundle
need_gb=$(( ( (NUM_SHARDS > shards_present ? NUM_SHARDS - shards_present : 0) * 100 + 999) / 1000 + 15 ))
disk_dir="$NANOPIPE_BASE_DIR"
while [ ! -d "$disk_dir" ]; do disk_dir=$(dirname "$disk_dir"); done
free_gb=$(( $(df -Pk "$disk_dir" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
[ "$free_gb" -ge "$need_gb" ] \
    || die "not enough disk: $NUM_SHARDS FineWeb-Edu shards ($shards_present present) and checkpoints need ~$need_gb GB in $NANOPIPE_BASE_DIR, $disk_dir has $free_gb GB free; free some space, point NANOPIPE_BASE_DIR at a bigger disk, or lower NUM_SHARDS"

# ---------------------------------------------------------------------------------------------------------
# python environment (cu130 wheels: runs/setup.sh's default index), then the run

if [ "${SKIP_SETUP:-0}" = "1" ]; then
    echo "== setup: skipped (SKIP_SETUP=1)"
elif [ "$DRY_RUN" = "1" ]; then
    echo "== setup: bash runs/setup.sh"
else
    bash runs/setup.sh
fi
# shellcheck source=runs/common.sh
source runs/common.sh
if [ "$DRY_RUN" != "1" ]; then
    command -v "$PY" >/dev/null || die "no python at $PY: run \`bash runs/setup.sh\` (or activate your virtualenv) first"
    if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
        "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
            || die "the torch in $PY cannot use the GPU ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)')): reinstall it with \`$PY -m pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu130\`"
    fi
    mkdir -p "$NANOPIPE_BASE_DIR/runs"
    # one run per base dir at a time; the lock is inherited by the background download, so a rerun cannot
    # start a second download of the same shards while an orphaned one is still going
    exec 9>"$NANOPIPE_BASE_DIR/runs/.lock"
    flock -n 9 || die "another speedrun (or its background download) is using $NANOPIPE_BASE_DIR: wait for it or stop it"
fi
start_run "dgx_spark_$MODEL_TAG" "$MODEL_TAG"

compile_flag=()
if [ "$COMPILE" = "1" ]; then compile_flag=(--compile); fi
wandb_flag=()
if [ -n "${WANDB_RUN:-}" ]; then wandb_flag=(--wandb "$WANDB_RUN"); fi
train_flags=(--depth "$DEPTH" --max-seq-len "$SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE" --model-tag "$MODEL_TAG"
             "${compile_flag[@]}")

cat <<EOF
== settings: depth $DEPTH (tag $MODEL_TAG), seq $SEQ_LEN, $DEVICE_BATCH_SIZE rows per micro-batch, total batch and steps
   derived by base_train; $NUM_SHARDS FineWeb-Edu shards; compile: $COMPILE; base dir $NANOPIPE_BASE_DIR.
   Reference for d12/seq 1024: 2,205 steps x 524,288 = 1.16B tokens, 8.9e17 FLOPs. At the fork's claimed 22.4% MFU
   (~60k tok/s) that is 5.3 h; its published 12h56m run implies ~31k tok/s (10.4 h); its header's 1.6-3k tok/s
   fits d20, not d12. The measurement below (base_train --dry-run on this GPU) is the one to believe.
EOF
# a few timed micro-batches on this GPU: parameters, tokens, FLOPs, tok/s, MFU, memory, ETA; also fails fast
# on a bad DEVICE_BATCH_SIZE, an out-of-memory batch or a broken torch.compile, before any download
step plan "$PY" -m scripts.base_train "${train_flags[@]}" --dry-run

# FineWeb-Edu: the first shards now (the tokenizer trains on them), the rest in the background meanwhile
data_pid=
stop_download() { if [ -n "$data_pid" ]; then pkill -P "$data_pid" 2>/dev/null || true; kill "$data_pid" 2>/dev/null || true; fi; }
trap stop_download EXIT
trap 'exit 130' INT TERM
step data_head "$PY" -m nanopipe.dataset download fineweb-edu --num-shards $((NUM_SHARDS < 8 ? NUM_SHARDS : 8))
if [ "$NUM_SHARDS" -gt 8 ] && [ ! -f "$RUN_DIR/data.done" ]; then
    step data "$PY" -m nanopipe.dataset download fineweb-edu --num-shards "$NUM_SHARDS" &
    data_pid=$!
fi
step tok_train "$PY" -m scripts.tok_train
step tok_eval "$PY" -m scripts.tok_eval
# the small downloads too, so that a network problem shows in the first hour rather than after pretraining
step eval_bundle "$PY" -m nanopipe.dataset eval-bundle
step chat_data "$PY" -m nanopipe.dataset chat-data
if [ -n "$data_pid" ]; then
    echo "== waiting for the FineWeb-Edu download ($NUM_SHARDS shards)"
    wait "$data_pid" || die "the FineWeb-Edu download failed (messages above): rerun this script to resume it"
    data_pid=
fi

# save every 200 steps (~20-60 min): a crash or reboot loses at most that; CORE runs in base_eval, not mid-run
step base_train "$PY" -m scripts.base_train "${train_flags[@]}" --eval-every 500 --save-every 200 \
    --core-metric-every -1 --sample-every 1000 "${wandb_flag[@]}" --resume
step base_eval "$PY" -m scripts.base_eval --model-tag "$MODEL_TAG" --device-batch-size 16
step chat_sft "$PY" -m scripts.chat_sft --model-tag "$MODEL_TAG" --device-batch-size 16 --mixture real
step chat_eval "$PY" -m scripts.chat_eval -i sft --model-tag "$MODEL_TAG"

# the report is rebuilt on every run, so it always shows the sections present
report_cmd=("$PY" -m nanopipe.report generate --dollars-per-hour "$DOLLARS_PER_HOUR")
echo "== report: ${report_cmd[*]}"
if [ "$DRY_RUN" != "1" ]; then "${report_cmd[@]}"; fi

if [ "$DRY_RUN" = "1" ]; then outcome="dry run over: nothing was run or written"; else outcome="finished in $(elapsed) (this invocation)"; fi
cat <<EOF

== $outcome
   report:  ${NANOPIPE_REPORT_DIR:-$PWD/report}/report.md
   model:   $NANOPIPE_BASE_DIR/checkpoints/sft/$MODEL_TAG (base model: $NANOPIPE_BASE_DIR/checkpoints/base/$MODEL_TAG)
   chat:    $PY -m scripts.chat_cli --model-tag $MODEL_TAG      (or -p "Why is the sky blue?" for one answer)
EOF
