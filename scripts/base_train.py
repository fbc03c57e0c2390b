"""Pretrain the base model. --depth sizes everything as nanochat does: width, heads, tokens, batch, LRs, WD.

    python -m scripts.base_train --depth 12 --max-seq-len 1024 --device-batch-size 64
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train --depth 12      # DDP (gloo on CPU)
    python -m scripts.base_train --depth 4 --head-dim 64 --dry-run                 # plan + ETA, then exit
    python -m scripts.base_train --depth 12 --resume                               # continue the last checkpoint

Writes checkpoints/base/<tag>/step_NNNNNN/ (final one before the final evals), logs/<tag>.jsonl (one line
per step) and the base_train report section.
"""

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch

from nanopipe import cli
from nanopipe.checkpoint import checkpoint_root, rng_state, save_checkpoint, update_meta
from nanopipe.common import (DistInfo, UserError, autocast, autodetect_device, cleanup_distributed, format_duration,
                             get_base_dir, get_dist_info, init_distributed, peak_flops, print0, seed_everything)
from nanopipe.dataloader import PretrainLoader
from nanopipe.engine import greedy_samples
from nanopipe.gpt import GPT, build_model, config_from_depth
from nanopipe.loss_eval import evaluate_bpb
from nanopipe.memory import FITS_FRACTION, GIB
from nanopipe.pretrain import (REFERENCE_RATIO, Plan, PretrainLoopState, PretrainReport, apply_schedules,
                               check_resumable, fitting_batch_size, gpu_memory_bytes, make_optimizers, make_plan,
                               out_of_memory_message, predicted_peak, resolve_device_batch_size)
from nanopipe.stage import Stage
from nanopipe.tokenizer import get_tokenizer
from nanopipe.train_step import (Prefetcher, StepClock, StepProgress, TrainStep, start_training, training_dtype,
                                 wrap_model)
from nanopipe.training import MetricLog, check_finite, peak_memory_mb, read_log, resume_training, series_from_log
from tasks.profile import data_profile

