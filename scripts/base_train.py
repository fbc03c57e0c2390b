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
from nanopipe.memory import FITS_FRACTION, GIB, predict_peaks
from nanopipe.optim import setup_optimizers
from nanopipe.stage import Stage
from nanopipe.tokenizer import get_tokenizer
from nanopipe.train_step import Prefetcher, StepClock, StepProgress, TrainStep, training_dtype, wrap_model
from nanopipe.training import MetricLog, check_finite, peak_memory_mb, read_log, resume_training, series_from_log
from tasks.profile import data_profile

# the reference point of every depth-derived hyperparameter: d12 (width 768) trained at ratio 12 (upstream's
# re-run scaling law; the fork used 10.5) with 2^19-token batches. It is one fixed run, whatever this run's
# --target-param-data-ratio/--aspect-ratio/--head-dim: batch (Power Lines) and weight decay (T_epoch) then
# follow this run's own token count relative to it.
REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2**19
REFERENCE_RATIO = 12
# Muon momentum: 0.85 -> 0.97 over the first 16% of the run (upstream's 400 of 2,520 steps at d12), then
# down to 0.90 across the LR warmdown (less momentum as the LR anneals)
MOMENTUM_WARMUP_RATIO = 0.16
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END = 0.85, 0.97, 0.90
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
    g.add_argument("--core-metric-max-per-task", type=cli.integer(1, allow=cli.ALL), default=500,
                   help="CORE items per task (-1: all)")
    g.add_argument("--sample-every", type=cli.integer(1, allow=cli.NEVER), default=2000,
                   help="greedy samples every N steps (-1: never)")
    g.add_argument("--save-every", type=cli.integer(1, allow=cli.LAST), default=-1,
                   help="checkpoint every N steps (-1: only the last)")
    g.add_argument("--keep-last", type=cli.integer(1), default=2, help="checkpoints kept")
    g.add_argument("--model-tag", type=cli.name, default=None, help="checkpoint folder name (default d<depth>)")
    g.add_argument("--tensorboard", action="store_true", help="also log to <base>/logs/tensorboard/<tag>")
    g.add_argument("--wandb", default=None, metavar="RUN", help="also log to wandb under this run name")
    g = p.add_argument_group("run")
    g.add_argument("--data", type=cli.name, default=None,
                   help="dataset name under <base>/data (default $NANOPIPE_DATA or fineweb-edu)")
    g.add_argument("--seed", type=cli.seed, default=42)
    g.add_argument("--device", default=None, help="cuda|mps|cpu (default: autodetect)")
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


# ---------------------------------------------------------------------------------------------
# the plan: everything derived from --depth

def scaling_params_of(config) -> int:
    with torch.device("meta"):
        return GPT(config).num_scaling_params()


