#!/usr/bin/env bash
# The full pipeline on one machine with one or more H100/A100-class GPUs (torchrun, one process per GPU):
# FineWeb-Edu -> tokenizer -> d20 pretraining -> CORE -> SFT -> ChatCORE -> report.md -> chat.
#
#   bash runs/speedrun_gpu.sh                              # in screen/tmux, e.g.
#   screen -L -Logfile gpu.log -S speedrun bash runs/speedrun_gpu.sh
#
# Rerun the same command after a crash or a kill: finished steps are skipped (markers in
# $NANOPIPE_BASE_DIR/runs/gpu_d<DEPTH>/) and pretraining continues from its last checkpoint (--resume;
# with the same NPROC: the checkpoint records the number of ranks).
#
# Environment (defaults in brackets):
#   NPROC [all visible GPUs]   processes = GPUs (CUDA_VISIBLE_DEVICES narrows them)
#   DEPTH [20]             model depth; every size, the batch and the token budget follow from it
#   SEQ_LEN [2048]         pretraining context length
#   DEVICE_BATCH_SIZE [32] rows per micro-batch per GPU; on an out-of-memory error halve it (gradient accumulation
#                          doubles, the result is the same); it must divide the total batch (base_train says so)
#   NUM_SHARDS [by depth]  FineWeb-Edu shards to download (~100 MB each, the last one is validation)
#   NANOPIPE_BASE_DIR [~/.cache/nanopipe]   data, tokenizer, checkpoints, logs
#   NANOPIPE_REPORT_DIR [report/]   report sections and report.md
#   NANOPIPE_TORCH_INDEX [by driver]   the PyTorch wheel index for runs/setup.sh (cu130, cu128 or cu126)
#   COMPILE [1]            torch.compile the training model
#   DOLLARS_PER_HOUR [3 x NPROC]   for the report's cost line (~$3 per GPU-hour on demand; set yours)
#   WANDB_RUN [unset]      also log pretraining to wandb under this name
#   FRESH=1                forget the step markers and reset the report (checkpoints stay: delete
#                          $NANOPIPE_BASE_DIR/checkpoints/base/d<DEPTH> to retrain from scratch)
#   DRY_RUN=1              do every check and the skip logic, print the GPU/network commands, run none, write nothing
#   SKIP_SETUP=1           use the python environment as it is (no runs/setup.sh)
#   NANOPIPE_SKIP_GPU_CHECK=1   skip the nvidia-smi / torch.cuda checks
#
# The plan for the defaults (base_train's derivation, REFERENCE.md §2.3; the plan step prints it for your
# settings with a measured step time): d20, width 1280, 10 heads, seq 2048, 897M parameters (435M scaling);
# 4,357 steps x 1,048,576 tokens = 4.57B tokens (93 shards), 3.24e9 FLOPs/token, 1.5e19 FLOPs in all. At an
# assumed 30-45% MFU (PyTorch SDPA attention) that is ~1.2-1.7 h on 8 H100s, ~9-14 h on one.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "error: $*" >&2; exit 2; }
warn() { echo "warning: $*" >&2; }
is_count() { case "$1" in '' | *[!0-9]* | 0*) return 1 ;; esac; }

DRY_RUN=${DRY_RUN:-0}
DEPTH=${DEPTH:-20}
SEQ_LEN=${SEQ_LEN:-2048}
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-32}
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
# prerequisites: GPUs (how many, and the driver's CUDA version for the wheel index), disk for the shards

