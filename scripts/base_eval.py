"""
Evaluate a base model: CORE (per-task accuracy, centered, random baseline, runtime), train/val bits per
byte, greedy samples from fixed prompts, and optionally loss/perplexity/bpb on your own text files.

    python -m scripts.base_eval                              # core, bpb, sample
    python -m scripts.base_eval --eval core --max-per-task 100
    python -m scripts.base_eval --eval text --text notes.md book.txt
    torchrun --nproc_per_node=8 -m scripts.base_eval         # CORE items and bpb batches sharded over ranks
"""

from nanopipe import cli
from nanopipe.checkpoint import load_model
from nanopipe.common import (autocast, autodetect_device, autodetect_dtype, cleanup_distributed,
                             init_distributed, print0)
from nanopipe.core_eval import evaluate_core
from nanopipe.dataloader import PretrainLoader
from nanopipe.engine import greedy_samples
from nanopipe.loss_eval import evaluate_bpb, evaluate_text
from nanopipe.report import core_label
from nanopipe.stage import Stage
from tasks.profile import data_profile

EVALS = ("core", "bpb", "sample", "text")


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="python -m scripts.base_eval", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--eval", default="core,bpb,sample", help=f"comma-separated subset of {','.join(EVALS)}")
    parser.add_argument("-x", "--max-per-task", type=cli.integer(1, allow=cli.ALL), default=-1,
                        help="CORE items per task (-1: all)")
    parser.add_argument("--device-batch-size", type=cli.integer(1), default=16, help="sequences per forward pass")
    cli.old_spelling(parser, parser.add_argument("--eval-tokens", type=cli.integer(1), default=10 * 524288,
                                                 help="tokens per split for bpb"), "--split-tokens")
    parser.add_argument("-g", "--model-tag", type=cli.name, default=None, help="checkpoint tag (default: the latest)")
    parser.add_argument("-s", "--step", type=cli.integer(0), default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--data", type=cli.name, default=None,
                        help="dataset for bpb and the CORE bundle choice (default: $NANOPIPE_DATA or fineweb-edu)")
    parser.add_argument("--text", nargs="+", default=[], help="text files for --eval text")
    parser.add_argument("--device", default=None, help="cuda|mps|cpu (default: autodetect)")
    args = parser.parse_args(argv)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        parser.error(f"--eval {args.eval!r}: choose from {', '.join(EVALS)}")
    if "text" in evals and not args.text:
        parser.error("--eval text needs --text FILE...")
    args.evals = evals
    return args


def markdown_core(result: dict) -> str:
    lines = [f"**{core_label(result)}: {result['core']:.4f}**", ""]
    if result["missing_tasks"]:
        lines += [f"Missing task files (skipped): {', '.join(result['missing_tasks'])}", ""]
    lines += ["| task | accuracy | centered | random baseline % | n | seconds |", "|---|---|---|---|---|---|"]
    for label, r in result["tasks"].items():
        lines.append(f"| {label} | {r['accuracy']:.4f} | {r['centered']:.4f} | {r['random_baseline']:g} | {r['n']} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with Stage("base_eval", args) as stage:
        device = autodetect_device(args.device)
        info = init_distributed(device)
        dtype = autodetect_dtype(device)
        amp = autocast(device, dtype)
        model, tokenizer, meta = load_model("base", args.model_tag, args.step, device)
        profile = data_profile(args.data)
        data_name = profile.data_name
        data, sections = {}, []

        if "core" in args.evals:
            bundle = profile.eval_bundle_dir()
            print0(f"CORE on {bundle}")
            with amp:
                result = evaluate_core(model, tokenizer, bundle, device, max_per_task=args.max_per_task,
                                       batch_size=args.device_batch_size)
            for label, r in result["tasks"].items():
                print0(f"{label:<35} accuracy {r['accuracy']:.4f}  centered {r['centered']:+.4f}  "
                       f"({r['n']} items, {r['seconds']:.1f}s)")
            print0(f"{core_label(result)}: {result['core']:.4f}")
            data.update({k: result[k] for k in ("core", "core_tasks", "core_tasks_total", "missing_tasks", "tasks")})
            sections.append("### CORE\n\n" + markdown_core(result))

        if "bpb" in args.evals:
            seq_len = model.config.sequence_len
            steps = max(1, args.eval_tokens // (args.device_batch_size * seq_len * info.world_size))
            bpb = {}
            for split in ("train", "val"):
                loader = PretrainLoader(tokenizer, data_name, split, args.device_batch_size, seq_len, device=device,
                                        rank=info.rank, world_size=info.world_size)
                with amp:
                    bpb[split] = evaluate_bpb(model, loader, steps, tokenizer.token_bytes())
                print0(f"{split} bpb: {bpb[split]:.4f}")
            data["bpb"] = bpb
            sections.append(f"### Bits per byte\n\n| split | bpb |\n|---|---|\n| train | {bpb['train']:.4f} |\n"
                            f"| val | {bpb['val']:.4f} |\n\n({steps} batches of {args.device_batch_size}x{seq_len} "
                            f"tokens per split and rank, data `{data_name}`)")

        if "sample" in args.evals:
            with amp:
                samples = greedy_samples(model, tokenizer, profile.sample_prompts())
            for line in samples:
                print0(line)
            data["samples"] = samples
            sections.append("### Samples (greedy)\n\n" + "\n".join(f"- `{s!r}`" for s in samples))

        if "text" in args.evals:
            with amp:
                text = evaluate_text(model, tokenizer, args.text, batch_size=args.device_batch_size)
            for path, r in text["files"].items():
                print0(f"{path}: bpb {r['bpb']:.4f}  loss/token {r['loss_per_token']:.4f}  "
                       f"perplexity {r['perplexity']:.2f}  ({r['tokens']} tokens)")
            data["text"] = text
            rows = [f"| {path} | {r['bpb']:.4f} | {r['loss_per_token']:.4f} | {r['perplexity']:.2f} | {r['tokens']} |"
                    for path, r in text["files"].items()]
            header = "| file | bpb | loss/token | perplexity | tokens |\n|---|---|---|---|---|\n"
            sections.append("### Your text\n\n" + header + "\n".join(rows))

        stage.report("\n\n".join(sections), data)
        cleanup_distributed()


if __name__ == "__main__":
    main()