def valid_device_batch_sizes(total_batch: int, seq_len: int, world: int) -> list[int]:
    per_row = seq_len * world
    return [b for b in range(1, total_batch // per_row + 1) if total_batch % (b * per_row) == 0]


def make_plan(args, config, world_size: int, device_batch_size: int | None = None) -> dict:
    """Batch size, steps, LR scale and weight decay for this depth, derived as nanochat's base_train does.
    `device_batch_size` (default: the flag's) only sets the gradient accumulation."""
    device_batch_size = device_batch_size or args.device_batch_size
    scaling_params = scaling_params_of(config)
    reference = config_from_depth(REFERENCE_DEPTH, config.vocab_size, config.sequence_len)
    d_ref = REFERENCE_RATIO * scaling_params_of(reference)
    target_tokens = args.target_param_data_ratio * scaling_params
    if args.total_batch_size > 0:
        total_batch = args.total_batch_size
    else:  # Power Lines: the optimal batch grows as D^0.383
        total_batch = 2 ** round(math.log2(REFERENCE_BATCH * (target_tokens / d_ref) ** 0.383))
    tokens_per_micro = device_batch_size * config.sequence_len * world_size
    if total_batch % tokens_per_micro:
        sizes = valid_device_batch_sizes(total_batch, config.sequence_len, world_size)
        raise UserError(f"total batch {total_batch:,} tokens is not a multiple of --device-batch-size "
                        f"{device_batch_size} x seq {config.sequence_len} x {world_size} rank(s) = "
                        f"{tokens_per_micro:,}: use --device-batch-size in {sizes or 'none'} "
                        f"or a --total-batch-size that is a multiple of {tokens_per_micro:,}")
    with torch.device("meta"):
        flops_per_token = GPT(config).flops_per_token()
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * total_batch))
    else:
        num_iterations = int(target_tokens // total_batch)
    if num_iterations < 1:
        raise UserError(f"the plan has {num_iterations} steps: raise --num-iterations/--target-flops/"
                        f"--target-param-data-ratio or lower --total-batch-size")
    return {
        "scaling_params": scaling_params,
        "target_tokens": int(target_tokens),
        "total_batch_size": total_batch,
        "grad_accum": total_batch // tokens_per_micro,
        "num_iterations": num_iterations,
        "tokens": num_iterations * total_batch,
        "flops_per_token": flops_per_token,
        "total_flops": flops_per_token * num_iterations * total_batch,
        # sqrt LR scaling with batch size, and the T_epoch rule for weight decay (wd * lr * horizon constant)
        "lr_scale": math.sqrt(total_batch / REFERENCE_BATCH),
        "weight_decay": args.weight_decay * math.sqrt(total_batch / REFERENCE_BATCH) * d_ref / target_tokens,
    }


def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_frac: float):
    """Linear warmup, constant, then linear warmdown to final_frac; `it` = steps already taken.

    A warmdown to 5% rather than 0 (upstream): the last steps still learn something."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_frac


def muon_momentum(it: int, num_iterations: int, warmdown_ratio: float) -> float:
    """Ramp up over the first MOMENTUM_WARMUP_RATIO of the run, hold, then ramp down across the warmdown."""
    ramp = max(1, round(MOMENTUM_WARMUP_RATIO * num_iterations))
    warmdown = round(warmdown_ratio * num_iterations)
    if it < ramp:
        return MOMENTUM_START + (MOMENTUM_PEAK - MOMENTUM_START) * it / ramp
    if it <= num_iterations - warmdown:
        return MOMENTUM_PEAK
    frac = (it - (num_iterations - warmdown)) / warmdown
    return MOMENTUM_PEAK + (MOMENTUM_END - MOMENTUM_PEAK) * frac


def muon_weight_decay(it: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine from the plan's weight decay to 0 (upstream; it was linear): strong early, gone at the end."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def apply_schedules(optimizers, it, num_iterations, args, weight_decay):
    lrm = lr_multiplier(it, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    adamw, muon = optimizers
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(it, num_iterations, args.warmdown_ratio)
        group["weight_decay"] = muon_weight_decay(it, num_iterations, weight_decay)
    return lrm


# ---------------------------------------------------------------------------------------------

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


def describe(config, plan, model_counts, num_params, batch, world, device, dtype):
    N, total_batch = plan["num_iterations"], plan["total_batch_size"]
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads of {config.head_dim}, "
           f"seq {config.sequence_len}, vocab {config.vocab_size:,}")
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in model_counts.items())
           + f"; total {num_params:,}, scaling {plan['scaling_params']:,}")
    print0(f"plan: {N:,} steps x {total_batch:,} tokens = {plan['tokens']:,} tokens "
           f"(ratio {plan['tokens'] / plan['scaling_params']:.1f}), {plan['flops_per_token']:.3e} FLOPs/token, "
           f"{plan['total_flops']:.3e} FLOPs; grad accum {plan['grad_accum']} x {batch} rows x {world} rank(s); "
           f"LR x{plan['lr_scale']:.3f}, Muon wd {plan['weight_decay']:.4f}; device {device}, {dtype}")


def train(args, stage):
    device = autodetect_device(args.device)
    info = init_distributed(device)
    rank, world, master = info.rank, info.world_size, info.rank == 0
    dtype = training_dtype(device)
    amp = autocast(device, dtype)
    seed_everything(args.seed)
    tokenizer, vocab_size = load_tokenizer(args)
    profile = data_profile(args.data)
    data_name = profile.data_name
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim)
    batch = args.device_batch_size
    if batch == "auto":
        capacity = gpu_memory_bytes(args, device, fake=False)
        if capacity is None:
            raise UserError("--device-batch-size auto sizes the batch to a GPU's memory: use it on a CUDA GPU, "
                            "or give a number of rows")
        batch = fitting_batch_size(args, config, world, device, dtype, capacity)[0]
        print0(f"--device-batch-size auto: {batch} rows fit the GPU's {capacity / GIB:.1f} GB")
    plan = make_plan(args, config, world, batch)
    N, grad_accum, total_batch = plan["num_iterations"], plan["grad_accum"], plan["total_batch_size"]
    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_root("base") / tag
    peak = peak_flops(device)
    model = build_model(config, device)
    describe(config, plan, model.param_counts(), model.num_params(), batch, world, device, dtype)
    optimizers = make_optimizers(model, args, plan)

    # resume: model, optimizers, loader position, RNG and loop state from the last checkpoint
    loop = {"smooth_loss": 0.0, "grad_norm_ema": 0.0, "train_seconds": 0.0, "timed_steps": 0, "val_bpb": None}
    start_step, loader_state = resume_training(ckpt_dir, args.resume, model, optimizers, loop, device, rank,
                                               lambda meta: check_resumable(meta, config, plan, batch, world))
    token_bytes = tokenizer.token_bytes().to(device)
    bundle_dir = profile.eval_bundle_dir() if args.core_metric_every > 0 else None  # fail fast if missing
    train_loader = Prefetcher(PretrainLoader(tokenizer, data_name, "train", batch, config.sequence_len, device, rank,
                                             world, state=loader_state), depth=2 * grad_accum)
    eval_steps = max(1, args.eval_tokens // (batch * config.sequence_len * world))

    def val_bpb():
        val_loader = PretrainLoader(tokenizer, data_name, "val", batch, config.sequence_len, device, rank, world)
        with amp:
            return evaluate_bpb(model, val_loader, eval_steps, token_bytes)

    train_model = wrap_model(model, info, device, args.compile)
    step_fn = TrainStep(model, train_model, optimizers, grad_accum, amp, args.grad_clip, info.is_ddp, world)
    clock = StepClock(loop, total_batch, plan["flops_per_token"], peak, world)
    log = MetricLog(get_base_dir() / "logs" / f"{tag}.jsonl", start_step, args, tag, enabled=master,
                    checkpoint_dir=ckpt_dir)
    meta_common = {"user_config": vars(args), "plan": plan, "tag": tag, "data": data_name,
                   "device_batch_size": batch, "max_seq_len": config.sequence_len}

    def save(step, record):
        meta = dict(meta_common, loop_state=loop, val_bpb=loop["val_bpb"], log_record=record)
        return save_checkpoint(ckpt_dir, step, model, optimizers, meta, train_loader.state_dict(), rng_state(),
                               keep_last=args.keep_last)

    if start_step == 0 and args.eval_every > 0:
        loop["val_bpb"] = val_bpb()
        print0(f"step 0: val bpb {loop['val_bpb']:.4f}")
        log.write({"step": 0, "val_bpb": loop["val_bpb"]})

    samples = []
    # a context manager, so the bar is closed before an error line is printed
    with StepProgress(N, start_step, "base_train", master) as progress:
        saved_step = start_step or None  # the checkpoint a divergence falls back to
        for it in range(start_step, N):
            step = it + 1
            clock.start()
            lrm = apply_schedules(optimizers, it, N, args, plan["weight_decay"])
            try:
                stats = step_fn.run(train_loader)
            except torch.OutOfMemoryError:
                if it > start_step:
                    raise
                raise UserError(out_of_memory_message(args, config, world, device, dtype, batch)) from None
            train_loss, grad_norm = stats["loss"], stats["grad_norm"]
            if it == 0 and abs(train_loss - math.log(config.vocab_size)) > INITIAL_LOSS_TOLERANCE:
                raise UserError(f"initial loss {train_loss:.3f} is far from ln(vocab) = {math.log(config.vocab_size):.3f}: "
                                f"an init or data bug (check the tokenizer and dataset {data_name})")
            check_finite(step, train_loss, grad_norm, ckpt_dir, saved_step,
                         "--matrix-lr/--embedding-lr/--unembedding-lr")
            spike = it >= 10 and grad_norm > SPIKE_FACTOR * loop["grad_norm_ema"]
            skipped = spike and args.skip_spikes
            step_fn.update(apply=not skipped)
            if not skipped:
                loop["grad_norm_ema"] = grad_norm if it == 0 else 0.9 * loop["grad_norm_ema"] + 0.1 * grad_norm
            timing = clock.stop()
            loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
            record = {"step": step, "loss": train_loss, "lr": lrm * args.matrix_lr * plan["lr_scale"], "lrm": lrm,
                      **timing, "grad_norm": grad_norm}
            if spike:
                record["spike"] = True
                record["skipped"] = skipped
                progress.note(f"step {step}: grad norm spike {grad_norm:.3g} (running mean "
                              f"{loop['grad_norm_ema']:.3g})" + ("; update skipped" if skipped else ""))

            last = step == N
            if last or (args.save_every > 0 and step % args.save_every == 0):
                save(step, record)  # before any eval: an eval that dies (OOM on unified memory, #446) loses nothing
                saved_step = step
            if not last:
                if args.eval_every > 0 and step % args.eval_every == 0:
                    loop["val_bpb"] = record["val_bpb"] = val_bpb()
                    progress.note(f"step {step}: val bpb {record['val_bpb']:.4f}")
                if args.core_metric_every > 0 and step % args.core_metric_every == 0:
                    record["core"] = core_metric(model, tokenizer, bundle_dir, device, args, amp)
                    progress.note(f"step {step}: CORE {record['core']:.4f}")
                if args.sample_every > 0 and step % args.sample_every == 0 and master:
                    samples = sample(model, tokenizer, profile.sample_prompts(), amp)
            log.write(record)
            mean_dt = clock.mean_step_seconds(timing["dt"])
            progress.step(step, {"loss": loop["smooth_loss"] / (1 - 0.9 ** step), "lr": lrm, "dt": timing["dt"],
                                 "tok/s": total_batch / mean_dt, "mfu": clock.mfu(total_batch / mean_dt)},
                          eta_seconds=mean_dt * (N - step))
    train_loader.close()

    # final evals on the uncompiled model; the final checkpoint is already on disk
    final = {"step": N, "final": True}
    if args.eval_every > 0:
        loop["val_bpb"] = final["val_bpb"] = val_bpb()
        print0(f"final val bpb {final['val_bpb']:.4f}")
    if args.core_metric_every > 0:
        final["core"] = core_metric(model, tokenizer, bundle_dir, device, args, amp)
        print0(f"final CORE {final['core']:.4f}")
    if args.sample_every > 0 and master:
        samples = sample(model, tokenizer, profile.sample_prompts(), amp)
    if master:
        update_meta(ckpt_dir, N, val_bpb=loop["val_bpb"], core=final.get("core"))
    log.write(final)
    log.close()
    write_report(stage, args, model, plan, loop, final, samples, device, peak, world, log.path, ckpt_dir, tag)
    cleanup_distributed()


def make_optimizers(model, args, plan):
    lr_scale = plan["lr_scale"]
    return setup_optimizers(model, matrix_lr=args.matrix_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                            unembedding_lr=args.unembedding_lr * lr_scale, scalar_lr=args.scalar_lr * lr_scale,
                            weight_decay=plan["weight_decay"], compile=args.compile)


# ---------------------------------------------------------------------------------------------
# memory: the traced peak of the planned step (nanopipe.memory), the batch that fits

def gpu_memory_bytes(args, device: str, fake: bool) -> int | None:
    """The GPU memory to plan for: --gpu-memory-gb, else the GPU's own (None without a GPU)."""
    if args.gpu_memory_gb:
        return int(args.gpu_memory_gb * GIB)
    if device == "cuda" and not fake:
        return torch.cuda.mem_get_info()[1]
    return None


