"""Run a stage with every torch.distributed collective checked the way NCCL checks it, on a CPU machine.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.collective_guard LOG_DIR \
        scripts.chat_sft --device cpu ...

Under torchrun on GPUs the group is NCCL, which takes device tensors only: a tensor the stage made on the host
(`torch.tensor(values)` with no device) is refused with "No backend type associated with device type cpu".
On CPU the host and the device are the same, and gloo takes anything, so the CPU tests could never see it.
This launcher tells them apart by where each tensor came from: a tensor is "host" when a factory made it
without a `device=` (or `.cpu()` made it), results of ops on host tensors only are host, and `.to(device)`
makes a device tensor. A collective given a host tensor raises NCCL's error, naming the call site; every
checked call is logged to LOG_DIR/rank<R>.jsonl so a test can also see that the collectives ran at all.
Tensors made in other threads are not tracked (they count as device tensors).
"""

import contextlib
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye,
              torch.scalar_tensor}
_UNTRACED_FACTORIES = ("from_numpy", "frombuffer")  # modes do not see these: patched instead
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
         torch.randint_like}
# every tensor collective the stages could call (barrier and the *_object ones pick their device themselves)
COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")
_HOST = "_collective_guard_host"


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _mark(out, host: bool):
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and host:
            setattr(t, _HOST, True)
    return out


def _to_device_target(args, kwargs):
    """What a .to()/.cuda() call moves to: 'device', 'host', a tensor to copy placement from, or None."""
    device = kwargs.get("device")
    if device is None:
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                device = a
            elif isinstance(a, torch.Tensor):
                return a
    return None if device is None else "device"


class HostTracker(TorchFunctionMode):
    """Marks the tensors that would live on the host on a GPU machine (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            return _mark(out, kwargs.get("device") is None)
        if func is torch.Tensor.cpu:
            if out is args[0] and not is_host(out):
                out = out.view_as(out)  # on a GPU this would be a new host tensor
            return _mark(out, True)
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            target = _to_device_target(args, kwargs) if func is torch.Tensor.to else "device"
            if target == "device":
                if out is args[0] and is_host(out):
                    out = out.view_as(out)  # same storage, but on a GPU this would be a new device tensor
                return out
            if isinstance(target, torch.Tensor):
                return _mark(out, is_host(target))
        if func in _LIKE and kwargs.get("device") is not None:
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return _mark(out, bool(tensors) and all(is_host(t) for t in tensors))


def _call_site() -> str:
    """file:line of the innermost frame outside torch and this module."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != here and "torch" not in path.parts:
            root = Path(__file__).resolve().parents[1]
            with contextlib.suppress(ValueError):
                path = path.relative_to(root)
            return f"{path}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def checked_collectives(log_path=None):
    """Within: track host tensors and make torch.distributed's tensor collectives refuse them as NCCL does."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    factories = {name: getattr(torch, name) for name in _UNTRACED_FACTORIES}
    log = open(log_path, "a") if log_path else None

    def wrap(name, original):
        def checked(*args, **kwargs):
            site = _call_site()
            host = [t for t in tree_leaves((args, kwargs)) if is_host(t)]
            if log:
                log.write(json.dumps({"op": name, "site": site, "ok": not host}) + "\n")
                log.flush()
            if host:
                raise RuntimeError(f"No backend type associated with device type cpu: dist.{name} at {site} was given "
                                   f"a host tensor, which NCCL refuses; create it on the device (device=...)")
            return original(*args, **kwargs)
        return checked

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    for name, original in factories.items():
        setattr(torch, name, lambda *args, _make=original, **kwargs: _mark(_make(*args, **kwargs), True))
    try:
        with HostTracker():
            yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        for name, original in factories.items():
            setattr(torch, name, original)
        if log:
            log.close()


def main():
    log_dir, module, *argv = sys.argv[1:]
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    sys.argv = [module, *argv]
    with checked_collectives(Path(log_dir) / f"rank{rank}.jsonl"):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
