import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nanopipe import common
from nanopipe.common import UserError, atomic_write, autodetect_device, autodetect_dtype, get_base_dir

from .conftest import subprocess_env


def test_base_dir_from_env(isolated_dirs):
    assert get_base_dir() == isolated_dirs
    assert isolated_dirs.is_dir()


def test_base_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOPIPE_BASE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert get_base_dir() == tmp_path / ".cache" / "nanopipe"


def test_device_autodetect_and_override(monkeypatch):
    assert autodetect_device() == ("cuda" if torch.cuda.is_available() else
                                   "mps" if torch.backends.mps.is_available() else "cpu")
    assert autodetect_device("cpu") == "cpu"
    monkeypatch.setenv("NANOPIPE_DEVICE", "cpu")
    assert autodetect_device() == "cpu"
    monkeypatch.setenv("NANOPIPE_DEVICE", "tpu")
    with pytest.raises(UserError, match="NANOPIPE_DEVICE"):
        autodetect_device()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            autodetect_device("cuda")


def test_dtype_policy(monkeypatch):
    assert autodetect_dtype("cpu") == torch.float32
    assert autodetect_dtype("mps") == torch.float32
    monkeypatch.setenv("NANOPIPE_DTYPE", "bfloat16")
    assert autodetect_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOPIPE_DTYPE", "int3")
    with pytest.raises(UserError, match="NANOPIPE_DTYPE"):
        autodetect_dtype("cpu")


def test_peak_flops_unknown_on_cpu(monkeypatch):
    assert common.peak_flops("cpu") is None
    monkeypatch.setenv("NANOPIPE_PEAK_FLOPS", "1e12")
    assert common.peak_flops("cpu") == 1e12


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 SXM5 80GB", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12), ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 5090", 209.5e12),
    ("NVIDIA GB10", 209e12), ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15), ("AMD Instinct MI300X", 1.3074e15),
    # not in the table: MFU stays blank rather than borrowing a sibling's peak
    ("NVIDIA GeForce RTX 4090 D", None), ("NVIDIA GeForce RTX 5090 D", None), ("NVIDIA H800", None),
    ("NVIDIA A10G", None), ("Tesla T4", None), ("NVIDIA L4", None), ("NVIDIA GB100", None), ("", None),
])
def test_peak_flops_by_exact_product_name(name, peak):
    assert common.peak_flops_of(name) == peak


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_seed_everything_repeats():
    common.seed_everything(3)
    a = torch.rand(3)
    common.seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_timer_and_duration():
    with common.Timer() as t:
        time.sleep(0.01)
    assert 0.005 < t.seconds < 5
    assert common.format_duration(3725) == "1h02m"
    assert common.format_duration(65) == "1m05s"


def test_dist_info_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = common.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_ddp) == (0, 1, False)


def test_torchrun_two_ranks_gloo_all_reduce(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from nanopipe.common import init_distributed, cleanup_distributed, print0
        info = init_distributed("cpu")
        assert info.is_ddp and info.world_size == 2 and dist.get_backend() == "gloo"
        t = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(t)
        print(f"rank {info.rank} sum {t.item()}", flush=True)
        print0("printed once")
        cleanup_distributed()
    """))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rank 0 sum 3.0" in result.stdout and "rank 1 sum 3.0" in result.stdout
    assert result.stdout.count("printed once") == 1


@pytest.mark.parametrize("stage,blocked,extra", [("chat_serve", "uvicorn", "serve"), ("export", "transformers", "hf")])
def test_a_stage_without_its_extra_names_the_pip_command(stage, blocked, extra, monkeypatch, capsys):
    from scripts import chat_serve, export
    from tests.conftest import run_main
    monkeypatch.setitem(sys.modules, blocked, None)  # what an environment without the package gives import
    main = {"chat_serve": chat_serve, "export": export}[stage].main
    code, err = run_main(main, ["--out", "x"] if stage == "export" else [], capsys)
    assert code == 2 and err.strip() == f"error: {stage} needs {blocked}: pip install -e '.[{extra}]'", err
