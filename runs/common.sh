# shellcheck shell=bash
# Sourced by the speedrun scripts: the python to use, and `step`, which runs a stage once.
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
