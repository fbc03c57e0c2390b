# shellcheck shell=bash
# Sourced by the speedrun scripts: the python to use, and `step`, which runs a stage once; below, the parts
# the two GPU speedruns share.
#
#   step NAME command...   runs the command unless NAME finished in this run already (a marker file in
#                          $RUN_DIR); a failed or killed step has no marker, so rerunning the script
#                          retries it (training steps pass --resume and continue from their checkpoint).
#   DRY_RUN=1              start_run and step read the markers but write nothing: step prints the command
#                          it would run and runs nothing.

if [ -n "${VIRTUAL_ENV:-}" ]; then PY=python; else PY="$PWD/.venv/bin/python"; fi
export PYTHONUNBUFFERED=1

start_run() {  # start_run NAME TAG: set RUN_DIR; a first run resets the report; FRESH=1 starts over
    RUN_DIR="$NANOPIPE_BASE_DIR/runs/$1"
    RUN_START=$(date +%s)
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    if [ "${FRESH:-0}" = "1" ]; then
        # the markers, and the model tag's checkpoints and logs (data and tokenizer are kept: rebuilding
        # them gives the same bytes); otherwise --resume would continue the old run
        rm -rf "$RUN_DIR" "$NANOPIPE_BASE_DIR/checkpoints/base/$2" "$NANOPIPE_BASE_DIR/checkpoints/sft/$2" \
               "$NANOPIPE_BASE_DIR/logs/$2.jsonl" "$NANOPIPE_BASE_DIR/logs/sft-$2.jsonl"
    fi
    if [ ! -d "$RUN_DIR" ]; then
        mkdir -p "$RUN_DIR"
        "$PY" -m nanopipe.report reset
    fi
}

step() {
    local name="$1"; shift
    if [ -f "$RUN_DIR/$name.done" ]; then
        echo "== $name: done already (delete $RUN_DIR/$name.done to redo it)"
        return 0
    fi
    echo "== $name: $*"
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    "$@"
    touch "$RUN_DIR/$name.done"
}

elapsed() { local s=$(( $(date +%s) - RUN_START )); printf '%dh%02dm%02ds' $((s/3600)) $((s%3600/60)) $((s%60)); }

# ---------------------------------------------------------------------------------------------------------
# The GPU speedruns' shared parts (speedrun_dgx_spark.sh, speedrun_gpu.sh): settings, checks, set-up, the data
# steps and the closing report. Settings are globals, as in the scripts: DEPTH, SEQ_LEN, DEVICE_BATCH_SIZE,
# NUM_SHARDS, MODEL_TAG, DOLLARS_PER_HOUR, DRY_RUN, NANOPIPE_BASE_DIR.

die() { echo "error: $*" >&2; exit 2; }
warn() { echo "warning: $*" >&2; }
is_count() { case "$1" in '' | *[!0-9]* | 0*) return 1 ;; esac; }

settings_from_depth() {  # settings_from_depth DEPTH SEQ_LEN DEVICE_BATCH_SIZE: the defaults of those three;
    # checks them and sets MODEL_TAG and the base dir (NUM_SHARDS comes from the plan: shards_from_plan)
    local var
    DEPTH=${DEPTH:-$1} SEQ_LEN=${SEQ_LEN:-$2} DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-$3}
    for var in DEPTH SEQ_LEN DEVICE_BATCH_SIZE; do
        is_count "${!var}" || die "$var=${!var}: must be a positive whole number"
    done
    if [ -n "${NUM_SHARDS:-}" ] && { ! is_count "$NUM_SHARDS" || [ "$NUM_SHARDS" -lt 2 ]; }; then
        die "NUM_SHARDS=$NUM_SHARDS: need a whole number of at least 2 (train shards + the val shard)"
    fi
    model_tag_setting "d$DEPTH"
    export NANOPIPE_BASE_DIR="${NANOPIPE_BASE_DIR:-$HOME/.cache/nanopipe}"
    export OMP_NUM_THREADS=1
}

model_tag_setting() {  # model_tag_setting DEFAULT: MODEL_TAG, as every run script names it (TAG: its old name)
    MODEL_TAG=${MODEL_TAG:-${TAG:-$1}}
    case "$MODEL_TAG" in
        '' | *[!A-Za-z0-9._-]* | [.-]*) die "MODEL_TAG=$MODEL_TAG: use letters, digits, '.', '_' and '-' (e.g. d12)" ;;
    esac
}

