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
#   NUM_SHARDS [by the plan]  FineWeb-Edu shards to download (~100 MB each, the last one is validation): the
#                          tokens base_train plans for DEPTH/SEQ_LEN (its --dry-run --json), at ~5 chars a token
#   MODEL_TAG [d<DEPTH>]   checkpoint and log name (TAG, its old name, still works)
#   NANOPIPE_BASE_DIR [~/.cache/nanopipe]   data, tokenizer, checkpoints, logs
#   NANOPIPE_REPORT_DIR [report/]   report sections and report.md
#   NANOPIPE_TORCH_INDEX [by driver]   the PyTorch wheel index for runs/setup.sh (cu130, cu128 or cu126)
#   COMPILE [1]            torch.compile the training model; a compile probe (runs/compile_probe.py, seconds)
#                          first proves it works here, else the run stops naming the fix; COMPILE=0: eager, ~2x slower
#   CUDA_HOME [searched]   a CUDA >= 13 toolkit, used for Triton's ptxas when found ($CUDA_HOME, /usr/local/cuda,
#                          the newest /usr/local/cuda-13.*; CUDA_PREFIX=/usr/local); else Triton's bundled ptxas
#   DOLLARS_PER_HOUR [3 x NPROC]   for the report's cost line (~$3 per GPU-hour on demand; set yours)
#   WANDB_RUN [unset]      also log pretraining to wandb under this name
#   FRESH=1                start over: deletes the step markers and MODEL_TAG's checkpoints and logs and resets
#                          the report (data and tokenizer are kept: rebuilding them gives the same bytes)
#   DRY_RUN=1              do every check and the skip logic, print the GPU/network commands, run none, write nothing
#   SKIP_SETUP=1           use the python environment as it is (no runs/setup.sh)
#   NANOPIPE_SKIP_GPU_CHECK=1   skip the nvidia-smi / torch.cuda checks
#
# The plan for the defaults (base_train's derivation, REFERENCE.md §2.3; the plan step prints it for your
# settings with a measured step time): d20, width 1280, 10 heads, seq 2048, 897M parameters (435M scaling);
# 4,980 steps x 1,048,576 tokens = 5.22B tokens (ratio 12; 106 shards), 3.24e9 FLOPs/token, 1.7e19 FLOPs in
# all. At an assumed 30-45% MFU (PyTorch SDPA attention) that is ~1.3-2.0 h on 8 H100s, ~11-16 h on one.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=runs/common.sh
source runs/common.sh  # step, start_run, and the parts shared with runs/speedrun_dgx_spark.sh

# DEPTH 20, SEQ_LEN 2048, DEVICE_BATCH_SIZE 32 unless set; MODEL_TAG; COMPILE
settings_from_depth 20 2048 32
compile_setting

# ---------------------------------------------------------------------------------------------------------
# prerequisites: GPUs (how many, and the driver's CUDA version for the wheel index), the python environment,
# disk for the shards, a compiler that works; all checked before anything is written

gpu_count=
if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ]; then
    list_gpus
    gpu_count=$(echo "$gpus" | wc -l)
    echo "GPUs: $gpu_count x $(echo "$gpus" | head -n 1)"
    case "$gpus" in
        *GB10*) warn "a DGX Spark: runs/speedrun_dgx_spark.sh has the settings (and CUDA 13 set-up) for it" ;;
    esac
    # the newest wheel index this driver can run (cu130 needs a CUDA 13 driver)
    read -r cuda_major cuda_minor < <(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || true
    if [ -z "${NANOPIPE_TORCH_INDEX:-}" ] && [ -n "${cuda_minor:-}" ]; then
        driver_cuda=$((cuda_major * 100 + cuda_minor))
        if [ "$driver_cuda" -ge 1300 ]; then wheels=cu130
        elif [ "$driver_cuda" -ge 1208 ]; then wheels=cu128
        elif [ "$driver_cuda" -ge 1206 ]; then wheels=cu126
        else die "the NVIDIA driver supports CUDA $cuda_major.$cuda_minor only, PyTorch's wheels need 12.6 or newer:" \
                 "update the driver"
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
find_cuda_toolkit  # optional here: Triton's bundled ptxas knows Hopper and Blackwell datacenter GPUs

setup_python "${NANOPIPE_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
shards_from_plan  # NUM_SHARDS
check_disk 40  # GB for checkpoints (d20: ~10 GB each), chat data and the eval bundle, besides the missing shards
compile_probe

# ---------------------------------------------------------------------------------------------------------
# the run

lock_base_dir
start_run "gpu_$MODEL_TAG" "$MODEL_TAG"

torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")  # = torchrun, from this venv
train_flags=(--depth "$DEPTH" --max-seq-len "$SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE"
             --model-tag "$MODEL_TAG")
if [ "$COMPILE" = "1" ]; then train_flags+=(--compile); fi
wandb_flag=()
if [ -n "${WANDB_RUN:-}" ]; then wandb_flag=(--wandb "$WANDB_RUN"); fi

echo "== settings: $NPROC GPU process(es), depth $DEPTH (tag $MODEL_TAG), seq $SEQ_LEN, $DEVICE_BATCH_SIZE rows" \
     "per micro-batch per GPU, $NUM_SHARDS FineWeb-Edu shards, base dir $NANOPIPE_BASE_DIR"
# a few timed micro-batches: parameters, tokens, FLOPs, tok/s, MFU, memory, ETA; also fails fast on a bad
# DEVICE_BATCH_SIZE/NPROC combination, an out-of-memory batch or a broken torch.compile, before any download
step plan "${torchrun[@]}" -m scripts.base_train "${train_flags[@]}" --dry-run

# FineWeb-Edu (the first 8 shards now, the rest in the background), tok_train, tok_eval, eval_bundle, chat_data
data_and_tokenizer_steps

step base_train "${torchrun[@]}" -m scripts.base_train "${train_flags[@]}" --save-every 500 --core-metric-every -1 \
    --sample-every 1000 "${wandb_flag[@]}" --resume
step base_eval "${torchrun[@]}" -m scripts.base_eval --model-tag "$MODEL_TAG"
step chat_sft "${torchrun[@]}" -m scripts.chat_sft --model-tag "$MODEL_TAG" --mixture real
step chat_eval "${torchrun[@]}" -m scripts.chat_eval -i sft --model-tag "$MODEL_TAG"

finish_run  # report.md, and where the report and the model are