INITIAL_LOSS_TOLERANCE = 1.0  # nats away from ln(vocab) at step 1 means an init or data bug
SPIKE_FACTOR = 5.0  # a grad norm this many times its running average is a spike
# the largest model shapes the flags accept (rotary tables hold 10x the context)
MAX_DEPTH, MAX_WIDTH, MAX_SEQ_LEN = 1024, 65536, 131072


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m scripts.base_train",
                           description="Pretrain the base model (sizes derived from --depth).")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=cli.integer(1, MAX_DEPTH), default=20,
                   help="number of layers; width = depth * aspect ratio")
    g.add_argument("--aspect-ratio", type=cli.integer(1, MAX_WIDTH), default=64, help="width per layer")
    g.add_argument("--head-dim", type=cli.integer(2, MAX_WIDTH), default=128,
                   help="attention head size (64 for small models)")
    g.add_argument("--max-seq-len", type=cli.integer(1, MAX_SEQ_LEN), default=2048, help="training context length")
    g = p.add_argument_group("horizon and batch")
    g.add_argument("--num-iterations", type=cli.integer(1, allow=cli.AUTO), default=-1,
                   help="optimizer steps (-1: from the ratio)")
    g.add_argument("--target-flops", type=cli.positive(allow=cli.AUTO), default=-1,
                   help="training FLOPs budget (-1: from the ratio)")
    g.add_argument("--target-param-data-ratio", type=cli.positive(), default=REFERENCE_RATIO,
                   help="tokens = ratio * scaling params")
    g.add_argument("--device-batch-size", type=batch_size_arg, default=32,
                   help="rows per micro-batch per process, or 'auto': the largest that fits the GPU's memory")
    g.add_argument("--total-batch-size", type=cli.integer(1, allow=cli.AUTO), default=-1,
                   help="tokens per step (-1: Power Lines auto)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=cli.nonnegative(), default=0.3)
    g.add_argument("--unembedding-lr", type=cli.nonnegative(), default=0.008)
    g.add_argument("--matrix-lr", type=cli.nonnegative(), default=0.02, help="Muon LR")
    g.add_argument("--scalar-lr", type=cli.nonnegative(), default=0.5)
    g.add_argument("--weight-decay", type=cli.nonnegative(), default=0.28,
                   help="Muon weight decay at d12 (cosine to 0)")
    # LR warmup as a fraction of the run: upstream's 40 steps of its 2,520 at d12
    g.add_argument("--warmup-ratio", type=cli.fraction(), default=0.016)
    g.add_argument("--warmdown-ratio", type=cli.fraction(), default=0.65,
                   help="final fraction of steps with LR decay")
    g.add_argument("--final-lr-frac", type=cli.fraction(), default=0.05,
                   help="LR at the end, as a fraction of the peak")
    g.add_argument("--grad-clip", type=cli.nonnegative(), default=1.0, help="max global grad norm (0: no clipping)")
    g.add_argument("--skip-spikes", action="store_true", help="skip the update of a step whose grad norm spikes")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=cli.integer(1, allow=cli.NEVER), default=250,
                   help="val bpb every N steps (-1: never)")
    g.add_argument("--eval-tokens", type=cli.integer(1), default=40 * 2**19)
    g.add_argument("--core-metric-every", type=cli.integer(1, allow=cli.NEVER), default=2000,
                   help="CORE every N steps (-1: never)")
    cli.old_spelling(g, g.add_argument("-x", "--max-per-task", type=cli.integer(1, allow=cli.ALL), default=500,
                                       help="CORE items per task (-1: all)"), "--core-metric-max-per-task")
    g.add_argument("--sample-every", type=cli.integer(1, allow=cli.NEVER), default=2000,
                   help="greedy samples every N steps (-1: never)")
    g.add_argument("--save-every", type=cli.integer(1, allow=cli.LAST), default=-1,
                   help="checkpoint every N steps (-1: only the last)")
    g.add_argument("--keep-last", type=cli.integer(1), default=2, help="checkpoints kept")
    g.add_argument("-g", "--model-tag", type=cli.name, default=None, help="checkpoint folder name (default d<depth>)")
    g.add_argument("--tensorboard", action="store_true", help="also log to <base>/logs/tensorboard/<tag>")
    g.add_argument("--wandb", default=None, metavar="RUN", help="also log to wandb under this run name")
    g = p.add_argument_group("run")
    g.add_argument("--data", type=cli.name, default=None,
                   help="dataset name under <base>/data (default $NANOPIPE_DATA or fineweb-edu)")
    g.add_argument("--seed", type=cli.seed, default=42)
    g.add_argument("--device", default=None,
                   help="cuda|mps|cpu (default: autodetect); with --dry-run also meta: the plan alone, in seconds")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model and Muon's update")
    g.add_argument("--resume", action="store_true", help="continue from the tag's last checkpoint if there is one")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan, the predicted peak GPU memory and a measured ETA, then exit")
    g.add_argument("--json", action="store_true", help="with --dry-run: the plan as one JSON object on stdout")
    g.add_argument("--gpu-memory-gb", type=cli.positive(), default=None,
                   help="GPU memory to plan for (default: the GPU's own), e.g. for a GPU this machine lacks")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser, args):
    """Constraints between flags, checked before anything is read or written."""
    if args.head_dim % 2:
        parser.error(f"--head-dim {args.head_dim}: rotary embeddings need an even head size, e.g. 64 or 128")
    width = math.ceil(args.depth * args.aspect_ratio / args.head_dim) * args.head_dim
    if width > MAX_WIDTH:
        parser.error(f"--depth {args.depth} x --aspect-ratio {args.aspect_ratio} gives width {width:,}, "
                     f"more than {MAX_WIDTH:,}: lower --depth or --aspect-ratio")
    if args.warmup_ratio + args.warmdown_ratio > 1:
        parser.error(f"--warmup-ratio {args.warmup_ratio:g} + --warmdown-ratio {args.warmdown_ratio:g} exceed 1: "
                     "the two phases must fit in one run")


def batch_size_arg(text: str):
    """A number of rows (>= 1) or 'auto'."""
    return "auto" if text == "auto" else cli.integer(1)(text)