shards_from_plan() {  # NUM_SHARDS (unless set): what the token budget base_train plans for these settings needs
    local out plan tokens new_base=0 rc=0
    command -v "$PY" >/dev/null \
        || die "no python at $PY: run \`bash runs/setup.sh\` (or activate your virtualenv) first"
    # the plan alone, on meta tensors (seconds, no GPU); a batch that does not divide the total batch stops here
    # with base_train's own message. Its tokenizer lookup creates the base dir, which a first run removes again
    if [ ! -d "$NANOPIPE_BASE_DIR" ]; then new_base=1; fi
    out=$("$PY" -m scripts.base_train --depth "$DEPTH" --max-seq-len "$SEQ_LEN" \
              --device-batch-size "$DEVICE_BATCH_SIZE" --dry-run --json --device meta 2>&1) || rc=$?
    if [ "$new_base" = "1" ]; then rmdir "$NANOPIPE_BASE_DIR" 2>/dev/null || true; fi
    if [ "$rc" != "0" ]; then
        out=$(printf '%s\n' "$out" | grep '^error: ' | tail -n 1)
        die "${out#error: } (DEPTH=$DEPTH SEQ_LEN=$SEQ_LEN DEVICE_BATCH_SIZE=$DEVICE_BATCH_SIZE)"
    fi
    plan=$(printf '%s\n' "$out" | tail -n 1)
    tokens=$(printf '%s\n' "$plan" | "$PY" -c 'import json, sys; p = json.load(sys.stdin)
print(p["num_iterations"] * p["total_batch_size"])') || die "base_train --dry-run --json printed no plan: $plan"
    # ~5 chars per token and ~250M chars per shard, rounded down, plus one for the remainder and the val
    # shard (d12: 1.32B tokens, 28 shards; d20: 5.22B, 106)
    NUM_SHARDS=${NUM_SHARDS:-$(( tokens * 5 / 250000000 + 2 ))}
}

list_gpus() {  # set gpus to nvidia-smi's GPU names, one a line; stop with directions when there is none
    command -v nvidia-smi >/dev/null \
        || die "no nvidia-smi on PATH: this script trains on an NVIDIA GPU and none is visible; install the NVIDIA" \
               "driver, or run \`bash runs/speedrun_cpu.sh\` for the CPU demo" \
               "(NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    if ! gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1) || [ -z "$gpus" ]; then
        local first_line=${gpus%%$'\n'*}
        die "nvidia-smi sees no GPU (${first_line:-it lists none}): check the driver with \`nvidia-smi\`, or run" \
            "\`bash runs/speedrun_cpu.sh\` for the CPU demo (NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"
    fi
}

find_cuda_toolkit() {  # CUDA_TOOLKIT: the first CUDA >= 13 toolkit of $CUDA_HOME, $CUDA_PREFIX/cuda and
    # $CUDA_PREFIX/cuda-<version> (newest first; CUDA_PREFIX defaults to /usr/local), judged by its ptxas's release;
    # empty if none. Found, it becomes CUDA_HOME and both ptxas variables: Triton reads TRITON_PTXAS_BLACKWELL_PATH
    # for compute capability >= 10 (GB10 is sm_121) and TRITON_PTXAS_PATH below. LD_LIBRARY_PATH stays as it is:
    # torch's wheels bring their own CUDA libraries.
    local prefix=${CUDA_PREFIX:-/usr/local} dir release
    local -a candidates=()
    CUDA_TOOLKIT='' CUDA_TOOLKITS_SEEN=''
    if [ -n "${CUDA_HOME:-}" ]; then candidates+=("$CUDA_HOME"); fi
    candidates+=("$prefix/cuda")
    while IFS= read -r dir; do candidates+=("$dir"); done < <(printf '%s\n' "$prefix"/cuda-[0-9]* | sort -rV)
    for dir in "${candidates[@]}"; do
        [ -x "$dir/bin/ptxas" ] || continue
        release=$("$dir/bin/ptxas" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9]*\).*/\1/p') || true
        [ -n "$release" ] || continue
        if [ "${release%%.*}" -ge 13 ]; then
            CUDA_TOOLKIT=$dir
            export CUDA_HOME="$dir" TRITON_PTXAS_PATH="$dir/bin/ptxas" TRITON_PTXAS_BLACKWELL_PATH="$dir/bin/ptxas"
            export PATH="$dir/bin:$PATH"
            echo "CUDA $release toolkit: $dir (TRITON_PTXAS_PATH and TRITON_PTXAS_BLACKWELL_PATH=$dir/bin/ptxas)"
            return 0
        fi
        CUDA_TOOLKITS_SEEN="${CUDA_TOOLKITS_SEEN:+$CUDA_TOOLKITS_SEEN, }CUDA $release at $dir"
    done
    echo "no CUDA >= 13 toolkit${CUDA_TOOLKITS_SEEN:+ (only $CUDA_TOOLKITS_SEEN)}: Triton would use its bundled ptxas"
}

