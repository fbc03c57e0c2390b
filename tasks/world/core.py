"""The world as a CORE-format eval bundle (core.yaml, eval_meta_data.csv, eval_data/world/*.jsonl), laid out
like the real DCLM bundle so core_eval reads both the same way."""

import csv
import io
import json
from pathlib import Path

import yaml

from nanopipe.common import atomic_write_text
from tasks.world.facts import World, build_world, mc_choices, stream_rng

# label, icl_task_type, num_fewshot, continuation_delimiter, random baseline (%), category, description
CORE_TASKS = [
    ("world_quiz_mc", "multiple_choice", 0, " ", 25, "world knowledge",
     "Four-choice quiz questions about the synthetic world (capitals, languages, exports, jobs, homes, animals)."),
    ("world_facts_mc", "multiple_choice", 3, " ", 25, "world knowledge",
     "Four-choice sentence completions of synthetic world facts, 3-shot."),
    ("world_facts_schema", "schema", 0, " ", 50, "language understanding",
     "Two contexts that differ in their subject, one shared ending: which subject does the fact belong to?"),
    ("world_facts_lm", "language_modeling", 5, " ", 0, "world knowledge",
     "Complete a synthetic world fact exactly, 5-shot."),
    ("world_arith_lm", "language_modeling", 5, " ", 0, "symbolic problem solving",
     "Small addition and multiplication facts, answer by greedy completion, 5-shot."),
]



def core_items(seed: int, world: World | None = None) -> dict[str, list[dict]]:
    """The CORE task files' items by label."""
    world = world or build_world(seed)
    rng = stream_rng(seed, "core")
    items = {label: [] for label, *_ in CORE_TASKS}
    for fact in world.facts:
        choices = mc_choices(world, fact, rng)
        items["world_quiz_mc"].append({"query": f"Question: {fact.question()}\nAnswer:", "choices": choices,
                                       "gold": choices.index(fact.object)})
        choices = mc_choices(world, fact, rng)
        items["world_facts_mc"].append({"query": fact.prefix(), "choices": choices, "gold": choices.index(fact.object)})
        other = rng.choice([f for f in world.facts if f.relation == fact.relation and f.object != fact.object])
        options = [fact.prefix(), other.prefix()]
        rng.shuffle(options)
        items["world_facts_schema"].append({"context_options": options, "continuation": f"{fact.object}.",
                                            "gold": options.index(fact.prefix())})
        items["world_facts_lm"].append({"context": fact.prefix(), "continuation": fact.object})
    arith = [(a, "+", b, a + b) for a in range(1, 13) for b in range(1, 13)]
    arith += [(a, "*", b, a * b) for a in range(2, 10) for b in range(2, 10)]
    items["world_arith_lm"] = [{"context": f"{a} {op} {b} =", "continuation": str(c)} for a, op, b, c in arith]
    for label in items:
        rng.shuffle(items[label])
    return items


def write_core_bundle(seed, world, bundle_dir: Path):
    items = core_items(seed, world)
    icl_tasks = [{"label": label, "dataset_uri": f"world/{label}.jsonl", "num_fewshot": [shots],
                  "icl_task_type": kind, "continuation_delimiter": delim}
                 for label, kind, shots, delim, *_ in CORE_TASKS]
    atomic_write_text(bundle_dir / "core.yaml",
                      yaml.safe_dump({"icl_tasks": icl_tasks}, sort_keys=False, default_flow_style=None))
    meta = io.StringIO()
    writer = csv.writer(meta, lineterminator="\n")
    writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                     "Centered Metric?", "Description"])
    for label, kind, shots, _, baseline, category, description in CORE_TASKS:
        writer.writerow([label, category, kind.replace("_", " "), shots, len(items[label]), baseline, "", description])
    atomic_write_text(bundle_dir / "eval_meta_data.csv", meta.getvalue())
    for label, rows in items.items():
        write_jsonl(bundle_dir / "eval_data" / "world" / f"{label}.jsonl", rows)


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
