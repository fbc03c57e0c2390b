"""Fake CUDA tensors with autograd on a machine without a GPU, for memory and dtype traces.

FakeTensorMode makes `device="cuda"` tensors without a GPU, but a CPU-only torch build has no CUDA device
guard and no CUDA hooks, so recording autograd on them, and running backward, stops with "PyTorch is not
linked with support for cuda devices" / "Cannot access accelerator device". A CUDA build without a GPU has
a no-op guard but still no accelerator. The shim below (a few lines of C++ against torch's own headers,
compiled once with the system's g++ and cached in the temp dir) registers a CUDA device guard whose
streams and events do nothing, and CUDA hooks that say a CUDA backend exists. It must be loaded before torch
is imported, so fake-CUDA traces run in a child process: `run_child(module, payload)` starts
`python -m <module>`, which calls `bootstrap()` first thing.

Only fake tensors ever reach CUDA kernels in that process: a real CUDA op would find no driver and fail.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM_ENV = "NANOPIPE_FAKE_CUDA_SHIM"

_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/detail/CUDAHooksInterface.h>
namespace {
using c10::Device; using c10::DeviceType; using c10::Stream;
const Device kDevice(DeviceType::CUDA, 0);
struct FakeCUDAGuard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return kDevice; }
  Device getDevice() const override { return kDevice; }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device) const override { return Stream(Stream::DEFAULT, kDevice); }
  Stream exchangeStream(Stream) const override { return Stream(Stream::DEFAULT, kDevice); }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void synchronizeEvent(void*) const override {}
  void synchronizeStream(const Stream&) const override {}
};
FakeCUDAGuard guard;
struct FakeCUDAHooks : at::CUDAHooksInterface {
  FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
};
}  // namespace
namespace at { C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks); }
extern "C" int nanopipe_install_fake_cuda_guard() {
  c10::impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)].store(&guard);
  return 1;
}
"""


class FakeCUDAUnavailable(RuntimeError):
    """Why fake CUDA cannot work here (one line, with the fix)."""


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    return Path(spec.submodule_search_locations[0])


def build_shim() -> Path:
    """Compile the shim for this torch (once; cached by torch version and source)."""
    import torch  # only for the version and ABI: this parent process never loads the shim
    if torch.backends.cuda.is_built():
        raise FakeCUDAUnavailable("this torch is a CUDA build: on a machine without a GPU, predicting CUDA memory "
                                  "needs the CPU build (runs/setup.sh installs it there)")
    torch_dir = _torch_dir()
    key = hashlib.sha256(f"{torch.__version__}{torch_dir}{_SOURCE}".encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"nanopipe-fake-cuda-{key}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CXX", "g++")
    src = out.with_suffix(f".{os.getpid()}.cpp")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    src.write_text(_SOURCE)
    cmd = [compiler, "-O1", "-shared", "-fPIC", "-std=c++17",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{torch_dir / 'include'}",
           str(src), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
           "-o", str(tmp)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FakeCUDAUnavailable(f"predicting CUDA memory without a GPU compiles a small shim and needs a C++ "
                                  f"compiler: install g++ (apt-get install g++) or set CXX") from None
    finally:
        src.unlink(missing_ok=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FakeCUDAUnavailable(f"compiling the fake-CUDA shim failed ({compiler}): "
                                  f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}")
    os.replace(tmp, out)
    return out


def bootstrap():
    """First thing in a fake-CUDA child process, before torch is imported."""
    path = os.environ.get(SHIM_ENV)
    if not path:
        return
    if "torch" in sys.modules:
        raise RuntimeError("the fake-CUDA shim must be loaded before torch is imported")
    import ctypes
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL).nanopipe_install_fake_cuda_guard()


def run_child(module: str, payload: dict, fake_cuda: bool, timeout: float | None = None) -> dict:
    """`python -m module` with payload as JSON on stdin; its last stdout line is the JSON answer."""
    env = dict(os.environ)
    if fake_cuda:
        env[SHIM_ENV] = str(build_shim())
    else:
        env.pop(SHIM_ENV, None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload), capture_output=True,
                            text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