def predicted_peak(args, config, world, device, dtype, batch: int) -> dict:
    """The traced peak memory (one rank) of a step with this device batch."""
    accum = make_plan(args, config, world, batch)["grad_accum"]
    return predict_peaks(asdict(config), device, str(dtype).removeprefix("torch."), args.compile, [(batch, accum)])[0]


def fitting_batch_size(args, config, world, device, dtype, capacity: int) -> tuple[int, dict]:
    """The largest device batch that divides the total batch and whose traced peak fits FITS_FRACTION of the
    GPU's memory (a binary search over the divisors, one trace per probe)."""
    total = make_plan(args, config, world, 1)["total_batch_size"] if args.total_batch_size <= 0 \
        else args.total_batch_size
    sizes = valid_device_batch_sizes(total, config.sequence_len, world)
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        trace = predicted_peak(args, config, world, device, dtype, sizes[mid])
        if trace["peak_bytes"] <= FITS_FRACTION * capacity:
            best, lo = (sizes[mid], trace), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise UserError(f"not even --device-batch-size 1 fits {capacity / GIB:.1f} GB of GPU memory at depth "
                        f"{config.n_layer}, seq {config.sequence_len}: lower --depth or --max-seq-len")
    return best


def out_of_memory_message(args, config, world, device, dtype, batch) -> str:
    capacity = torch.cuda.mem_get_info()[1]
    fit = fitting_batch_size(args, config, world, device, dtype, capacity)[0]
    return (f"out of GPU memory in the first step with --device-batch-size {batch}: use --device-batch-size {fit} "
            f"(predicted to fit this GPU's {capacity / GIB:.1f} GB; the total batch stays the same by accumulation) "
            f"or --device-batch-size auto")