gpu_count=
if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
    command -v nvidia-smi >/dev/null \
        || die "no nvidia-smi on PATH: this script trains on NVIDIA GPUs and none is visible; install the NVIDIA driver, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    if ! gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1) || [ -z "$gpus" ]; then
        first_line=${gpus%%$'\n'*}
        die "nvidia-smi sees no GPU (${first_line:-it lists none}): check the driver with \`nvidia-smi\`, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    fi
    gpu_count=$(echo "$gpus" | wc -l)
    echo "GPUs: $gpu_count x $(echo "$gpus" | head -n 1)"
    case "$gpus" in *GB10*) warn "a DGX Spark: runs/speedrun_dgx_spark.sh has the settings (and CUDA 13 set-up) for it" ;; esac
    # the newest wheel index this driver can run (cu130 needs a CUDA 13 driver)
    read -r cuda_major cuda_minor < <(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || true
    if [ -z "${NANOPIPE_TORCH_INDEX:-}" ] && [ -n "${cuda_minor:-}" ]; then
        driver_cuda=$((cuda_major * 100 + cuda_minor))
        if [ "$driver_cuda" -ge 1300 ]; then wheels=cu130
        elif [ "$driver_cuda" -ge 1208 ]; then wheels=cu128
        elif [ "$driver_cuda" -ge 1206 ]; then wheels=cu126
        else die "the NVIDIA driver supports CUDA $cuda_major.$cuda_minor only, PyTorch's wheels need 12.6 or newer: update the driver"
        fi
        export NANOPIPE_TORCH_INDEX="https://download.pytorch.org/whl/$wheels"
    fi
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    gpu_count=${#visible[@]}
fi
NPROC=${NPROC:-${gpu_count:-1}}
is_count "$NPROC" || die "NPROC=$NPROC: must be a positive whole number (processes = GPUs)"
if [ -n "$gpu_count" ] && [ "$NPROC" -gt "$gpu_count" ]; then
    die "NPROC=$NPROC but $gpu_count GPU(s) visible: one process per GPU, so NPROC <= $gpu_count"
fi
DOLLARS_PER_HOUR=${DOLLARS_PER_HOUR:-$((3 * NPROC))}

data_dir="$NANOPIPE_BASE_DIR/data/fineweb-edu"
shards_present=0
for f in "$data_dir"/shard_*.parquet; do
    if [ -e "$f" ]; then shards_present=$((shards_present + 1)); fi
done
# ~100 MB per missing shard, plus 40 GB for checkpoints (d20: ~10 GB each), chat data and the eval bundle
need_gb=$(( ( (NUM_SHARDS > shards_present ? NUM_SHARDS - shards_present : 0) * 100 + 999) / 1000 + 40 ))
disk_dir="$NANOPIPE_BASE_DIR"
while [ ! -d "$disk_dir" ]; do disk_dir=$(dirname "$disk_dir"); done
free_gb=$(( $(df -Pk "$disk_dir" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
[ "$free_gb" -ge "$need_gb" ] \
    || die "not enough disk: $NUM_SHARDS FineWeb-Edu shards ($shards_present present) and checkpoints need ~$need_gb GB in $NANOPIPE_BASE_DIR, $disk_dir has $free_gb GB free; free some space, point NANOPIPE_BASE_DIR at a bigger disk, or lower NUM_SHARDS"

# ---------------------------------------------------------------------------------------------------------
# python environment, then the run

if [ "${SKIP_SETUP:-0}" = "1" ]; then
    echo "== setup: skipped (SKIP_SETUP=1)"
elif [ "$DRY_RUN" = "1" ]; then
    echo "== setup: ${NANOPIPE_TORCH_INDEX:+NANOPIPE_TORCH_INDEX=$NANOPIPE_TORCH_INDEX }bash runs/setup.sh"
else
    bash runs/setup.sh
fi
# shellcheck source=runs/common.sh
source runs/common.sh
if [ "$DRY_RUN" != "1" ]; then
    command -v "$PY" >/dev/null || die "no python at $PY: run \`bash runs/setup.sh\` (or activate your virtualenv) first"
    if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
        "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
            || die "the torch in $PY cannot use the GPU ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)')): reinstall it with \`$PY -m pip install --force-reinstall torch --index-url ${NANOPIPE_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}\`"
    fi
    mkdir -p "$NANOPIPE_BASE_DIR/runs"
    # one run per base dir at a time; the lock is inherited by the background download, so a rerun cannot
    # start a second download of the same shards while an orphaned one is still going
    exec 9>"$NANOPIPE_BASE_DIR/runs/.lock"
    flock -n 9 || die "another speedrun (or its background download) is using $NANOPIPE_BASE_DIR: wait for it or stop it"
fi
start_run "gpu_$MODEL_TAG" "$MODEL_TAG"

torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")  # = torchrun, from this venv
compile_flag=()
if [ "${COMPILE:-1}" = "1" ]; then compile_flag=(--compile); fi
wandb_flag=()
if [ -n "${WANDB_RUN:-}" ]; then wandb_flag=(--wandb "$WANDB_RUN"); fi
train_flags=(--depth "$DEPTH" --max-seq-len "$SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE" --model-tag "$MODEL_TAG"
             "${compile_flag[@]}")

echo "== settings: $NPROC GPU process(es), depth $DEPTH (tag $MODEL_TAG), seq $SEQ_LEN, $DEVICE_BATCH_SIZE rows per micro-batch per GPU, $NUM_SHARDS FineWeb-Edu shards, base dir $NANOPIPE_BASE_DIR"
# a few timed micro-batches: parameters, tokens, FLOPs, tok/s, MFU, memory, ETA; also fails fast on a bad
# DEVICE_BATCH_SIZE/NPROC combination, an out-of-memory batch or a broken torch.compile, before any download
step plan "${torchrun[@]}" -m scripts.base_train "${train_flags[@]}" --dry-run

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
step eval_bundle "$PY" -m nanopipe.dataset eval-bundle
step chat_data "$PY" -m nanopipe.dataset chat-data
if [ -n "$data_pid" ]; then
    echo "== waiting for the FineWeb-Edu download ($NUM_SHARDS shards)"
    wait "$data_pid" || die "the FineWeb-Edu download failed (messages above): rerun this script to resume it"
    data_pid=
fi

step base_train "${torchrun[@]}" -m scripts.base_train "${train_flags[@]}" --save-every 500 --core-metric-every -1 \
    --sample-every 1000 "${wandb_flag[@]}" --resume
step base_eval "${torchrun[@]}" -m scripts.base_eval --model-tag "$MODEL_TAG"
step chat_sft "${torchrun[@]}" -m scripts.chat_sft --model-tag "$MODEL_TAG" --mixture real
step chat_eval "${torchrun[@]}" -m scripts.chat_eval -i sft --model-tag "$MODEL_TAG"

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