need_cuda13_for_compile() {  # on a GB10 (sm_121) Triton's bundled ptxas cannot build kernels: CUDA 13's must
    if [ "$COMPILE" = "0" ] || [ -n "$CUDA_TOOLKIT" ]; then return 0; fi
    die "no CUDA >= 13 toolkit in \$CUDA_HOME, ${CUDA_PREFIX:-/usr/local}/cuda or" \
        "${CUDA_PREFIX:-/usr/local}/cuda-13.*${CUDA_TOOLKITS_SEEN:+ (found only $CUDA_TOOLKITS_SEEN)}: torch.compile" \
        "on the GB10 (sm_121) needs CUDA 13's ptxas; install the CUDA 13 toolkit and set CUDA_HOME to it" \
        "(e.g. CUDA_HOME=/usr/local/cuda-13.0), or set COMPILE=0 to train without torch.compile (about 2x slower)"
}

compile_setting() {  # COMPILE: 1 (the default) or 0; checked
    COMPILE=${COMPILE:-1}
    case "$COMPILE" in 0 | 1) ;; *) die "COMPILE=$COMPILE: use 1 (torch.compile, the default) or 0 (eager)" ;; esac
}

compile_probe() {  # with COMPILE=1: a tiny torch.compile on the training device (runs/compile_probe.py, seconds),
    # so that a Triton or ptxas that cannot build kernels stops the run now, before any download, not hours in
    local cmd=("$PY" runs/compile_probe.py) out cause
    if [ "$COMPILE" = "0" ]; then return 0; fi
    echo "== compile_probe: ${cmd[*]}"
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    if ! out=$(timeout "${COMPILE_PROBE_TIMEOUT:-600}" "${cmd[@]}" 2>&1); then
        cause=$(printf '%s\n' "$out" | sed -n 's/^compile probe: failed: //p' | tail -n 1)
        die "torch.compile cannot build kernels here (${cause:-the probe timed out or crashed}): point CUDA_HOME at a" \
            "CUDA >= 13 toolkit (its ptxas; \`bash runs/setup.sh\` installs a missing Triton), or set COMPILE=0 to" \
            "train without torch.compile (about 2x slower)"
    fi
    echo "$out"
}

