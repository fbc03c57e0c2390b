"""The world as a CORE-format eval bundle (core.yaml, eval_meta_data.csv, eval_data/world/*.jsonl), laid out
like the real DCLM bundle so core_eval reads both the same way."""

import csv
import io
import json
from collections import Counter
from pathlib import Path

import yaml

from nanopipe.common import atomic_write_text
from tasks.world.facts import World, build_world, mc_choices, stream_rng

# label, icl_task_type, num_fewshot, continuation_delimiter, random baseline (%; None: the share of the most
# common continuation, what a model that always writes it scores), category, description
CORE_TASKS = [
    ("world_quiz_mc", "multiple_choice", 0, " ", 25, "world knowledge",
     "Four-choice quiz questions about the synthetic world (capitals, languages, exports, jobs, homes, animals)."),
    ("world_facts_mc", "multiple_choice", 3, " ", 25, "world knowledge",
     "Four-choice sentence completions of synthetic world facts, 3-shot."),
    ("world_facts_schema", "schema", 0, " ", 50, "language understanding",
     "Two contexts that differ in their subject, one shared ending: which subject does the fact belong to?"),
    ("world_facts_lm", "language_modeling", 5, " ", None, "world knowledge",
     "Complete a synthetic world fact exactly, 5-shot."),
    ("world_arith_lm", "language_modeling", 5, " ", None, "symbolic problem solving",
     "Small addition and multiplication facts, answer by greedy completion, 5-shot."),
    ("world_two_hop_mc", "multiple_choice", 3, " ", 25, "world knowledge",
     "Two facts joined: the language of a person's country, or of the country with a given capital, 3-shot."),
    ("world_two_hop_export_mc", "multiple_choice", 3, " ", 25, "world knowledge",
     "Two facts joined: the main export of a person's country, or of the country with a given capital, 3-shot."),
    ("world_spell_lm", "language_modeling", 5, " ", None, "symbolic problem solving",
     "Spell a word out letter by letter, exactly, 5-shot."),
    ("world_sums_lm", "language_modeling", 5, " ", None, "symbolic problem solving",
     "Additions beyond the tables (13-30 plus 2-12, only some of them in the documents), 5-shot."),
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
    for label in items:  # the later tasks' lists are still empty here
        rng.shuffle(items[label])
    # the tasks added later draw from their own stream: the items above stay what they were
    rng = stream_rng(seed, "core-hard")
    country_of = {c["name"]: c for c in world.countries}

    def mc(query, gold, values):
        choices = rng.sample([v for v in values if v != gold], 3) + [gold]
        rng.shuffle(choices)
        return {"query": query, "choices": choices, "gold": choices.index(gold)}

    for relation, label, ending in (("language", "world_two_hop_mc", "people speak"),
                                    ("export", "world_two_hop_export_mc", "the main export is")):
        values = world.values[relation]
        items[label] = [mc(f"{p['name']} lives in a country where {ending}", country_of[p["country"]][relation], values)
                        for p in world.people]
        items[label] += [mc(f"In the country whose capital is {c['capital']}, {ending}", c[relation], values)
                         for c in world.countries]
    for w in world.words:  # no final period: the documents' ".\n" is one token
        items["world_spell_lm"].append({"context": f"The word {w} is spelled", "continuation": ",".join(w)})
    items["world_sums_lm"] = [{"context": f"{a} plus {b} equals", "continuation": str(a + b)}
                              for a in range(13, 31) for b in range(2, 13)]
    for label in ("world_two_hop_mc", "world_two_hop_export_mc", "world_spell_lm", "world_sums_lm"):
        rng.shuffle(items[label])
    return items


def majority_baseline(rows: list[dict]) -> float:
    """Percent of language-modeling items a model that always writes the most common continuation gets right."""
    counts = Counter(row["continuation"] for row in rows)
    return 100 * counts.most_common(1)[0][1] / len(rows)


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
        baseline = majority_baseline(items[label]) if baseline is None else baseline
        writer.writerow([label, category, kind.replace("_", " "), shots, len(items[label]), f"{baseline:.4g}", "",
                         description])
    atomic_write_text(bundle_dir / "eval_meta_data.csv", meta.getvalue())
    for label, rows in items.items():
        write_jsonl(bundle_dir / "eval_data" / "world" / f"{label}.jsonl", rows)


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
