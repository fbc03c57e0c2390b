"""Chat evaluation: categorical (multiple choice) and generative (sampled, tool-using) tasks, and ChatCORE.

- Categorical: the prompt is the conversation without its answer plus <|assistant_start|>; the model's
  logits at that last position, restricted to the item's answer letters, pick the answer (argmax).
- Generative: the engine samples a completion (with the calculator unless disabled); the task scores it.
  With several samples a problem passes if any sample passes (pass@k).
Problems are strided over DDP ranks and the counts summed, so any number of ranks gives the same result.
ChatCORE = mean over tasks of the centered accuracy (acc - baseline) / (1 - baseline).
"""

import torch
import torch.distributed as dist

from nanopipe.common import get_dist_info, is_rank0
from nanopipe.core_eval import centered
from nanopipe.engine import TOOL_MARKS, Engine
from nanopipe.progress import track
from nanopipe.tokenizer import SPECIAL_TOKENS


def _sum_across_ranks(device, *values: int) -> list[int]:
    """Sums over ranks, reduced on the model's device: NCCL takes no host tensors."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _prompt(tokenizer, conversation: dict) -> list[int]:
    return tokenizer.render_for_completion(conversation)


@torch.no_grad()
def evaluate_categorical(model, tokenizer, task, batch_size: int = 8, max_problems: int | None = None) -> dict:
    info = get_dist_info()
    device = model.lm_head.weight.device
    n = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(info.rank, n, info.world_size))
    correct = 0
    model.eval()
    for start in track(range(0, len(indices), batch_size), task.name, unit="batches", leave=False, enabled=is_rank0()):
        items = [task[i] for i in indices[start:start + batch_size]]
        prompts = [_prompt(tokenizer, item) for item in items]
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), tokenizer.bos_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt)
        logits = model(ids.to(device))
        for row, (item, prompt) in enumerate(zip(items, prompts)):
            letter_ids = [_single_token(tokenizer, letter) for letter in item["letters"]]
            scores = logits[row, len(prompt) - 1, letter_ids]
            predicted = item["letters"][int(scores.argmax())]
            correct += int(predicted == item["answer"])
    correct, total = _sum_across_ranks(device, correct, len(indices))
    return {"correct": correct, "n": total}


def _single_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is not a single token ({ids}); categorical scoring needs one")
    return ids[0]


def render_completion(tokenizer, tokens: list[int]) -> str:
    """A completion as text with its tool calls marked as the chat shows them, readable in a transcript."""
    special = {tokenizer.encode_special(name): name for name in
               ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    out, chunk = [], []
    for token in tokens:
        if token in special:
            out.append(tokenizer.decode(chunk))
            chunk = []
            out.append(TOOL_MARKS[special[token]])
        else:
            chunk.append(token)
    out.append(tokenizer.decode(chunk))
    return "".join(out)


def scored_text(tokenizer, tokens: list[int], specials: set[int]) -> str:
    """A completion's text for scoring: special tokens carry no answer text, but they separate what they
    delimit: "= <call>12*7</call><out>84</out>84." reads "= 12*7 84 84." (last number 84), where dropping them
    would glue the call, its output and the reply into "12*78484"."""
    runs, run = [], []
    for token in tokens:
        if token in specials:
            runs.append(run)
            run = []
        else:
            run.append(token)
    return " ".join(tokenizer.decode(r) for r in runs + [run] if r)


@torch.no_grad()
def evaluate_generative(model, tokenizer, task, num_samples: int = 1, max_new_tokens: int = 256,
                        temperature: float = 0.0, top_k: int | None = 50, use_tools: bool = True,
                        max_problems: int | None = None, transcripts: list | None = None,
                        num_transcripts: int = 3) -> dict:
    info = get_dist_info()
    engine = Engine(model, tokenizer, use_tools=use_tools)
    n = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(info.rank, n, info.world_size))
    specials = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    correct = tool_calls = 0
    for i in track(indices, task.name, unit="problems", leave=False, enabled=is_rank0()):
        item = task[i]
        prompt = _prompt(tokenizer, item)
        max_tokens = max(1, min(max_new_tokens, model.config.sequence_len - len(prompt)))
        sequences = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                             temperature=temperature, top_k=top_k, seed=i)
        completions = [seq[len(prompt):] for seq in sequences]
        # special tokens carry no answer text: drop them before the task scores the completion
        texts = [scored_text(tokenizer, c, specials) for c in completions]
        passed = any(task.evaluate(item, text) for text in texts)
        correct += int(passed)
        used_tool = any(engine.python_start in c for c in completions)
        tool_calls += int(used_tool)
        if transcripts is not None and len(transcripts) < num_transcripts and (used_tool or not transcripts):
            user_turn = next(m["content"] for m in reversed(item["messages"]) if m["role"] == "user")
            transcripts.append({"task": task.name, "prompt": user_turn,
                                "completion": render_completion(tokenizer, completions[0]), "passed": passed})
    correct, total, tool_calls = _sum_across_ranks(model.lm_head.weight.device, correct, len(indices), tool_calls)
    return {"correct": correct, "n": total, "used_tool": tool_calls}


def chatcore(results: dict) -> float | None:
    """Mean centered accuracy over tasks: {name: {"accuracy", "baseline"}}; None without tasks."""
    if not results:
        return None
    return sum(centered(r["accuracy"], r["baseline"]) for r in results.values()) / len(results)