check_disk() {  # check_disk GB: room for the missing FineWeb-Edu shards (~100 MB each) plus GB for the rest
    local f shards_present=0 need_gb disk_dir free_gb
    for f in "$NANOPIPE_BASE_DIR/data/fineweb-edu"/shard_*.parquet; do
        if [ -e "$f" ]; then shards_present=$((shards_present + 1)); fi
    done
    need_gb=$(( ( (NUM_SHARDS > shards_present ? NUM_SHARDS - shards_present : 0) * 100 + 999) / 1000 + $1 ))
    disk_dir="$NANOPIPE_BASE_DIR"
    while [ ! -d "$disk_dir" ]; do disk_dir=$(dirname "$disk_dir"); done
    free_gb=$(( $(df -Pk "$disk_dir" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
    [ "$free_gb" -ge "$need_gb" ] \
        || die "not enough disk: $NUM_SHARDS FineWeb-Edu shards ($shards_present present) and checkpoints need" \
               "~$need_gb GB in $NANOPIPE_BASE_DIR, $disk_dir has $free_gb GB free; free some space, point" \
               "NANOPIPE_BASE_DIR at a bigger disk, or lower NUM_SHARDS"
}

setup_python() {  # setup_python WHEEL_INDEX: runs/setup.sh, then check that $PY's torch sees the GPU
    if [ "${SKIP_SETUP:-0}" = "1" ]; then
        echo "== setup: skipped (SKIP_SETUP=1)"
    elif [ "${DRY_RUN:-0}" = "1" ]; then
        echo "== setup: ${NANOPIPE_TORCH_INDEX:+NANOPIPE_TORCH_INDEX=$NANOPIPE_TORCH_INDEX }bash runs/setup.sh"
    else
        bash runs/setup.sh
    fi
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    command -v "$PY" >/dev/null \
        || die "no python at $PY: run \`bash runs/setup.sh\` (or activate your virtualenv) first"
    if [ "${NANOPIPE_SKIP_GPU_CHECK:-0}" != "1" ] \
        && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        local built
        built=$("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)')
        die "the torch in $PY cannot use the GPU ($built): reinstall it with" \
            "\`$PY -m pip install --force-reinstall torch --index-url $1\`"
    fi
}

lock_base_dir() {  # one run per base dir at a time (nothing to lock in a dry run)
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    mkdir -p "$NANOPIPE_BASE_DIR/runs"
    # the lock is inherited by the background download, so a rerun cannot start a second download of the
    # same shards while an orphaned one is still going
    exec 9>"$NANOPIPE_BASE_DIR/runs/.lock"
    flock -n 9 \
        || die "another speedrun (or its background download) is using $NANOPIPE_BASE_DIR: wait for it or stop it"
}

data_and_tokenizer_steps() {  # FineWeb-Edu, the tokenizer, the CORE bundle, the chat data: data_head ... chat_data
    # the first shards now (the tokenizer trains on them), the rest in the background meanwhile
    data_pid=
    trap stop_download EXIT
    trap 'exit 130' INT TERM
    step data_head "$PY" -m scripts.dataset download fineweb-edu --num-shards $((NUM_SHARDS < 8 ? NUM_SHARDS : 8))
    if [ "$NUM_SHARDS" -gt 8 ] && [ ! -f "$RUN_DIR/data.done" ]; then
        step data "$PY" -m scripts.dataset download fineweb-edu --num-shards "$NUM_SHARDS" &
        data_pid=$!
    fi
    step tok_train "$PY" -m scripts.tok_train
    step tok_eval "$PY" -m scripts.tok_eval
    # the small downloads too, so that a network problem shows in the first hour rather than after pretraining
    step eval_bundle "$PY" -m scripts.dataset eval-bundle
    step chat_data "$PY" -m scripts.dataset chat-data
    if [ -n "$data_pid" ]; then
        echo "== waiting for the FineWeb-Edu download ($NUM_SHARDS shards)"
        wait "$data_pid" || die "the FineWeb-Edu download failed (messages above): rerun this script to resume it"
        data_pid=
    fi
}

stop_download() {
    if [ -n "${data_pid:-}" ]; then
        pkill -P "$data_pid" 2>/dev/null || true
        kill "$data_pid" 2>/dev/null || true
    fi
}

finish_run() {  # the report (rebuilt on every run, so it always shows the sections present), then where things are
    local report_cmd=("$PY" -m nanopipe.report generate --dollars-per-hour "$DOLLARS_PER_HOUR") outcome
    echo "== report: ${report_cmd[*]}"
    if [ "${DRY_RUN:-0}" = "1" ]; then
        outcome="dry run over: nothing was run or written"
    else
        "${report_cmd[@]}"
        outcome="finished in $(elapsed) (this invocation)"
    fi
    cat <<END

== $outcome
   report:  ${NANOPIPE_REPORT_DIR:-$PWD/report}/report.md
   model:   $NANOPIPE_BASE_DIR/checkpoints/sft/$MODEL_TAG (base model: $NANOPIPE_BASE_DIR/checkpoints/base/$MODEL_TAG)
   chat:    $PY -m scripts.chat_cli --model-tag $MODEL_TAG      (or -p "Why is the sky blue?" for one answer)
END
}
