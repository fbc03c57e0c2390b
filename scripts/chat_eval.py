"""Evaluate a chat model on the chat tasks and compute ChatCORE.

    python -m scripts.chat_eval -i sft                 # every task of the data's set, with the calculator
    python -m scripts.chat_eval -i sft -a GSM8K -x 100
    python -m scripts.chat_eval -i sft --tool-ablation # also rerun the tool tasks without the calculator
    torchrun --nproc_per_node=8 -m scripts.chat_eval -i sft

Task sets: real data (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee) or, with the
synthetic data, the world's held-out tasks (world_mc, world_arith, world_spell).
"""

import json

from nanopipe import cli
from nanopipe.chat_eval import chatcore, evaluate_categorical, evaluate_generative
from nanopipe.checkpoint import load_model
from nanopipe.common import (UserError, atomic_write_text, autocast, autodetect_device, autodetect_dtype,
                             cleanup_distributed, get_base_dir, init_distributed, print0)
from nanopipe.core_eval import centered
from nanopipe.stage import Stage
from tasks.profile import data_profile
from tasks.registry import CODE_TASKS, EVAL_TASKS, TOOL_TASKS


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m scripts.chat_eval", description=__doc__.split("\n")[0])
    p.add_argument("-i", "--source", choices=["sft", "base"], default="sft", help="which model to evaluate")
    cli.old_spelling(p, p.add_argument("-a", "--tasks", default="all",
                                       help="'all' or task names separated by , or |"), "--task-name")
    cli.old_spelling(p, p.add_argument("-x", "--max-per-task", type=cli.integer(1, allow=cli.ALL), default=-1,
                                       help="problems per task (-1: all)"), "--max-problems")
    p.add_argument("-t", "--temperature", type=cli.nonnegative(), default=0.0, help="0: greedy")
    p.add_argument("-k", "--top-k", type=cli.integer(1), default=50)
    p.add_argument("-n", "--num-samples", type=cli.integer(1), default=1,
                   help="samples per generative problem (pass@k)")
    p.add_argument("-m", "--max-new-tokens", type=cli.integer(1), default=256)
    cli.old_spelling(p, p.add_argument("-b", "--device-batch-size", type=cli.integer(1), default=8,
                                       help="prompts per forward for categorical tasks"), "--batch-size")
    p.add_argument("--tool-ablation", action="store_true",
                   help="also score the calculator tasks with the tool disabled, to show what it is worth")
    p.add_argument("-g", "--model-tag", type=cli.name, default=None)
    p.add_argument("-s", "--step", type=cli.integer(0), default=None)
    p.add_argument("--data", type=cli.name, default=None, help="dataset name; 'synthetic' selects the world's tasks")
    p.add_argument("--device", default=None)
    p.add_argument("--unsafe-exec", action="store_true",
                   help="run HumanEval's generated code without the bubblewrap sandbox (Python-level guards only)")
    return p.parse_args(argv)


def task_names(spec: str, data_flag=None) -> list[str]:
    if spec == "all":
        return data_profile(data_flag).eval_tasks
    names = [n.strip() for n in spec.replace("|", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in EVAL_TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)} for -a; known: {', '.join(EVAL_TASKS)}")
    return names


def main(argv=None):
    args = parse_args(argv)
    with Stage(f"chat_eval_{args.source}", args) as stage:
        device = autodetect_device(args.device)
        dtype = autodetect_dtype(device)
        init_distributed(device)
        names = task_names(args.tasks, args.data)
        # load every file (and check the code sandbox) first: fail before any work
        tasks = {name: EVAL_TASKS[name](unsafe_exec=args.unsafe_exec) if name in CODE_TASKS else EVAL_TASKS[name]()
                 for name in names}
        for task in tasks.values():
            task.validate()
        model, tokenizer, meta = load_model(args.source, args.model_tag, args.step, device)
        model.eval()

        limit = None if args.max_per_task < 0 else args.max_per_task
        results, transcripts = {}, []
        for name, task in tasks.items():
            print0(f"{name}: {min(len(task), limit or len(task))} problems ({task.eval_type})")
            with autocast(device, dtype):
                if task.eval_type == "categorical":
                    counts = evaluate_categorical(model, tokenizer, task, args.device_batch_size, limit)
                else:
                    gen = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, max_problems=limit)
                    counts = evaluate_generative(model, tokenizer, task, transcripts=transcripts, **gen)
                    if args.tool_ablation and name in TOOL_TASKS:
                        without = evaluate_generative(model, tokenizer, task, use_tools=False, **gen)
                        counts["accuracy_no_tools"] = without["correct"] / max(without["n"], 1)
            accuracy = counts["correct"] / max(counts["n"], 1)
            results[name] = {"accuracy": accuracy, "centered": centered(accuracy, task.baseline),
                             "baseline": task.baseline, **counts}
            without = (f", without the calculator {counts['accuracy_no_tools']:.4f}"
                       if "accuracy_no_tools" in counts else "")
            print0(f"{name}: accuracy {accuracy:.4f} ({counts['correct']}/{counts['n']}){without}")

        score = chatcore(results)
        print0(f"ChatCORE over {len(results)} tasks: {score:.4f}")
        transcript_md = "\n\n".join(
            f"**{t['task']}** ({'pass' if t['passed'] else 'fail'})\n\n> {t['prompt'].strip()}\n\n"
            f"```\n{t['completion'].strip()}\n```" for t in transcripts)
        out_dir = get_base_dir() / "chat_eval"
        atomic_write_text(out_dir / f"{args.source}_results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(out_dir / f"{args.source}_transcripts.md", transcript_md + "\n")

        rows = ["| task | accuracy | centered | baseline | n | used calculator | accuracy without calculator |",
                "|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            no_tool = f"{r['accuracy_no_tools']:.4f}" if "accuracy_no_tools" in r else "—"
            rows.append(f"| {name} | {r['accuracy']:.4f} | {r['centered']:.4f} | {r['baseline']:.2f} | {r['n']} | "
                        f"{r.get('used_tool', '—')} | {no_tool} |")
        md = (f"Model: {args.source} `{meta.get('tag', '')}` step {meta.get('step')}. "
              f"ChatCORE ({len(results)} tasks): **{score:.4f}**\n\n" + "\n".join(rows)
              + "\n\nSample transcripts (tool calls shown as ⟦calc: expression → result⟧):\n\n" + transcript_md)
        stage.report(md, {"chatcore": score, "chatcore_tasks": len(results), "tasks": results,
                          "transcripts": transcripts})
        cleanup_distributed()


if __name__ == "__main__":
    main()
