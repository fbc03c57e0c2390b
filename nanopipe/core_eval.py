"""
The DCLM CORE metric (arXiv 2406.11794) as nanochat computes it, batched.

A bundle is a folder with `core.yaml` (the task list), `eval_meta_data.csv` (random baselines in percent)
and `eval_data/<uri>.jsonl`. Three task types:
- multiple_choice `{query, choices, gold}`: one prompt per choice, `query + delim + choice`; the span scored
  is what follows the choices' common token prefix; the lowest mean loss wins.
- schema `{context_options, continuation, gold}`: one prompt per option, `option + delim + continuation`;
  the span is the options' common token suffix; the lowest mean loss wins.
- language_modeling `{context, continuation}`: `context.strip() + delim + continuation`; the prompt without
  the continuation (`.strip()`ped) is a token prefix of it; correct iff greedy argmax reproduces every
  continuation token.
Few-shot examples (item i draws `random.Random(1234 + i).sample(others, k)`) precede the item, each rendered
with its gold answer and followed by a blank line. Every prompt starts with bos; a prompt longer than
max_seq_len keeps its last max_seq_len tokens.

Speed: two ways to score, chosen per item from its own tokens (never from the batch size).
- An item whose prompts share a prefix of at least half their length (multiple choice: few-shot examples
  + query, then one short choice per prompt) runs that prefix once into a KV cache copied to every
  choice row; only the choices' own tokens run after it. This removes (n - 1) of n prefix passes.
- All other prompts (language modeling, 0-shot schema, items cropped at different points) are batched
  across items: each is right-padded with bos to its length bucket (a multiple of BUCKET), and only prompts
  of the same bucket share a forward pass, so a prompt always goes through the model with the same shape
  whatever the batch size. Padding sits to the right of every scored position, which causal attention
  never lets it influence.
Losses are computed per row and averaged over the span in a fixed order. Any batch size gives the same
outcomes and the same losses up to float rounding (tested): the matrix kernels a CPU or GPU picks for a
batch's shape can move the last bits (bitwise equal on an AMD EPYC, 1e-7 apart on an Intel Xeon).
"""

import csv
import io
import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanopipe.common import UserError, get_dist_info, iter_text_lines, read_text_file
from nanopipe.gpt import KVCache
from nanopipe.progress import Progress

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
BUCKET = 16               # prompts are padded to a multiple of this many tokens
SHUFFLE_SEED = 1337       # each task's data is shuffled once with this seed, before --max-per-task
FEWSHOT_SEED = 1234       # item i draws its few-shot examples with random.Random(FEWSHOT_SEED + i)
SHARED_PREFIX_FRACTION = 0.5  # an item whose prompts share at least this fraction runs the prefix once
FIX = "fix or re-download the eval bundle"


@dataclass
class CoreTask:
    label: str
    task_type: str
    path: Path
    num_fewshot: int
    delimiter: str
    random_baseline: float                      # percent, from eval_meta_data.csv
    items: list = field(default_factory=list)


# -----------------------------------------------------------------------------
# Loading and validating a bundle

def _check_item(item, task_type):
    """None if `item` fits the schema of `task_type`, else what is wrong."""
    if not isinstance(item, dict):
        return "a row must be a JSON object"
    def is_str_list(x):
        return isinstance(x, list) and len(x) >= 2 and all(isinstance(s, str) for s in x)
    if task_type == "multiple_choice":
        if not isinstance(item.get("query"), str):
            return "multiple_choice row needs a string 'query'"
        if not is_str_list(item.get("choices")):
            return "multiple_choice row needs 'choices', a list of at least 2 strings"
        options = item["choices"]
    elif task_type == "schema":
        if not is_str_list(item.get("context_options")):
            return "schema row needs 'context_options', a list of at least 2 strings"
        if not isinstance(item.get("continuation"), str):
            return "schema row needs a string 'continuation'"
        options = item["context_options"]
    else:
        if not isinstance(item.get("context"), str) or not isinstance(item.get("continuation"), str):
            return "language_modeling row needs string 'context' and 'continuation'"
        if not item["continuation"].strip():
            return "language_modeling row has an empty 'continuation'"
        return None
    gold = item.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        return f"'gold' must be an integer index into the {len(options)} options"
    return None


def load_task_items(path: Path, task_type: str) -> list[dict]:
    """Rows of one task file, validated; a broken row raises UserError naming file:line."""
    items = []
    for lineno, line in iter_text_lines(path, FIX):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); {FIX}") from None
        problem = _check_item(item, task_type)
        if problem:
            raise UserError(f"{path}:{lineno}: {problem}; {FIX}")
        items.append(item)
    if not items:
        raise UserError(f"{path}: no rows; {FIX}")
    return items