def check_resumable(meta, config, plan, batch, world):
    """A resumed run must continue the same computation; say which flag differs when it cannot."""
    if meta["model_config"] != asdict(config):
        raise UserError(f"the checkpoint's model {meta['model_config']} differs from this one {asdict(config)}: "
                        "resume with the same --depth/--aspect-ratio/--head-dim/--max-seq-len and tokenizer")
    if meta["world_size"] != world:
        raise UserError(f"the checkpoint was written by {meta['world_size']} rank(s), this run has {world}: "
                        f"resume with --nproc_per_node={meta['world_size']}")
    saved = meta["plan"]
    for key, flag in (("total_batch_size", "--total-batch-size"), ("num_iterations", "--num-iterations")):
        if saved[key] != plan[key]:
            raise UserError(f"the checkpoint was trained with {key} {saved[key]}, this run has {plan[key]}: "
                            f"resume with the same {flag}")
    if meta["device_batch_size"] != batch:
        raise UserError(f"the checkpoint used --device-batch-size {meta['device_batch_size']}: resume with the same")


def core_metric(model, tokenizer, bundle_dir, device, args, amp):
    from nanopipe.core_eval import evaluate_core  # heavy eval code, only loaded when CORE is on
    with amp:
        result = evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=args.core_metric_max_per_task,
                               show_progress=False)
    return result["core"]


