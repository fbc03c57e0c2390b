"""Named task sets: what chat_sft trains on and what chat_eval scores, for real data and the synthetic world.

Names are resolved lazily, so a set only needs the files of the tasks it actually builds.
"""

import math

from tasks.arc import ARC
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spelling import SimpleSpelling, SpellingBee
from tasks.world.tasks import SyntheticSFT, WorldArith, WorldFacts, WorldMC, WorldSpell

# chat_eval: name -> factory. ChatCORE averages over the tasks of a set.
EVAL_TASKS = {
    "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
    "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
    "MMLU": lambda: MMLU("all", "test"),
    "GSM8K": lambda: GSM8K("test"),
    "HumanEval": lambda unsafe_exec=False: HumanEval(unsafe_exec=unsafe_exec),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
    "world_mc": lambda: WorldMC(),
    "world_facts": lambda: WorldFacts(),
    "world_arith": lambda: WorldArith(),
    "world_spell": lambda: WorldSpell(),
}
EVAL_SETS = {
    "real": ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"],
    "synthetic": ["world_mc", "world_facts", "world_arith", "world_spell"],
}
# tasks whose answers go through the calculator: chat_eval --tool-ablation reruns them without it
TOOL_TASKS = {"GSM8K", "SpellingBee", "world_arith", "world_spell"}
# tasks that execute model-written code: their factories take unsafe_exec (chat_eval --unsafe-exec)
CODE_TASKS = {"HumanEval"}

# chat_sft: name -> factory of (train task, val task or None)
SFT_TASKS = {
    "smoltalk": lambda: (SmolTalk("train"), SmolTalk("test")),
    "mmlu": lambda: (MMLU("auxiliary_train", "train"), MMLU("all", "test")),
    "gsm8k": lambda: (GSM8K("train"), GSM8K("test")),
    "identity": lambda: (CustomJSON(name="identity"), None),
    "simple_spelling": lambda: (SimpleSpelling(size=200_000, split="train"), None),
    "spelling_bee": lambda: (SpellingBee(size=80_000, split="train"), None),
    "synthetic": lambda: (SyntheticSFT("train"), SyntheticSFT("val")),
}
# nanochat's SFT mixture (REFERENCE §2.8); entries are name:epochs
SFT_MIXTURES = {
    "real": "smoltalk,mmlu,gsm8k:2,identity:2,simple_spelling,spelling_bee",
    "synthetic": "synthetic",
}


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """"smoltalk,gsm8k:2" -> [("smoltalk", 1.0), ("gsm8k", 2.0)]; a mixture name ("real", "synthetic") stands
    for its entries; unknown names raise ValueError."""
    spec = SFT_MIXTURES.get(spec, spec)
    entries = []
    for part in spec.split(","):
        name, _, epochs = part.strip().partition(":")
        if name not in SFT_TASKS:
            raise ValueError(f"unknown SFT task {name!r} in --mixture; known: {', '.join(SFT_TASKS)}")
        try:
            value = float(epochs) if epochs else 1.0
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"bad epochs {epochs!r} for {name} in --mixture: use name:number > 0, e.g. gsm8k:2")
        entries.append((name, value))
    return entries