def _read_baselines(csv_path: Path) -> dict[str, float]:
    if not csv_path.is_file():
        raise UserError(f"no {csv_path.name} in {csv_path.parent}: the eval bundle is incomplete, re-download it")
    with io.StringIO(read_text_file(csv_path, FIX), newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Eval Task" not in reader.fieldnames or "Random baseline" not in reader.fieldnames:
            raise UserError(f"{csv_path}: needs the columns 'Eval Task' and 'Random baseline'")
        baselines = {}
        for lineno, row in enumerate(reader, start=2):
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise UserError(f"{csv_path}:{lineno}: 'Random baseline' is not a number")
    return baselines


def load_bundle(bundle_dir) -> tuple[list[CoreTask], list[str]]:
    """The bundle's tasks with their items, and the labels of tasks whose data file is absent (skipped)."""
    bundle_dir = Path(bundle_dir)
    config_path = bundle_dir / "core.yaml"
    if not config_path.is_file():
        raise UserError(f"no core.yaml in {bundle_dir}: not a CORE eval bundle (download it, or point "
                        "NANOPIPE_EVAL_BUNDLE at one)")
    try:
        config = yaml.safe_load(read_text_file(config_path, FIX))
    except yaml.YAMLError as e:
        raise UserError(f"{config_path}: not valid YAML ({e.__class__.__name__})")
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{config_path}: needs a non-empty 'icl_tasks' list")
    baselines = _read_baselines(bundle_dir / "eval_meta_data.csv")
    tasks, missing = [], []
    for entry in entries:
        try:
            label, task_type, uri = entry["label"], entry["icl_task_type"], entry["dataset_uri"]
            num_fewshot = entry.get("num_fewshot", [0])
            num_fewshot = int(num_fewshot[0] if isinstance(num_fewshot, list) else num_fewshot)
        except (KeyError, TypeError, ValueError, IndexError):
            raise UserError(f"{config_path}: every icl_tasks entry needs label, icl_task_type, dataset_uri, "
                            "num_fewshot")
        if task_type not in TASK_TYPES:
            raise UserError(f"{config_path}: task {label!r} has unknown icl_task_type {task_type!r} "
                            f"(known: {', '.join(TASK_TYPES)})")
        if label not in baselines:
            raise UserError(f"{bundle_dir / 'eval_meta_data.csv'}: no 'Random baseline' for task {label!r}")
        path = bundle_dir / "eval_data" / uri
        if not path.is_file():
            missing.append((label, path))
            continue
        tasks.append(CoreTask(label=label, task_type=task_type, path=path, num_fewshot=num_fewshot,
                              delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label], items=load_task_items(path, task_type)))
    if not tasks:
        raise UserError(f"none of the {len(missing)} task files named in {config_path} is in "
                        f"{bundle_dir / 'eval_data'}: {FIX}")
    for label, path in missing:
        warnings.warn(f"CORE task {label}: {path} is missing, skipping it (CORE will be partial)")
    return tasks, [label for label, _ in missing]


def select_items(items: list, max_per_task: int = -1) -> list:
    """The reference's sampling: shuffle once with a fixed seed, then keep the first max_per_task."""
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items[:max_per_task] if max_per_task > 0 else items


def fewshot_indices(i: int, n: int, k: int) -> list[int]:
    """Few-shot examples for item i out of n; k is capped at n - 1 (nanochat#550)."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    return random.Random(FEWSHOT_SEED + i).sample([j for j in range(n) if j != i], k)


# -----------------------------------------------------------------------------
# Rendering prompts and finding the scored spans

def render_prompts(task_type: str, item: dict, fewshot: list[dict], delim: str) -> list[str]:
    """The prompts of one item: one per choice/option (MC, schema), or [without, with] continuation (LM)."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delim}".strip()
    return [without, f"{shots}{item['context'].strip()}{delim}{item['continuation']}"]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        if any(s[-i] != seqs[0][-i] for s in seqs[1:]):
            return i - 1
    return n


