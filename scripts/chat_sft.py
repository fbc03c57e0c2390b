"""Supervised fine-tuning: teach the base model to chat (and to call the calculator) on conversations.

    python -m scripts.chat_sft                                # the data's default mixture, one epoch
    python -m scripts.chat_sft --mixture smoltalk,gsm8k:2 --num-iterations 500
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    python -m scripts.chat_sft --resume                       # continue the last SFT checkpoint

Only what the assistant writes is trained (targets are -1 elsewhere), and the loss of a step is normalised
by the number of trained tokens in the whole accumulated batch across ranks, so a micro-batch with no
trained token adds nothing rather than a NaN (nanochat #618). LR: a short linear warm-up (--warmup-steps: the
first steps' Adam updates are full-size whatever the gradient, and the chat tokens the base model never saw
have huge gradients), constant, then linear decay to 0 over the last --warmdown-ratio of training; no weight
decay. Checkpoints go to checkpoints/sft/<tag>/.
"""

import argparse
from dataclasses import asdict

import torch

from nanopipe import cli
from nanopipe.checkpoint import checkpoint_root, load_model, rng_state, save_checkpoint
from nanopipe.common import UserError, cleanup_distributed, get_base_dir, peak_flops, print0
from nanopipe.optim import setup_optimizers
from nanopipe.sft import (SFTLoopState, SFTReport, apply_schedules, min_over_ranks, out_of_memory_message,
                          val_loss)
from nanopipe.sft_data import SFTLoader
from nanopipe.stage import Stage
from nanopipe.train_step import Prefetcher, StepClock, StepProgress, TrainStep, start_training, wrap_model
from nanopipe.training import MetricLog, check_finite, peak_memory_mb, read_log, resume_training, series_from_log
from tasks.common import TaskMixture
from tasks.profile import data_profile
from tasks.registry import SFT_TASKS, parse_mixture

# measured on the CPU demo (d4 base, synthetic mixture), train loss of steps 1-3 and val loss after 20 steps:
# no warm-up 8.69 8.74 5.60 (rises) val 0.618; --init-lr-frac 0.3 8.69 7.10 6.51 val 0.907;
# 5 warm-up steps 8.69 7.60 6.50 val 0.566; 10 warm-up steps 8.69 8.18 6.95 val 0.605
WARMUP_STEPS = 5


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m scripts.chat_sft", description=__doc__.split("\n")[0])
    p.add_argument("-g", "--model-tag", type=cli.name, default=None,
                   help="base model to start from (default: the largest d<N>); the SFT model is saved under the "
                        "same tag")
    p.add_argument("-s", "--step", type=cli.integer(0), default=None, help="base checkpoint step (default: its last)")
    p.add_argument("--mixture", type=mixture_spec, default=None,
                   help="name[:epochs],... from: " + ", ".join(SFT_TASKS) + " (default: the data's mixture)")
    p.add_argument("--data", type=cli.name, default=None,
                   help="dataset name; 'synthetic' selects the synthetic mixture")
    p.add_argument("--num-epochs", type=cli.positive(), default=1.0, help="passes over the mixture")
    p.add_argument("--num-iterations", type=cli.integer(1, allow=cli.AUTO), default=-1,
                   help="optimizer steps (overrides --num-epochs)")
    p.add_argument("--max-seq-len", type=cli.integer(1), default=None, help="row length (default: the base model's)")
    p.add_argument("--device-batch-size", type=cli.integer(1), default=8)
    p.add_argument("--total-batch-size", type=cli.integer(1, allow=cli.AUTO), default=-1,
                   help="tokens per step (-1: one micro-batch per rank, no accumulation)")
    p.add_argument("--matrix-lr", type=cli.nonnegative(), default=0.02)
    p.add_argument("--embedding-lr", type=cli.nonnegative(), default=0.3)
    p.add_argument("--unembedding-lr", type=cli.nonnegative(), default=0.004)
    p.add_argument("--scalar-lr", type=cli.nonnegative(), default=0.5)
    p.add_argument("--init-lr-frac", type=cli.nonnegative(), default=1.0, help="LR multiplier relative to pretraining")
    p.add_argument("--warmup-steps", type=cli.integer(0), default=WARMUP_STEPS,
                   help="steps of linear LR warm-up from 1/N (0: none)")
    p.add_argument("--warmdown-ratio", type=cli.fraction(), default=0.2, help="final fraction of training with LR -> 0")
    p.add_argument("--grad-clip", type=cli.nonnegative(), default=1.0, help="max global grad norm (0: no clipping)")
    p.add_argument("--eval-every", type=cli.integer(1, allow=cli.NEVER), default=100,
                   help="val loss at step 0, every N steps and at the end (-1: never)")
    p.add_argument("--val-conversations", type=cli.integer(1), default=1000, help="held-out conversations for val loss")
    p.add_argument("--save-every", type=cli.integer(1, allow=cli.LAST), default=-1,
                   help="checkpoint every N steps (-1: only the last)")
    p.add_argument("--keep-last", type=cli.integer(1), default=2)
    p.add_argument("--seed", type=cli.seed, default=42)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the training model and Muon's update")
    p.add_argument("--resume", action="store_true", help="continue from the last SFT checkpoint of the tag")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--wandb", default=None, metavar="RUN")
    return p.parse_args(argv)