def sample(model, tokenizer, prompts, amp) -> list[str]:
    """Greedy 16-token continuations of the data profile's prompts (rank 0): a quick look at what the model
    learned."""
    with amp:
        lines = greedy_samples(model, tokenizer, prompts)
    print("\n" + "\n".join(f"  {line!r}" for line in lines))
    return lines


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
    fake = choice == "cuda" and not torch.cuda.is_available()
    device = "cuda" if fake else autodetect_device(args.device)
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
             "cuda (fake: predicted, not measured)" if fake else device, dtype)
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
              "device_batch_size": batch, "grad_accum": plan["grad_accum"], "total_batch_size": plan["total_batch_size"],
              "num_iterations": plan["num_iterations"], "gpu_memory_gb": capacity / GIB if capacity else None,
              "predicted_peak_memory_gb": predicted_gb, "measured_peak_memory_gb": None,
              "peak_memory_gb": predicted_gb, "peak_memory_source": "predicted" if trace else None,
              "tokens_per_second": None, "mfu": None, "eta_seconds": None}
    if fake:
        print0("dry run on fake CUDA tensors: tok/s, MFU and the ETA need the GPU itself; nothing written")
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
    step_fn = TrainStep(model, train_model, optimizers, plan["grad_accum"], autocast(device, dtype), args.grad_clip,
                        info.is_ddp, info.world_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, config.sequence_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_fn.accumulate([(x, x)] * min(2, plan["grad_accum"]))  # warmup (and compilation), with gradients present
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
    step_time = plan["grad_accum"] * micro + opt_time
    tok_per_sec = plan["total_batch_size"] / step_time
    peak = peak_flops(device)
    mfu = 100 * plan["flops_per_token"] * tok_per_sec / (peak * info.world_size) if peak else None
    measured_gb = peak_memory_mb(device) / 1024
    print0(f"measured: {micro:.3f} s per micro-batch, {opt_time:.3f} s per optimizer step -> {step_time:.2f} s/step, "
           f"{tok_per_sec:,.0f} tok/s" + (f", MFU {mfu:.1f}%" if mfu is not None else ""))
    print0(f"memory: peak {measured_gb:.2f} GB measured"
           + (" (torch.cuda.max_memory_allocated)" if device == "cuda" else " (process peak RSS)"))
    print0(f"ETA: {format_duration(step_time * plan['num_iterations'])} for {plan['num_iterations']:,} steps "
           f"(plus evals); dry run: nothing written")
    return {"measured_peak_memory_gb": measured_gb, "peak_memory_gb": measured_gb, "peak_memory_source": "measured",
            "tokens_per_second": tok_per_sec, "mfu": mfu, "eta_seconds": step_time * plan["num_iterations"]}


def write_report(stage, args, model, plan, loop, final, samples, device, peak, world, log_path, ckpt_dir, tag):
    records = read_log(log_path) if log_path.exists() else []
    train_pts = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val_pts = [(r["step"], r["val_bpb"]) for r in records if r.get("val_bpb") is not None]
    tok_per_sec = (plan["total_batch_size"] * loop["timed_steps"] / loop["train_seconds"]
                   if loop["train_seconds"] else None)
    mfu = 100 * plan["flops_per_token"] * tok_per_sec / (peak * world) if peak and tok_per_sec else None
    data = {
        "val_bpb": final.get("val_bpb"),
        "core": final.get("core"),
        "tok_per_sec": tok_per_sec,
        "mfu": mfu,
        "peak_flops": peak,  # the bf16 peak MFU is measured against (NANOPIPE_PEAK_FLOPS overrides)
        "params": model.num_params(),
        "scaling_params": plan["scaling_params"],
        "tokens": plan["tokens"],
        "flops_per_token": plan["flops_per_token"],
        "total_flops": plan["total_flops"],
        "num_steps": plan["num_iterations"],
        "total_batch_size": plan["total_batch_size"],
        "final_train_loss": train_pts[-1][1] if train_pts else None,
        "min_val_bpb": min((v for _, v in val_pts), default=None),
        "train_seconds": loop["train_seconds"],
        "peak_memory_mb": peak_memory_mb(device),
        "world_size": world,
        "checkpoint": str(ckpt_dir),
    }
    c = model.config
    lines = [
        f"Model `{tag}`: depth {c.n_layer}, width {c.n_embd}, {c.n_head} heads, seq {c.sequence_len}, "
        f"vocab {c.vocab_size:,}; {data['params']:,} parameters ({data['scaling_params']:,} scaling).",
        f"Trained {data['num_steps']:,} steps x {data['total_batch_size']:,} tokens = {data['tokens']:,} tokens "
        f"({data['total_flops']:.3e} FLOPs) on {world} x {device}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("val_bpb", "min_val_bpb", "core", "final_train_loss", "tok_per_sec", "mfu", "peak_memory_mb"):
        value = data[key]
        lines.append(f"| {key} | {'—' if value is None else f'{value:,.4f}' if isinstance(value, float) else value} |")
    lines.append(f"| train time | {format_duration(data['train_seconds'])} |")
    if samples:
        lines += ["", "Samples (greedy):", ""] + [f"    {s!r}" for s in samples]
    series = {"train_loss": series_from_log(records, "loss", "train loss (nats/token)"),
              "val_bpb": series_from_log(records, "val_bpb", "val bpb (bits/byte)")}
    stage.report("\n".join(lines), data, series)


if __name__ == "__main__":
    main()