def main(argv=None):
    args = parse_args(argv)
    with Stage("base_train", args) as stage:
        if args.dry_run:
            dry_run(args)
        else:
            train(args, stage)


def load_tokenizer(args):
    """(tokenizer, vocab size); a dry run without a tokenizer yet plans with nanochat's 32,768."""
    try:
        tokenizer = get_tokenizer()
        return tokenizer, tokenizer.vocab_size
    except UserError:
        if not args.dry_run:
            raise
        print0("no tokenizer yet: planning with the default vocabulary of 32,768")
        return None, 32768


def describe(config, plan: Plan, model_counts, num_params, batch, world, device, dtype):
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads of {config.head_dim}, "
           f"seq {config.sequence_len}, vocab {config.vocab_size:,}")
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in model_counts.items())
           + f"; total {num_params:,}, scaling {plan.scaling_params:,}")
    print0(f"plan: {plan.num_iterations:,} steps x {plan.total_batch_size:,} tokens = {plan.tokens:,} tokens "
           f"(ratio {plan.tokens / plan.scaling_params:.1f}), {plan.flops_per_token:.3e} FLOPs/token, "
           f"{plan.total_flops:.3e} FLOPs; grad accum {plan.grad_accum} x {batch} rows x {world} rank(s); "
           f"LR x{plan.lr_scale:.3f}, Muon wd {plan.weight_decay:.4f}; device {device}, {dtype}")