def find_spans(task_type: str, token_lists: list[list[int]]) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per scored sequence; tokens[start:end] are the continuation tokens.

    MC: after the common prefix of the choices; schema: the common suffix of the options; LM: the with-prompt
    after the without-prompt (its token prefix; should tokenization ever merge across the boundary, the
    common prefix is used). Every span keeps at least one token and never starts at 0 (bos has no prediction).
    """
    if task_type == "language_modeling":
        without, with_ = token_lists
        start = _common_prefix_len([without, with_])
        return [(with_, max(1, min(start, len(with_) - 1)), len(with_))]
    if task_type == "multiple_choice":
        prefix = _common_prefix_len(token_lists)
        return [(t, max(1, min(prefix, len(t) - 1)), len(t)) for t in token_lists]
    suffix = _common_suffix_len(token_lists)
    return [(t, max(1, min(len(t) - suffix, len(t) - 1)), len(t)) for t in token_lists]


def crop_left(tokens: list[int], start: int, end: int, max_len: int | None):
    """Keep the last max_len tokens of an over-long prompt and shift its span with it."""
    if max_len is None or len(tokens) <= max_len:
        return tokens, start, end
    cut = len(tokens) - max_len
    return tokens[cut:], max(1, start - cut), end - cut


# -----------------------------------------------------------------------------
# Batched scoring

def _span_scores(logits, targets, spans):
    """Per row r: (mean loss, argmax == target everywhere) over positions spans[r] = (a, b) of logits (R, W, V),
    where targets[r, p] is the token position p should predict (-1: none)."""
    losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                             reduction="none").view(targets.shape)
    hits = logits.argmax(dim=-1) == targets
    losses, hits = losses.cpu(), hits.cpu()  # one transfer per batch, not one per row
    return [(losses[r, a:b].mean().item(), bool(hits[r, a:b].all())) for r, (a, b) in enumerate(spans)]


@torch.no_grad()
def score_sequences(model, sequences, pad_id: int, device, batch_size: int, progress=None):
    """For each (tokens, start, end): (mean loss over tokens[start:end], greedy argmax reproduces them all).

    Sequences are grouped by length bucket and run `batch_size` per forward pass (see module docstring).
    """
    results = [None] * len(sequences)
    buckets = {}
    for idx, (tokens, _, _) in enumerate(sequences):
        buckets.setdefault(-(-len(tokens) // BUCKET) * BUCKET, []).append(idx)
    for width in sorted(buckets):
        members = sorted(buckets[width], key=lambda i: len(sequences[i][0]))
        for b in range(0, len(members), batch_size):
            rows = members[b:b + batch_size]
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(sequences[i][0])] = torch.tensor(sequences[i][0], dtype=torch.long)
            ids = ids.to(device)
            logits = model(ids).float()
            # position p predicts token p + 1; the last column predicts nothing we score
            targets = torch.roll(ids, -1, dims=1)
            targets[:, -1] = -1
            spans = [(sequences[i][1] - 1, sequences[i][2] - 1) for i in rows]
            for i, score in zip(rows, _span_scores(logits, targets, spans)):
                results[i] = score
            if progress is not None:
                progress.update(len(rows))
    return results


def shared_prefix_len(sequences) -> int:
    """How many leading tokens all of an item's sequences have in common and do not score."""
    return min(_common_prefix_len([t for t, _, _ in sequences]), min(s for _, s, _ in sequences))


@torch.no_grad()
def score_with_shared_prefix(model, sequences, pad_id: int, device):
    """score_sequences for the prompts of one item that share a long prefix (a multiple-choice item: few-shot
    examples + query, then one choice per row): the prefix runs once into a KV cache copied to every row,
    then only the rows' own tokens run, right-padded to the longest."""
    q = shared_prefix_len(sequences)
    config = model.config
    prefix = torch.tensor([sequences[0][0][:q]], dtype=torch.long, device=device)
    prefix_cache = KVCache(1, q, config, device=device, dtype=_cache_dtype(device))
    last_prefix_logits = model(prefix, kv_cache=prefix_cache)[:, -1:].float()      # predicts token q
    width = max(len(t) - q for t, _, _ in sequences)
    cache = KVCache(len(sequences), q + width, config, device=device, dtype=_cache_dtype(device))
    cache.expand_from(prefix_cache)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width + 1), -1, dtype=torch.long)
    for r, (tokens, _, _) in enumerate(sequences):
        ids[r, :len(tokens) - q] = torch.tensor(tokens[q:], dtype=torch.long)
        targets[r, :len(tokens) - q] = ids[r, :len(tokens) - q]
    suffix_logits = model(ids.to(device), kv_cache=cache).float()
    # column k of the joined logits sits at sequence position q - 1 + k and predicts token q + k
    logits = torch.cat([last_prefix_logits.expand(len(sequences), -1, -1), suffix_logits], dim=1)
    spans = [(s - q, e - q) for _, s, e in sequences]
    return _span_scores(logits, targets.to(device), spans)


def _cache_dtype(device) -> torch.dtype:
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" and torch.is_autocast_enabled("cuda") else torch.float32


