"""Pretraining's plan: every hyperparameter base_train derives from --depth, their schedules, and what the run
reports. scripts/base_train.py holds the loop that follows the plan.

    plan = make_plan(args, config, world_size=1)        # a Plan: batch, steps, LR scale, weight decay
    lrm = apply_schedules(optimizers, it, plan.num_iterations, args, plan.weight_decay)
"""

import math
from dataclasses import asdict, dataclass

import torch

from nanopipe.common import UserError, format_duration, print0
from nanopipe.gpt import GPT, config_from_depth
from nanopipe.memory import FITS_FRACTION, GIB, predict_peaks
from nanopipe.optim import setup_optimizers
from nanopipe.training import LoopState, valid_device_batch_sizes

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


@dataclass
class Plan:
    """What a pretraining run will do, derived from --depth and the horizon flags (saved in checkpoints)."""
    scaling_params: int  # the N of tokens = ratio * N (GPT.num_scaling_params)
    target_tokens: int  # ratio * N: the tokens the data ratio asks for
    total_batch_size: int  # tokens per optimizer step, all ranks and micro-batches together
    grad_accum: int  # micro-batches per step and rank
    num_iterations: int  # optimizer steps
    tokens: int  # tokens the run trains on: steps x total batch
    flops_per_token: float  # training FLOPs per token (forward and backward)
    total_flops: float  # FLOPs of the whole run
    lr_scale: float  # every peak LR is multiplied by this (sqrt of the batch relative to the reference)
    weight_decay: float  # Muon's peak weight decay for this horizon (the T_epoch rule)


@dataclass
class PretrainLoopState(LoopState):
    """base_train's loop state: the shared one, the spike detector's running mean and the last val bpb."""
    grad_norm_ema: float = 0.0  # running mean of the grad norm: a step far above it is a spike
    val_bpb: float | None = None  # the last val bpb measured (None before the first)


def scaling_params_of(config) -> int:
    with torch.device("meta"):
        return GPT(config).num_scaling_params()


def make_plan(args, config, world_size: int, device_batch_size: int | None = None) -> Plan:
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
    return Plan(
        scaling_params=scaling_params,
        target_tokens=int(target_tokens),
        total_batch_size=total_batch,
        grad_accum=total_batch // tokens_per_micro,
        num_iterations=num_iterations,
        tokens=num_iterations * total_batch,
        flops_per_token=flops_per_token,
        total_flops=flops_per_token * num_iterations * total_batch,
        # sqrt LR scaling with batch size, and the T_epoch rule for weight decay (wd * lr * horizon constant)
        lr_scale=math.sqrt(total_batch / REFERENCE_BATCH),
        weight_decay=args.weight_decay * math.sqrt(total_batch / REFERENCE_BATCH) * d_ref / target_tokens,
    )


def make_optimizers(model, args, plan: Plan):
    lr_scale = plan.lr_scale
    return setup_optimizers(model, matrix_lr=args.matrix_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                            unembedding_lr=args.unembedding_lr * lr_scale, scalar_lr=args.scalar_lr * lr_scale,
                            weight_decay=plan.weight_decay, compile=args.compile)


def check_resumable(meta: dict, config, plan: Plan, batch: int, world: int):
    """A resumed run must continue the same computation; say which flag differs when it cannot."""
    if meta["model_config"] != asdict(config):
        raise UserError(f"the checkpoint's model {meta['model_config']} differs from this one {asdict(config)}: "
                        "resume with the same --depth/--aspect-ratio/--head-dim/--max-seq-len and tokenizer")
    if meta["world_size"] != world:
        raise UserError(f"the checkpoint was written by {meta['world_size']} rank(s), this run has {world}: "
                        f"resume with --nproc_per_node={meta['world_size']}")
    saved = meta["plan"]
    for key, flag in (("total_batch_size", "--total-batch-size"), ("num_iterations", "--num-iterations")):
        if saved[key] != getattr(plan, key):
            raise UserError(f"the checkpoint was trained with {key} {saved[key]}, this run has "
                            f"{getattr(plan, key)}: resume with the same {flag}")
    if meta["device_batch_size"] != batch:
        raise UserError(f"the checkpoint used --device-batch-size {meta['device_batch_size']}: resume with the same")


# ---------------------------------------------------------------------------------------------
# schedules (`it` = optimizer steps already taken)

def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_frac: float):
    """Linear warmup, constant, then linear warmdown to final_frac.

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


def apply_schedules(optimizers, it, num_iterations, args, weight_decay) -> float:
    """Set this step's LRs, Muon momentum and weight decay; returns the LR multiplier."""
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
    accum = make_plan(args, config, world, batch).grad_accum
    return predict_peaks(asdict(config), device, str(dtype).removeprefix("torch."), args.compile, [(batch, accum)])[0]


def batch_sizes_below(args, config, world, below: int | None = None) -> list[int]:
    """The device batches (under `below` when given) that divide the total batch, ascending."""
    total = make_plan(args, config, world, 1).total_batch_size if args.total_batch_size <= 0 \
        else args.total_batch_size
    return [b for b in valid_device_batch_sizes(total, config.sequence_len, world) if below is None or b < below]


def fitting_batch_size(args, config, world, device, dtype, capacity: int, below: int | None = None) -> tuple[int, dict]:
    """The largest device batch (under `below` when given) that divides the total batch and whose traced peak fits
    FITS_FRACTION of the GPU's memory (a binary search over the divisors, one trace per probe)."""
    sizes = batch_sizes_below(args, config, world, below)
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