class Evals:
    """The evaluations of a run: val bpb, CORE and greedy samples (rank 0), each every N steps and at the end."""

    def __init__(self, args, model, tokenizer, profile, batch, device, info, amp):
        self.args, self.model, self.tokenizer, self.device, self.amp = args, model, tokenizer, device, amp
        self.val_loader = lambda: PretrainLoader(tokenizer, profile.data_name, "val", batch, model.config.sequence_len,
                                                 device, info.rank, info.world_size)
        self.eval_steps = max(1, args.eval_tokens // (batch * model.config.sequence_len * info.world_size))
        self.token_bytes = tokenizer.token_bytes().to(device)
        self.bundle_dir = profile.eval_bundle_dir() if args.core_metric_every > 0 else None  # fail fast if missing
        if self.bundle_dir is not None:
            from nanopipe.core_eval import load_bundle
            load_bundle(self.bundle_dir)  # every task file read and checked now, not hours in at the first CORE eval
        self.profile = profile
        self.master = info.rank == 0
        self.samples = []

    def val_bpb(self) -> float:
        with self.amp:
            return evaluate_bpb(self.model, self.val_loader(), self.eval_steps, self.token_bytes)

    def core(self) -> float:
        from nanopipe.core_eval import evaluate_core  # heavy eval code, only loaded when CORE is on
        with self.amp:
            return evaluate_core(self.model, self.tokenizer, self.bundle_dir, self.device,
                                 max_per_task=self.args.max_per_task, show_progress=False)["core"]

    def sample(self):
        """Greedy 16-token continuations of the data profile's prompts: a quick look at what the model learned."""
        with self.amp:
            self.samples = greedy_samples(self.model, self.tokenizer, self.profile.sample_prompts())
        print("\n" + "\n".join(f"  {line!r}" for line in self.samples))

    def run(self, step: int, record: dict, loop: PretrainLoopState, note, final=False):
        """The evals due at `step` (all that are on when `final`), their results added to `record`."""
        args = self.args

        def due(every):
            return every > 0 and (final or step % every == 0)

        if due(args.eval_every):
            loop.val_bpb = record["val_bpb"] = self.val_bpb()
            note(f"{'final' if final else f'step {step}:'} val bpb {record['val_bpb']:.4f}")
        if due(args.core_metric_every):
            record["core"] = self.core()
            note(f"{'final' if final else f'step {step}:'} CORE {record['core']:.4f}")
        if due(args.sample_every) and self.master:
            self.sample()


def train(args, stage):
    device, info, dtype, amp = start_training(args.device, args.seed)
    rank, world, master = info.rank, info.world_size, info.rank == 0
    tokenizer, vocab_size = load_tokenizer(args)
    profile = data_profile(args.data)
    data_name = profile.data_name
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim)
    batch = resolve_device_batch_size(args, config, world, device, dtype)
    plan = make_plan(args, config, world, batch)
    N, total_batch = plan.num_iterations, plan.total_batch_size
    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_root("base") / tag
    model = build_model(config, device)
    describe(config, plan, model.param_counts(), model.num_params(), batch, world, device, dtype)
    optimizers = make_optimizers(model, args, plan)

    # resume: model, optimizers, loader position, RNG and loop state from the last checkpoint
    loop = PretrainLoopState()
    start_step, loader_state = resume_training(ckpt_dir, args.resume, model, optimizers, loop, device, rank,
                                               lambda meta: check_resumable(meta, config, plan, batch, world))
    evals = Evals(args, model, tokenizer, profile, batch, device, info, amp)
    train_loader = Prefetcher(PretrainLoader(tokenizer, data_name, "train", batch, config.sequence_len, device, rank,
                                             world, state=loader_state), depth=2 * plan.grad_accum)
    train_model = wrap_model(model, info, device, args.compile)
    step_fn = TrainStep(model, train_model, optimizers, plan.grad_accum, amp, args.grad_clip, info.is_ddp, world)
    clock = StepClock(loop, total_batch, plan.flops_per_token, peak_flops(device), world)
    log = MetricLog(get_base_dir() / "logs" / f"{tag}.jsonl", start_step, args, tag, enabled=master,
                    checkpoint_dir=ckpt_dir)
    meta = {"user_config": vars(args), "plan": asdict(plan), "tag": tag, "data": data_name,
            "device_batch_size": batch, "max_seq_len": config.sequence_len}

    if start_step == 0 and args.eval_every > 0:
        loop.val_bpb = evals.val_bpb()
        print0(f"step 0: val bpb {loop.val_bpb:.4f}")
        log.write({"step": 0, "val_bpb": loop.val_bpb})

    # a context manager, so the bar is closed before an error line is printed
    with StepProgress(N, start_step, "base_train", master) as progress:
        saved_step = start_step or None  # the checkpoint a divergence falls back to
        for it in range(start_step, N):
            step = it + 1
            clock.start()
            lrm = apply_schedules(optimizers, it, N, args, plan.weight_decay)
            try:
                stats = step_fn.run(train_loader)
            except torch.OutOfMemoryError:
                if it > start_step:
                    raise
                raise UserError(out_of_memory_message(args, config, world, device, dtype, batch)) from None
            train_loss, grad_norm = stats["loss"], stats["grad_norm"]
            if it == 0:
                check_initial_loss(train_loss, config.vocab_size, data_name)
            check_finite(step, train_loss, grad_norm, ckpt_dir, saved_step,
                         "--matrix-lr/--embedding-lr/--unembedding-lr")
            spike, skipped = check_spike(it, grad_norm, loop, args.skip_spikes)
            step_fn.update(apply=not skipped)
            timing = clock.stop()
            loop.smooth_loss = 0.9 * loop.smooth_loss + 0.1 * train_loss
            record = {"step": step, "loss": train_loss, "lr": lrm * args.matrix_lr * plan.lr_scale, "lrm": lrm,
                      **timing, "grad_norm": grad_norm}
            if spike:
                record.update(spike=True, skipped=skipped)
                progress.note(f"step {step}: grad norm spike {grad_norm:.3g} (running mean "
                              f"{loop.grad_norm_ema:.3g})" + ("; update skipped" if skipped else ""))
            if step == N or (args.save_every > 0 and step % args.save_every == 0):
                # before any eval: an eval that dies (OOM on unified memory, #446) loses nothing
                save_checkpoint(ckpt_dir, step, model, optimizers,
                                dict(meta, loop_state=asdict(loop), val_bpb=loop.val_bpb, log_record=record),
                                train_loader.state_dict(), rng_state(), keep_last=args.keep_last)
                saved_step = step
            if step < N:  # the last step's evals run after the loop, on the uncompiled model
                evals.run(step, record, loop, progress.note)
            log.write(record)
            mean_dt = clock.mean_step_seconds(timing["dt"])
            progress.step(step, {"loss": loop.smooth_loss / (1 - 0.9 ** step), "lr": lrm, "dt": timing["dt"],
                                 "tok/s": total_batch / mean_dt, "mfu": clock.mfu(total_batch / mean_dt)},
                          eta_seconds=mean_dt * (N - step))
    train_loader.close()

    # final evals on the uncompiled model; the final checkpoint is already on disk
    final = {"step": N, "final": True}
    evals.run(N, final, loop, print0, final=True)
    if master:
        update_meta(ckpt_dir, N, val_bpb=loop.val_bpb, core=final.get("core"))
    log.write(final)
    log.close()
    records = read_log(log.path) if log.path.exists() else []
    data = PretrainReport.of_run(plan, loop, final, records, params=model.num_params(), peak_flops=peak_flops(device),
                                 peak_memory_mb=peak_memory_mb(device), world_size=world, checkpoint=str(ckpt_dir))
    stage.report(data.markdown(tag, config, device, evals.samples), asdict(data),
                 {"train_loss": series_from_log(records, "loss", "train loss (nats/token)"),
                  "val_bpb": series_from_log(records, "val_bpb", "val bpb (bits/byte)")})
    cleanup_distributed()


