"""The shared training step: the same losses as the code it replaced, no host sync inside it, prefetching that
resumes exactly, no recompiles when the schedules move, DDP's settings, and the log lines."""

import socket

import pytest
import torch
import torch.distributed as dist

from nanopipe.common import DistInfo
from nanopipe.optim import setup_optimizers
from nanopipe.sft_data import SFTLoader
from nanopipe.train_step import Prefetcher, StepProgress, TrainStep, format_step_line, wrap_model
from tests.conftest import tiny_gpt
from tests.test_sft_data import CONVERSATIONS

STEPS, ACCUM, B, T, V = 5, 2, 3, 32, 300


def batches(seed: int, masked: bool):
    """STEPS x ACCUM micro-batches; with `masked`, SFT-like targets (-1 on a random part, one micro-batch with none)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(STEPS):
        micro = []
        for m in range(ACCUM):
            x = torch.randint(0, V, (B, T), generator=gen)
            y = torch.randint(0, V, (B, T), generator=gen)
            if masked:
                y = y.masked_fill(torch.rand(B, T, generator=gen) < 0.6, -1)
                if step == 2 and m == 0:
                    y.fill_(-1)  # a micro-batch with no trained token adds nothing
            micro.append((x, y))
        out.append(micro)
    return out


def schedule(optimizers, step):
    """LR and Muon momentum change every step, as both stages' schedules do."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / (2 * STEPS))
    for group in optimizers[1].param_groups:
        group["momentum"] = 0.85 + 0.02 * step


def old_pretrain_step(model, optimizers, micro):
    """base_train's step before the shared one (commit 2c4b779): mean loss per micro-batch / grad_accum."""
    loss_sum = 0.0
    for x, y in micro:
        loss = model(x, y)
        (loss / len(micro)).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return (loss_sum / len(micro)).item(), grad_norm


def old_sft_step(model, optimizers, micro):
    """chat_sft's step before the shared one: summed loss over the step's trained tokens (one rank)."""
    trained = sum(int((y != -1).sum()) for _, y in micro)
    loss_sum = 0.0
    for x, y in micro:
        loss = model(x, y, loss_reduction="sum")
        (loss / max(trained, 1)).backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum / max(trained, 1), grad_norm