def score_task(model, sequences, plan, pad_id: int, device, batch_size: int, progress=None):
    """Scores of every sequence: items whose prompts share a prefix of at least half their length take
    score_with_shared_prefix (it saves (n - 1) prefix passes), all others are batched by score_sequences.
    Which path an item takes depends on its own tokens only, never on the batch size."""
    results = [None] * len(sequences)
    pooled = []
    for first, count, _ in plan:
        item = sequences[first:first + count]
        if count > 1 and shared_prefix_len(item) >= SHARED_PREFIX_FRACTION * max(len(t) for t, _, _ in item):
            results[first:first + count] = score_with_shared_prefix(model, item, pad_id, device)
            if progress is not None:
                progress.update(count)
        else:
            pooled.extend(range(first, first + count))
    scores = score_sequences(model, [sequences[i] for i in pooled], pad_id, device, batch_size, progress)
    for i, score in zip(pooled, scores):
        results[i] = score
    return results


def prepare_task(task: CoreTask, tokenizer, items: list, indices, max_seq_len: int | None):
    """Tokenize the prompts of items[indices]; per item the range of its sequences and its gold index."""
    prompts, counts = [], []
    for i in indices:
        shots = [items[j] for j in fewshot_indices(i, len(items), task.num_fewshot)]
        item_prompts = render_prompts(task.task_type, items[i], shots, task.delimiter)
        prompts.extend(item_prompts)
        counts.append(len(item_prompts))
    token_lists = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id) if prompts else []
    sequences, plan, offset = [], [], 0
    for i, count in zip(indices, counts):
        spans = find_spans(task.task_type, token_lists[offset:offset + count])
        offset += count
        plan.append((len(sequences), len(spans), items[i].get("gold")))
        sequences.extend(crop_left(t, s, e, max_seq_len) for t, s, e in spans)
    return sequences, plan


def evaluate_task(model, tokenizer, task: CoreTask, device, max_per_task: int = -1, batch_size: int = 16,
                  max_seq_len: int | None = None, show_progress: bool = True) -> tuple[int, int]:
    """(number correct, number of items) for one task, over all ranks."""
    info = get_dist_info()
    items = select_items(task.items, max_per_task)
    indices = range(info.rank, len(items), info.world_size)  # items strided over ranks
    sequences, plan = prepare_task(task, tokenizer, items, indices, max_seq_len)
    with Progress(len(sequences), task.label, unit="prompts", leave=False,
                  enabled=show_progress and info.rank == 0) as progress:
        scores = score_task(model, sequences, plan, tokenizer.bos_token_id, device, batch_size, progress)
    correct = 0
    for first, count, gold in plan:
        item_scores = scores[first:first + count]
        if task.task_type == "language_modeling":
            correct += item_scores[0][1]
        else:
            mean_losses = [loss for loss, _ in item_scores]
            correct += mean_losses.index(min(mean_losses)) == gold
    if info.world_size > 1 and dist.is_initialized():
        total = torch.tensor([correct], dtype=torch.long, device=device)
        dist.all_reduce(total)
        correct = int(total.item())
    return correct, len(items)


def centered(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so that chance (`baseline`, a fraction) is 0 and a perfect score 1: CORE and ChatCORE
    are means of it."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task: int = -1, batch_size: int = 16,
                  max_seq_len: int | None = None, show_progress: bool = True) -> dict:
    """Evaluate every task of the bundle; CORE = mean centered accuracy over the tasks present.

    max_seq_len defaults to the model's training sequence length. Returns
    {"core", "core_tasks", "core_tasks_total", "missing_tasks", "tasks": {label: {accuracy, centered,
    random_baseline, n, seconds}}}.
    """
    if max_seq_len is None:
        max_seq_len = model.config.sequence_len
    tasks, missing = load_bundle(bundle_dir)
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks:
        t0 = time.perf_counter()
        correct, n = evaluate_task(model, tokenizer, task, device, max_per_task, batch_size, max_seq_len,
                                   show_progress)
        accuracy = correct / n
        results[task.label] = {
            "accuracy": accuracy,
            "centered": centered(accuracy, task.random_baseline / 100.0),  # the bundle gives percent
            "random_baseline": task.random_baseline,
            "n": n,
            "seconds": time.perf_counter() - t0,
        }
    model.train(was_training)
    core = sum(r["centered"] for r in results.values()) / len(results)  # load_bundle refuses an empty bundle
    return {"core": core, "core_tasks": len(results), "core_tasks_total": len(results) + len(missing),
            "missing_tasks": missing, "tasks": results}