def check_spike(it: int, grad_norm: float, loop: PretrainLoopState, skip: bool) -> tuple[bool, bool]:
    """(spike, skip its update): a grad norm SPIKE_FACTOR times its running mean after step 10 is a spike;
    the running mean follows every step whose update is applied."""
    spike = it >= 10 and grad_norm > SPIKE_FACTOR * loop.grad_norm_ema
    skipped = spike and skip
    if not skipped:
        loop.grad_norm_ema = grad_norm if it == 0 else 0.9 * loop.grad_norm_ema + 0.1 * grad_norm
    return spike, skipped


def check_initial_loss(loss: float, vocab_size: int, data_name: str):
    """The first step's loss must be near ln(vocab): a freshly initialised model predicts uniformly."""
    if abs(loss - math.log(vocab_size)) > INITIAL_LOSS_TOLERANCE:
        raise UserError(f"initial loss {loss:.3f} is far from ln(vocab) = {math.log(vocab_size):.3f}: "
                        f"an init or data bug (check the tokenizer and dataset {data_name})")


def dry_run(args):
    """The plan, the predicted (and on a GPU, measured) peak memory, tok/s and the ETA; writes nothing.
    `--device cuda` on a machine without a GPU predicts from a trace on fake CUDA tensors."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = plan_and_measure(args)
    if args.json and get_dist_info().rank == 0:
        print(json.dumps(result), file=out, flush=True)
    cleanup_distributed()


def plan_and_measure(args) -> dict:
    choice = args.device or os.environ.get("NANOPIPE_DEVICE")
    plan_only = choice == "meta"  # shapes without data: nothing traced or measured (the run scripts size data by it)
    fake = plan_only or (choice == "cuda" and not torch.cuda.is_available())
    device = "meta" if plan_only else "cuda" if fake else autodetect_device(args.device)
    info = DistInfo() if fake else init_distributed(device)
    world = info.world_size
    dtype = training_dtype(device, bf16_supported=True if fake else None)
    seed_everything(args.seed)
    _, vocab_size = load_tokenizer(args)
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim)
    capacity = gpu_memory_bytes(args, device, fake)
    batch, trace = args.device_batch_size, None
    if batch == "auto":
        if capacity is None:
            raise UserError("--device-batch-size auto needs a GPU to size the batch to, or --gpu-memory-gb N "
                            "(with --device cuda) for one this machine lacks")
        batch, trace = fitting_batch_size(args, config, world, device, dtype, capacity)
    plan = make_plan(args, config, world, batch)
    with torch.device("meta"):
        meta_model = GPT(config)
    describe(config, plan, meta_model.param_counts(), meta_model.num_params(), batch, world,
             "cuda (fake: predicted, not measured)" if fake and not plan_only else device, dtype)
    if device == "cuda" and trace is None:
        trace = predicted_peak(args, config, world, device, dtype, batch)
    predicted_gb = trace["peak_bytes"] / GIB if trace else None
    if trace:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in trace["parts"].items())
        print0(f"predicted peak GPU memory: {predicted_gb:.2f} GB per rank ({parts}; traced on fake CUDA tensors, "
               f"{'compiled' if args.compile else 'eager'}, {str(dtype).removeprefix('torch.')})")
    # with a GPU to measure on, the measurement decides (an out-of-memory error names the batch that fits)
    if fake and trace and capacity and trace["peak_bytes"] > FITS_FRACTION * capacity:
        fit, fit_trace = fitting_batch_size(args, config, world, device, dtype, capacity)
        raise UserError(f"--device-batch-size {batch} needs ~{predicted_gb:.1f} GB at peak, more than "
                        f"{FITS_FRACTION:.0%} of {capacity / GIB:.1f} GB of GPU memory: use --device-batch-size {fit} "
                        f"(~{fit_trace['peak_bytes'] / GIB:.1f} GB; the total batch stays the same by accumulation)")
    result = {"depth": args.depth, "max_seq_len": config.sequence_len, "device": device, "fake_device": fake,
              "dtype": str(dtype).removeprefix("torch."), "compile": args.compile, "world_size": world,
              "device_batch_size": batch, "grad_accum": plan.grad_accum, "total_batch_size": plan.total_batch_size,
              "num_iterations": plan.num_iterations, "gpu_memory_gb": capacity / GIB if capacity else None,
              "predicted_peak_memory_gb": predicted_gb, "measured_peak_memory_gb": None,
              "peak_memory_gb": predicted_gb, "peak_memory_source": "predicted" if trace else None,
              "tokens_per_second": None, "mfu": None, "eta_seconds": None}
    if fake:
        print0("dry run on meta tensors: the plan only; nothing written" if plan_only else
               "dry run on fake CUDA tensors: tok/s, MFU and the ETA need the GPU itself; nothing written")
        return result
    try:
        result.update(measure_step(args, config, plan, batch, device, dtype, info))
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory_message(args, config, world, device, dtype, batch)) from None
    return result


def measure_step(args, config, plan, batch, device, dtype, info) -> dict:
    """Time micro-batches and an optimizer step of the real step on random tokens, and its peak memory."""
    model = build_model(config, device)
    optimizers = make_optimizers(model, args, plan)
    train_model = wrap_model(model, info, device, args.compile)
    step_fn = TrainStep(model, train_model, optimizers, plan.grad_accum, autocast(device, dtype), args.grad_clip,
                        info.is_ddp, info.world_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, config.sequence_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_fn.accumulate([(x, x)] * min(2, plan.grad_accum))  # warmup (and compilation), with gradients present
    step_fn.update()
    sync()
    t0 = time.perf_counter()
    timed = 2
    for _ in range(timed):
        step_fn.accumulate([(x, x)])
    sync()
    micro = (time.perf_counter() - t0) / timed
    t0 = time.perf_counter()
    step_fn.update()
    sync()
    opt_time = time.perf_counter() - t0
    step_time = plan.grad_accum * micro + opt_time
    tok_per_sec = plan.total_batch_size / step_time
    peak = peak_flops(device)
    mfu = 100 * plan.flops_per_token * tok_per_sec / (peak * info.world_size) if peak else None
    measured_gb = peak_memory_mb(device) / 1024
    print0(f"measured: {micro:.3f} s per micro-batch, {opt_time:.3f} s per optimizer step -> {step_time:.2f} s/step, "
           f"{tok_per_sec:,.0f} tok/s" + (f", MFU {mfu:.1f}%" if mfu is not None else ""))
    print0(f"memory: peak {measured_gb:.2f} GB measured"
           + (" (torch.cuda.max_memory_allocated)" if device == "cuda" else " (process peak RSS)"))
    print0(f"ETA: {format_duration(step_time * plan.num_iterations)} for {plan.num_iterations:,} steps "
           f"(plus evals); dry run: nothing written")
    return {"measured_peak_memory_gb": measured_gb, "peak_memory_gb": measured_gb, "peak_memory_source": "measured",
            "tokens_per_second": tok_per_sec, "mfu": mfu, "eta_seconds": step_time * plan.num_iterations}


if __name__ == "__main__":
    main()