def resolve_device_batch_size(args, config, world, device, dtype) -> int:
    """--device-batch-size, with 'auto' resolved to the largest batch that fits this GPU."""
    if args.device_batch_size != "auto":
        return args.device_batch_size
    capacity = gpu_memory_bytes(args, device, fake=False)
    if capacity is None:
        raise UserError("--device-batch-size auto sizes the batch to a GPU's memory: use it on a CUDA GPU, "
                        "or give a number of rows")
    batch = fitting_batch_size(args, config, world, device, dtype, capacity)[0]
    print0(f"--device-batch-size auto: {batch} rows fit the GPU's {capacity / GIB:.1f} GB")
    return batch


def out_of_memory_message(args, config, world, device, dtype, batch) -> str:
    """The error line for a first step that ran out of memory: the largest smaller batch predicted to fit
    --gpu-memory-gb when given, else the GPU's own memory (the batch that failed is out even if predicted to fit:
    the prediction leaves out other processes and the allocator's fragmentation)."""
    head = f"out of memory in the first step with --device-batch-size {batch}: use --device-batch-size"
    keeps = "the total batch stays the same by accumulation"
    capacity = gpu_memory_bytes(args, device, fake=False)
    if capacity is None:  # no GPU to size for: the next smaller batch that divides the total batch
        smaller = batch_sizes_below(args, config, world, below=batch)
        if not smaller:
            return f"out of memory in the first step with --device-batch-size {batch}: lower --depth or --max-seq-len"
        return f"{head} {smaller[-1]} or less ({keeps}), or --gpu-memory-gb N to have the size that fits predicted"
    fit = fitting_batch_size(args, config, world, device, dtype, capacity, below=batch)[0]
    source = "--gpu-memory-gb" if args.gpu_memory_gb else "this GPU's memory"
    return f"{head} {fit} (predicted to fit the {capacity / GIB:.3g} GB of {source}; {keeps})"


# ---------------------------------------------------------------------------------------------
# the report section

@dataclass
class PretrainReport:
    """base_train's report data (its section's json `data`; report.md's summary reads it)."""
    val_bpb: float | None  # final val bits per byte (None with --eval-every -1)
    core: float | None  # final CORE (None with --core-metric-every -1)
    tok_per_sec: float | None  # training throughput over the timed steps, all ranks
    mfu: float | None  # model FLOPs utilisation in %, against peak_flops
    peak_flops: float | None  # the bf16 peak MFU is measured against (NANOPIPE_PEAK_FLOPS overrides)
    params: int  # every parameter of the model
    scaling_params: int  # the N of the data ratio
    tokens: int  # tokens trained on
    flops_per_token: float  # training FLOPs per token
    total_flops: float  # FLOPs of the run
    num_steps: int  # optimizer steps
    total_batch_size: int  # tokens per step
    final_train_loss: float | None  # the last step's train loss (nats/token)
    min_val_bpb: float | None  # the lowest val bpb logged
    train_seconds: float  # time in timed steps (the first step of each process excluded)
    peak_memory_mb: float  # peak GPU memory allocated (process peak RSS on CPU)
    world_size: int  # ranks
    checkpoint: str  # the tag's checkpoint folder

    @classmethod
    def of_run(cls, plan: Plan, loop: PretrainLoopState, final: dict, records: list[dict], **measured):
        """From the plan, the loop state, the final evals and the log; `measured`: params, peak_flops,
        peak_memory_mb, world_size, checkpoint."""
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        tok_per_sec = plan.total_batch_size * loop.timed_steps / loop.train_seconds if loop.train_seconds else None
        peak, world = measured["peak_flops"], measured["world_size"]
        return cls(val_bpb=final.get("val_bpb"), core=final.get("core"), tok_per_sec=tok_per_sec,
                   mfu=100 * plan.flops_per_token * tok_per_sec / (peak * world) if peak and tok_per_sec else None,
                   scaling_params=plan.scaling_params, tokens=plan.tokens, flops_per_token=plan.flops_per_token,
                   total_flops=plan.total_flops, num_steps=plan.num_iterations,
                   total_batch_size=plan.total_batch_size, final_train_loss=losses[-1] if losses else None,
                   min_val_bpb=min((r["val_bpb"] for r in records if r.get("val_bpb") is not None), default=None),
                   train_seconds=loop.train_seconds, **measured)

    def markdown(self, tag: str, config, device: str, samples: list[str]) -> str:
        c = config
        lines = [
            f"Model `{tag}`: depth {c.n_layer}, width {c.n_embd}, {c.n_head} heads, seq {c.sequence_len}, "
            f"vocab {c.vocab_size:,}; {self.params:,} parameters ({self.scaling_params:,} scaling).",
            f"Trained {self.num_steps:,} steps x {self.total_batch_size:,} tokens = {self.tokens:,} tokens "
            f"({self.total_flops:.3e} FLOPs) on {self.world_size} x {device}.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for key in ("val_bpb", "min_val_bpb", "core", "final_train_loss", "tok_per_sec", "mfu", "peak_memory_mb"):
            value = getattr(self, key)
            cell = "—" if value is None else f"{value:,.4f}" if isinstance(value, float) else value
            lines.append(f"| {key} | {cell} |")
        lines.append(f"| train time | {format_duration(self.train_seconds)} |")
        if samples:
            lines += ["", "Samples (greedy):", ""] + [f"    {s!r}" for s in samples]
        return "\n".join(lines)
