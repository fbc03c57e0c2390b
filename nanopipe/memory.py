"""Peak GPU memory of a training step, known before you have the GPU: trace the step on fake tensors.

A FakeTensorMode tensor has a device, shape and dtype but no data, so a machine without that GPU can run
the real step (TrainStep: forward, backward, clipping, the optimizers) on `device="cuda"` tensors under bf16
autocast (nanopipe.fake_cuda makes autograd work there), while a dispatch mode follows every tensor storage from
allocation to free (the accounting of torch.distributed._tools.mem_tracker, which torchtitan's estimator
uses, without its per-module bookkeeping, which refuses a module called once per micro-batch). The result
is the peak of live tensor bytes (rounded up to the CUDA allocator's 512-byte blocks) over two steps, the
second with the optimizer state. Allocator fragmentation, the CUDA context and NCCL buffers come on top
(FITS_FRACTION).

A compiled step is traced through AOTAutograd with inductor's decompositions and min-cut partitioner
(torch.compile's `aot_eager_decomp_partition` backend), run op by op: it saves the activations inductor
would save; inductor's fusions also skip some pointwise temporaries that the op-by-op run does allocate,
so a compiled prediction errs high by those.

    python -m nanopipe.memory < plan.json     # the child process: one JSON line per plan, see predict_peaks
"""

import contextlib
import json
import sys

from nanopipe.fake_cuda import bootstrap, run_child

GIB = 2**30
# share of a GPU's memory a predicted peak may use: the caching allocator rounds blocks up and fragments,
# and the CUDA context, cuBLAS workspaces and NCCL buffers live outside torch's tensor accounting
FITS_FRACTION = 0.9


def predict_peaks(config: dict, device: str, dtype: str, compile: bool, batches: list[tuple[int, int]],
                  timeout: float | None = None) -> list[dict]:
    """Traced peak memory of a training step for each (device batch size, grad accum): one dict per plan with
    peak_bytes and its parts (parameters, gradients, optimizer state, activations and temporaries)."""
    payload = {"config": config, "device": device, "dtype": dtype, "compile": compile, "batches": batches}
    return run_child("nanopipe.memory", payload, fake_cuda=device == "cuda", timeout=timeout)["plans"]


def fake_model(config, device: str):
    """A GPT of `config` on fake `device` tensors (inside a FakeTensorMode); its values are undefined."""
    import torch

    from nanopipe.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    # in place of to_empty(), which swaps tensors and trips over FakeTensorMode's weak references to the meta ones
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device=device)
    return model


class ForcedAutocast:
    """torch.autocast's effect without its availability check (it turns itself off when torch sees no GPU)."""

    def __init__(self, device: str, dtype):
        self.device, self.dtype = device, dtype

    def __enter__(self):
        import torch
        self.before = torch.is_autocast_enabled(self.device), torch.get_autocast_dtype(self.device)
        torch.set_autocast_enabled(self.device, True)
        torch.set_autocast_dtype(self.device, self.dtype)
        torch.autocast_increment_nesting()

    def __exit__(self, *exc):
        import torch
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(self.device, self.before[0])
        torch.set_autocast_dtype(self.device, self.before[1])
        return False


class PeakMemory:
    """A TorchDispatchMode-based count of live storage bytes: `current`, `peak` and the peak's composition."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary
        self.sizes = WeakIdKeyDictionary()
        self.current = self.peak = 0
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.track(out)
                return out

        self.mode = Mode()
        self._finalize = weakref.finalize

    def track(self, tree):
        import torch
        from torch.utils._pytree import tree_leaves
        for t in tree_leaves(tree):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self.sizes:
                continue
            size = -(-storage.nbytes() // 512) * 512
            self.sizes[storage] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            self._finalize(storage, self._free, size)

    def _free(self, size):
        self.current -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _bytes(tensors) -> int:
    return sum(-(-t.untyped_storage().nbytes() // 512) * 512 for t in tensors)


def trace_step(config, device: str, dtype, compile: bool, batch_size: int, grad_accum: int) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nanopipe.optim import setup_optimizers
    from nanopipe.train_step import TrainStep

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_model(config, device)
        optimizers = setup_optimizers(model)
        train_model = torch.compile(model, backend="aot_eager_decomp_partition", dynamic=False) if compile else model
        amp = ForcedAutocast(device, dtype) if dtype != torch.float32 else contextlib.nullcontext()
        step = TrainStep(model, train_model, optimizers, grad_accum, amp, grad_clip=1.0, is_ddp=False, world=1)
        x = torch.zeros((batch_size, config.sequence_len), dtype=torch.long, device=device)
        batches = [(x, x)] * min(grad_accum, 2)  # the second micro-batch runs with the gradients present
        if compile:  # compile outside the count: its own fake tensors are not the step's
            step.accumulate(batches)
            step.update()
        tracker = PeakMemory()
        states = [t for opt in optimizers for st in opt.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor)]
        tracker.track([list(model.parameters()), list(model.buffers()), states])
        static = tracker.current
        with tracker:
            for _ in range(2):
                step.accumulate(batches)
                step.update()
        params = _bytes(model.parameters())
        states = _bytes(t for opt in optimizers for st in opt.state.values() for t in st.values()
                        if isinstance(t, torch.Tensor))
    return {"batch_size": batch_size, "grad_accum": grad_accum, "peak_bytes": tracker.peak,
            "parts": {"parameters": params, "gradients": params, "optimizer_state": states,
                      "activations_and_temporaries": tracker.peak - params * 2 - states}, "static_bytes": static}


def use_flash_attention():
    """SDPA asks the GPU which kernel to use; a fake GPU cannot answer, and SDPA falls back to the math kernel,
    which saves the (T, T) attention matrix. A real Ampere+ GPU runs bf16 causal attention with the flash
    kernel (or cuDNN's, with the same saved tensors), so the trace calls that kernel directly."""
    import torch
    import torch.nn.functional as F
    sdpa = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.is_cuda and attn_mask is None and not enable_gqa and q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = flash


def main():
    bootstrap()
    import torch
    torch.set_num_threads(1)
    use_flash_attention()

    from nanopipe.gpt import GPTConfig
    payload = json.loads(sys.stdin.read())
    config = GPTConfig(**payload["config"])
    dtype = getattr(torch, payload["dtype"])
    plans = [trace_step(config, payload["device"], dtype, payload["compile"], b, a) for b, a in payload["batches"]]
    print(json.dumps({"plans": plans}))


if __name__ == "__main__":
    main()