def mixture_spec(text: str) -> str:
    """--mixture, checked when parsed (names known, epochs finite and > 0)."""
    try:
        parse_mixture(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_mixtures(spec: str, val_conversations: int):
    """(train mixture, val mixture, [(task name, epochs, rows)]) for a mixture spec."""
    try:
        entries = parse_mixture(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    train, val, table = [], [], []
    for name, epochs in entries:
        train_task, val_task = SFT_TASKS[name]()
        for task in (train_task, val_task):
            if task is not None:
                task.validate()  # every conversation, before training: a bad row fails now, not mid-run
        train.append((train_task, epochs))
        table.append((name, epochs, len(train_task)))
        if val_task is not None:
            val.append(val_task)
    train_mix = TaskMixture(train)
    if not val:
        raise UserError(f"mixture {spec!r} has no task with held-out conversations: add one (e.g. synthetic, smoltalk)")
    val_mix = TaskMixture(val)
    return train_mix, val_mix[:min(val_conversations, len(val_mix))], table


def main(argv=None):
    args = parse_args(argv)
    with Stage("chat_sft", args) as stage:
        train(args, stage)


def train(args, stage):
    device, info, dtype, amp = start_training(args.device, args.seed)
    rank, world, master = info.rank, info.world_size, info.rank == 0

    spec = args.mixture or data_profile(args.data).sft_mixture
    train_mix, val_mix, table = build_mixtures(spec, args.val_conversations)
    model, tokenizer, base_meta = load_model("base", args.model_tag, args.step, device)
    model.train()
    tag = args.model_tag or base_meta["tag"]
    seq_len = args.max_seq_len or model.config.sequence_len
    if seq_len > model.rotary_len:
        raise UserError(f"--max-seq-len {seq_len} exceeds what the model's rotary table covers ({model.rotary_len})")
    grad_accum, total_batch = batch_shape(args, seq_len, world)
    shape = f"{grad_accum} x {args.device_batch_size} rows of {seq_len} tokens x {world} rank(s)"
    print0(f"SFT of base model {tag} ({base_meta['checkpoint_dir']}) on {spec}: {len(train_mix):,} conversations "
           f"x {args.num_epochs:g} epoch(s), {len(val_mix):,} held out; {shape} per step")

    lr = args.init_lr_frac
    optimizers = setup_optimizers(model, matrix_lr=args.matrix_lr * lr, embedding_lr=args.embedding_lr * lr,
                                  unembedding_lr=args.unembedding_lr * lr, scalar_lr=args.scalar_lr * lr,
                                  weight_decay=0.0, compile=args.compile)
    ckpt_dir = checkpoint_root("sft") / tag
    loop = SFTLoopState()

    def check_meta(meta):
        if meta["world_size"] != world:
            raise UserError(f"{ckpt_dir} was written by {meta['world_size']} rank(s): resume with the same number")

    start_step, loader_state = resume_training(ckpt_dir, args.resume, model, optimizers, loop, device, rank,
                                               check_meta)
    loader = Prefetcher(SFTLoader(tokenizer, train_mix, args.device_batch_size, seq_len, device, rank, world,
                                  state=loader_state), depth=2 * grad_accum)
    train_model = wrap_model(model, info, device, args.compile)
    step_fn = TrainStep(model, train_model, optimizers, grad_accum, amp, args.grad_clip, info.is_ddp, world)
    log = MetricLog(get_base_dir() / "logs" / f"sft-{tag}.jsonl", start_step, args, f"sft-{tag}", enabled=master,
                    checkpoint_dir=ckpt_dir)
    clock = StepClock(loop, total_batch, model.flops_per_token(), peak_flops(device), world)
    # with --num-iterations the step count is known; otherwise progress is the epochs read, the slowest rank's
    epoch_progress = None if args.num_iterations > 0 else (lambda: loader.progress / args.num_epochs)
    meta = {"tag": tag, "base_checkpoint": base_meta["checkpoint_dir"], "mixture": spec, "user_config": vars(args),
            "max_seq_len": seq_len}

    def validate():
        return val_loss(model, tokenizer, val_mix, args.device_batch_size, seq_len, device, rank, world, amp)

    if start_step == 0 and args.eval_every > 0:
        loop.initial_val_loss = validate()
        print0(f"step 0: val loss {loop.initial_val_loss:.4f}")
        log.write({"step": 0, "val_loss": loop.initial_val_loss})
    step, saved_step = start_step, start_step or None
    progress = step / args.num_iterations if epoch_progress is None else min_over_ranks(epoch_progress(), device)
    total = args.num_iterations if epoch_progress is None else None
    with StepProgress(total, start_step, "chat_sft", master) as bar:
        while progress < 1:
            clock.start()
            lrm = apply_schedules(optimizers, step, progress, args.warmup_steps, args.warmdown_ratio)
            try:
                stats = step_fn.run(loader, epoch_progress)
            except torch.OutOfMemoryError:
                if step > start_step:
                    raise
                raise UserError(out_of_memory_message(args.device_batch_size, seq_len, world, total_batch)) from None
            step += 1
            train_loss, grad_norm = stats["loss"], stats["grad_norm"]
            check_finite(step, train_loss, grad_norm, ckpt_dir, saved_step, "--matrix-lr/--embedding-lr/--init-lr-frac")
            step_fn.update()
            timing = clock.stop()
            loop.trained_tokens += stats["trained_tokens"]
            loop.smooth_loss = 0.9 * loop.smooth_loss + 0.1 * train_loss
            progress = step / args.num_iterations if epoch_progress is None else stats["progress"]
            record = {"step": step, "loss": train_loss, "lrm": lrm, **timing, "grad_norm": grad_norm,
                      "trained_tokens": stats["trained_tokens"], "progress": progress}
            last = progress >= 1
            if last or (args.save_every > 0 and step % args.save_every == 0):
                # before the eval: an eval crash costs no training
                save_checkpoint(ckpt_dir, step, model, optimizers,
                                dict(meta, loop_state=asdict(loop), log_record=record), loader.state_dict(),
                                rng_state(), keep_last=args.keep_last)
                saved_step = step
            if args.eval_every > 0 and (last or step % args.eval_every == 0):
                loop.val_loss = record["val_loss"] = validate()
                bar.note(f"step {step}: val loss {record['val_loss']:.4f}")
            log.write(record)
            mean_dt = clock.mean_step_seconds(timing["dt"])
            steps_total = total or max(step, round(step / max(progress, 1e-9)))  # by epochs: estimated
            bar.step(step, {"loss": loop.smooth_loss / (1 - 0.9 ** (step - start_step)), "lr": lrm, "dt": timing["dt"],
                            "tok/s": total_batch / mean_dt, "mfu": clock.mfu(total_batch / mean_dt)},
                     eta_seconds=mean_dt * (steps_total - step), fraction=min(progress, 1.0), total=steps_total)
    loader.close()

    if start_step == step and args.eval_every > 0:  # a rerun of a finished SFT: nothing to train, refresh the report
        print0(f"{ckpt_dir} is already trained to the end (step {step}); writing its report")
        loop.val_loss = validate()
    log.close()
    records = read_log(log.path)
    data = SFTReport.of_run(loop, records, total_batch, model.flops_per_token(), peak_flops(device), world,
                            num_steps=step, peak_memory_mb=peak_memory_mb(device), mixture=spec,
                            checkpoint=str(ckpt_dir), rows={name: rows for name, _, rows in table})
    stage.report(data.markdown(tag, table, shape), asdict(data),
                 {"sft train loss": series_from_log(records, "loss", "loss (nats/token)"),
                  "sft val loss": series_from_log(records, "val_loss", "loss (nats/token)")})
    cleanup_distributed()


def batch_shape(args, seq_len: int, world: int) -> tuple[int, int]:
    """(micro-batches per step and rank, tokens per step) from --device-batch-size and --total-batch-size."""
    tokens_per_micro = args.device_batch_size * seq_len * world
    total_batch = args.total_batch_size if args.total_batch_size > 0 else tokens_per_micro
    if total_batch % tokens_per_micro:
        raise UserError(f"--total-batch-size {total_batch:,} is not a multiple of --device-batch-size "
                        f"{args.device_batch_size} x seq {seq_len} x {world} rank(s) = {tokens_per_micro:,}")
    return total_batch // tokens_per_micro, total_batch


if __name__ == "__main__":
    main()