@pytest.mark.parametrize("old_step, masked", [(old_pretrain_step, False), (old_sft_step, True)])
def test_new_step_gives_the_old_losses(old_step, masked):
    # the reference values are computed in this run by the old code path, transcribed above
    data = batches(0, masked)
    old_model = tiny_gpt(vocab=V, seq_len=T)
    old_opts = setup_optimizers(old_model)
    new_model = tiny_gpt(vocab=V, seq_len=T)
    new_opts = setup_optimizers(new_model)
    step_fn = TrainStep(new_model, new_model, new_opts, ACCUM, torch.autocast("cpu", enabled=False), 1.0,
                        is_ddp=False, world=1)
    for step, micro in enumerate(data):
        schedule(old_opts, step)
        schedule(new_opts, step)
        old_loss, old_norm = old_step(old_model, old_opts, micro)
        loss, norm, trained, _ = step_fn.accumulate(micro).tolist()
        step_fn.update()
        assert trained == sum(int((y != -1).sum()) for _, y in micro)
        assert loss == pytest.approx(old_loss, rel=1e-5), step
        assert norm == pytest.approx(old_norm, rel=1e-4), step
    for (name, a), b in zip(old_model.named_parameters(), new_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


class CountSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Ops that make the host wait for the device (on CUDA): reading a value, or a data-dependent shape."""
    SYNCING = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item", "masked_select")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_accumulate_and_update_never_wait_for_the_device():
    model = tiny_gpt(vocab=V, seq_len=T)
    opts = setup_optimizers(model)
    step_fn = TrainStep(model, model, opts, ACCUM, torch.autocast("cpu", enabled=False), 1.0, False, 1)
    micro = batches(1, masked=True)[0]
    with CountSyncs() as counter:
        for _ in range(2):
            stats = step_fn.accumulate(micro)
            step_fn.update()
    assert counter.seen == []
    with CountSyncs() as counter:
        stats.tolist()  # what TrainStep.run does once per step
    assert counter.seen == []  # tolist reads the 4 numbers in one copy, not one .item() each


def sft_loader(tokenizer, state=None, loop=True):
    return SFTLoader(tokenizer, CONVERSATIONS, batch_size=2, seq_len=48, loop=loop, buffer_size=8, state=state)


def test_prefetcher_state_is_where_training_is_and_resumes_exactly(tokenizer):
    plain = sft_loader(tokenizer)
    straight = [next(plain) for _ in range(8)]
    prefetched = Prefetcher(sft_loader(tokenizer), depth=4)
    for expected in straight[:3]:
        x, y = next(prefetched)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    state, progress = prefetched.state_dict(), prefetched.progress
    prefetched.close()
    # the queue had batches 4.. ready; the state still describes the loader after batch 3
    resumed = sft_loader(tokenizer, state=state)
    assert progress == pytest.approx(resumed.progress)
    for expected in straight[3:]:
        x, y = next(resumed)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


def test_prefetcher_passes_the_end_and_errors_on(tokenizer):
    count = sum(1 for _ in sft_loader(tokenizer, loop=False))
    prefetched = Prefetcher(sft_loader(tokenizer, loop=False), depth=2)
    assert sum(1 for _ in prefetched) == count
    with pytest.raises(StopIteration):
        next(prefetched)


def test_compiled_step_does_not_recompile_when_lr_and_momentum_change(caplog):
    """torch.compile on CPU (aot_eager for the model keeps the test quick; Muon's update goes through inductor):
    5 steps of a depth-2 model, LR and momentum changing every step, and no recompilation after step 1."""
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    try:
        model = tiny_gpt(vocab=V, seq_len=T)
        opts = setup_optimizers(model, compile=True)
        train_model = wrap_model(model, DistInfo(), "cpu", compile=True, backend="aot_eager")
        step_fn = TrainStep(model, train_model, opts, ACCUM, torch.autocast("cpu", enabled=False), 1.0, False, 1)
        counters = torch._dynamo.utils.counters
        losses = []
        micro = batches(2, masked=False)[0]  # one batch again and again: the loss must fall
        for step in range(STEPS):
            schedule(opts, step)
            losses.append(step_fn.accumulate(micro).tolist()[0])
            step_fn.update()
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
                caplog.clear()
        assert graphs >= 2  # the model and at least one Muon shape group were compiled
        assert counters["stats"]["unique_graphs"] == graphs
        assert not [r for r in caplog.records if "ecompil" in r.getMessage()], [r.getMessage() for r in caplog.records]
        assert losses[-1] < losses[0]
    finally:
        torch._logging.set_logs(recompiles=False)
        torch._dynamo.reset()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrap_skips_buffer_broadcasts_and_keeps_gradients_in_buckets():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = tiny_gpt(vocab=V, seq_len=T)
        ddp = wrap_model(model, DistInfo(0, 0, 1, True), "cpu", compile=False)
        assert ddp.broadcast_buffers is False and ddp.gradient_as_bucket_view is True
        x = torch.randint(0, V, (2, T))
        ddp(x, x).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_step_line_format():
    line = format_step_line(120, 2205, 120 / 2205, {"loss": 3.4123, "lr": 1.0, "dt": 0.4121, "tok/s": 1271000.4,
                                                   "mfu": 41.23}, eta_seconds=4 * 3600 + 51 * 60)
    assert line == "step 00120/02205 (5.4%) | loss 3.412 | lr 1.00 | dt 412ms | tok/s 1,271,000 | mfu 41.2 | eta 4h51m"
    assert format_step_line(3, 40, 0.075, {"loss": 2.0, "mfu": None}, None, estimated=True) == \
        "step 00003/~00040 (7.5%) | loss 2.000"


def test_progress_prints_lines_to_a_file_and_notes_on_their_own_line(tmp_path):
    path = tmp_path / "log"
    with open(path, "w") as f, StepProgress(3, 0, "x", enabled=True, stream=f) as progress:
        for step in (1, 2, 3):
            progress.step(step, {"loss": 1.0 / step}, eta_seconds=3 - step)
        progress.note("step 3: val bpb 1.2345")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("step 00001/00003 (33.3%) | loss 1.000") and len(lines) == 4
    assert lines[3] == "step 3: val bpb 1.2345"
