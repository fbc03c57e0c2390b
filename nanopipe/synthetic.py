"""
The synthetic source: a small, deterministic, invented world, so the whole pipeline runs offline.

One seed builds one world: 40 countries (capital, language, main export), 40 people (job, home city,
which is a capital), 24 animals (fur colour, food, habitat), a list of a few hundred English words, and
small-number arithmetic. All names are invented, so nothing leaks in from (or out to) real data. Every
fact is written many times, in varied templates and orders, so a tiny model trained for minutes on a CPU
learns it. The same seed always gives byte-identical output (one random.Random per stream, seeded by a
string; no hash() or set order anywhere).

The world is rendered four ways:

1. Pretraining documents: `generate_documents(seed, num_docs)` (country profiles, biographies, animal
   sheets, travel stories, quizzes, fact digests, arithmetic practice, spelling lists). Documents come in
   a fixed order, so the first N documents do not depend on `num_docs`. `python -m nanopipe.dataset
   synthetic` writes DEFAULT_NUM_SHARDS shards of DOCS_PER_SHARD documents (the last is validation).

2. A CORE-format eval bundle, `eval_bundle/` (same layout as the real DCLM bundle):
   - core.yaml: `icl_tasks`: [{label, dataset_uri (relative to eval_data/), num_fewshot: [k],
     icl_task_type, continuation_delimiter}]
   - eval_meta_data.csv: the real file's columns; `Eval Task`, `Random baseline` (percent) are read.
   - eval_data/world/<label>.jsonl, one item per line:
     world_quiz_mc       multiple_choice 0-shot  {"query": "Question: What is the capital of X?\\nAnswer:",
                                                  "choices": [4 objects], "gold": i}
     world_facts_mc      multiple_choice 3-shot  {"query": "The capital of X is", "choices": [...], "gold": i}
     world_facts_schema  schema          0-shot  {"context_options": ["The capital of X is", "The capital of Y is"],
                                                  "continuation": "Quen.", "gold": i}
     world_facts_lm      language_modeling 5-shot {"context": "The capital of X is", "continuation": "Quen"}
     world_arith_lm      language_modeling 5-shot {"context": "7 + 5 =", "continuation": "12"}
   Every item's gold text (query/context + " " + answer) appears verbatim in the pretraining documents.

3. SFT conversations, `chat/sft_train.jsonl` and `chat/sft_val.jsonl`: one `{"messages": [...]}` per line
   in the brief's format (a few start with a system message; some are multi-turn). Families: world
   questions (open and multiple choice in nanochat's render_mc format, reply = the letter), arithmetic word
   problems solved with calculator calls (parts: text, {"type": "python", "text": "12*7"},
   {"type": "python_output", "text": "84"}, text ending "#### 84"), letter counting with a
   `'word'.count('x')` call, spelling a word out, and identity ("I am nanopipe ...").

4. Chat-eval tasks, `chat/eval_<task>.jsonl`, one item per line, none of whose questions is in the SFT
   files (held-out facts, held-out words, unseen problems):
   - eval_world_mc:    categorical. {"messages": [user: render_mc(...), assistant: "B"],
                       "letters": ["A", "B", "C", "D"], "answer": "B"}. Facts held out of all SFT data;
                       each fact appears four times with the gold letter in each position (chance = 25 %).
   - eval_world_arith: generative. {"messages": [user question, assistant tool-call solution],
                       "answer": 84 (int)}; correct iff the completion's last number equals `answer`.
   - eval_world_spell: generative letter counting on held-out words; same fields and scoring.
"""

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from nanopipe.common import atomic_write_text
from nanopipe.execution import calculate
from tasks.common import mc_conversation
from tasks.spelling import pick_letter, simple_spelling_conversation, spelling_bee_conversation

DOCS_PER_SHARD = 2000
DEFAULT_NUM_SHARDS = 6          # 5 train + 1 validation

NUM_COUNTRIES, NUM_PEOPLE, NUM_ANIMALS, NUM_LANGUAGES = 40, 40, 24, 12
SFT_TRAIN_SIZE, SFT_VAL_SIZE = 6000, 500
EVAL_ARITH_SIZE, EVAL_SPELL_SIZE = 200, 200
HELD_OUT_FRACTION = 0.2         # of facts (chat world_mc) and of words (chat world_spell), never in SFT

EXPORTS = ["wool", "copper", "rice", "tea", "salt", "glass", "timber", "silk", "cheese", "olives",
           "honey", "paper", "pottery", "spices", "cotton", "marble"]
JOBS = {  # consonant-initial, so "works as a <job>" never gives the answer away through "a"/"an"
    "baker": "bakes bread before sunrise", "teacher": "teaches children to read", "sailor": "sails ships across the sea",
    "farmer": "grows wheat and beans", "doctor": "helps sick people", "painter": "paints pictures of the hills",
    "fisher": "catches fish in the bay", "potter": "makes pots from clay", "miner": "digs deep under the hills",
    "weaver": "weaves cloth on a loom", "builder": "builds houses of stone", "singer": "sings songs at festivals",
    "tailor": "sews coats and shirts", "hunter": "tracks animals in the woods", "nurse": "cares for patients",
    "pilot": "flies small planes",
}
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "grey", "white", "black", "brown"]
FOODS = ["berries", "fish", "seeds", "grass", "insects", "mushrooms", "nuts", "leaves"]
HABITATS = ["forest", "desert", "mountains", "swamp", "meadow", "caves", "river", "hills"]
GOODS = ["apples", "eggs", "books", "candles", "baskets", "shells", "stones", "cups", "plates", "lamps"]

# Common English words for spelling and letter counting (real words are fine here: spelling is not a fact).
WORDS = """
apple banana cherry grape lemon mango orange peach pear plum melon berry carrot onion potato tomato pepper
garlic bread butter cheese honey sugar salt water coffee juice milk cookie pizza pasta salad soup rice
house window door table chair floor wall roof garden kitchen bottle cup plate spoon fork knife bowl basket
candle lamp mirror pillow blanket carpet ladder bucket hammer nail rope pencil paper letter book story
school teacher student lesson number answer question friend family mother father sister brother baby child
people person doctor farmer sailor painter singer dancer driver pilot nurse river ocean island mountain
valley forest desert meadow flower garden tree branch leaf root seed grass stone rock sand cloud rain snow
storm thunder lightning rainbow summer winter spring autumn morning evening night today tomorrow yesterday
minute hour week month year season moment animal rabbit turtle monkey tiger zebra giraffe elephant kitten
puppy horse donkey chicken goose duck parrot eagle falcon owl sparrow penguin dolphin whale shark salmon
spider beetle butterfly bee ant snail frog lizard snake dragon castle bridge tower village city market
street road station train plane boat ship bicycle wagon engine wheel pocket jacket sweater button zipper
shoe boot glove hat scarf dress shirt skirt pants sock ribbon necklace bracelet ring crown sword shield
arrow music guitar piano violin trumpet drum song dance party picnic holiday travel journey adventure
treasure puzzle riddle secret mystery magic giant wizard pirate knight princess kingdom village happy
sad angry brave calm clever gentle quiet loud bright dark heavy light quick slow strong weak sweet sour
bitter fresh simple little giant yellow purple silver golden green orange banana balloon bubble pebble
marble mirror rabbit coffee cookie tunnel rocket planet galaxy comet moon star sun earth world shadow
sunlight feather blossom harvest lantern compass anchor harbor island whisper giggle mississippi committee
accommodate necessary occasion parallel possess success tomorrow address balloon banana cinnamon coconut
embarrass grammar millennium assessment bookkeeper strawberry raspberry blueberry pineapple watermelon
""".split()

RELATIONS = {
    # prefix: the sentence up to the object (CORE LM context and schema option); question: the canonical quiz
    # question; statements/questions/answers: paraphrases for documents and SFT ({s} subject, {o} object).
    "capital": dict(
        prefix="The capital of {s} is", question="What is the capital of {s}?",
        statements=["{o} is the capital of {s}.", "The capital city of {s} is {o}.", "{s} is governed from its capital, {o}.",
                    "The largest city in {s}, and its capital, is {o}."],
        questions=["Which city is the capital of {s}?", "What's the capital city of {s}?", "Tell me the capital of {s}."],
        answers=["The capital of {s} is {o}.", "{o} is the capital of {s}.", "It is {o}."]),
    "language": dict(
        prefix="The people of {s} speak", question="What language do the people of {s} speak?",
        statements=["In {s}, people speak {o}.", "The main language of {s} is {o}.", "{o} is the language spoken in {s}."],
        questions=["Which language is spoken in {s}?", "What is the main language of {s}?"],
        answers=["The people of {s} speak {o}.", "In {s}, people speak {o}.", "They speak {o}."]),
    "export": dict(
        prefix="The main export of {s} is", question="What is the main export of {s}?",
        statements=["{s} is famous for its {o}.", "{s} sells a lot of {o} to other countries.",
                    "Much of the {o} in the world comes from {s}."],
        questions=["What is {s} famous for selling?", "What does {s} export the most?"],
        answers=["The main export of {s} is {o}.", "{s} is famous for its {o}.", "Mostly {o}."]),
    "job": dict(
        prefix="{s} works as a", question="What is the job of {s}?",
        statements=["{s} is a {o}.", "By trade, {s} is a {o}.", "{s} has worked as a {o} for many years."],
        questions=["What does {s} do for a living?", "What is {s}'s job?"],
        answers=["{s} works as a {o}.", "{s} is a {o}.", "A {o}."]),
    "home": dict(
        prefix="{s} lives in", question="In which city does {s} live?",
        statements=["{s} has a home in the city of {o}.", "{s} lives in the city of {o}.", "{s} is from {o}."],
        questions=["Where does {s} live?", "Which city is {s} from?"],
        answers=["{s} lives in {o}.", "{s} is from {o}.", "In {o}."]),
    "colour": dict(
        prefix="The fur of the {s} is", question="What colour is the fur of the {s}?",
        statements=["The {s} has {o} fur.", "Every {s} is {o} in colour.", "You can spot a {s} by its {o} fur."],
        questions=["What colour is the {s}?", "What colour fur does the {s} have?"],
        answers=["The fur of the {s} is {o}.", "The {s} has {o} fur.", "It is {o}."]),
    "food": dict(
        prefix="The {s} eats", question="What does the {s} eat?",
        statements=["The {s} likes to eat {o}.", "The favourite food of the {s} is {o}.", "A hungry {s} looks for {o}."],
        questions=["What is the favourite food of the {s}?", "What do {s}s like to eat?"],
        answers=["The {s} eats {o}.", "The {s} likes to eat {o}.", "It eats {o}."]),
    "habitat": dict(
        prefix="The {s} lives in the", question="Where does the {s} live?",
        statements=["You can find the {s} in the {o}.", "The {s} makes its home in the {o}.", "The {s} is found in the {o}."],
        questions=["Where can you find the {s}?", "What kind of place does the {s} live in?"],
        answers=["The {s} lives in the {o}.", "You can find the {s} in the {o}.", "In the {o}."]),
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def statement(self) -> str:
        return f"{self.prefix()} {self.object}."

    def prefix(self) -> str:
        return RELATIONS[self.relation]["prefix"].format(s=self.subject)

    def question(self) -> str:
        return RELATIONS[self.relation]["question"].format(s=self.subject)

    def paraphrase(self, rng, kind="statements") -> str:
        return rng.choice(RELATIONS[self.relation][kind]).format(s=self.subject, o=self.object)


@dataclass
class World:
    countries: list[dict]           # {name, capital, language, export}
    people: list[dict]              # {name, first, job, home, country}
    animals: list[dict]             # {name, colour, food, habitat}
    words: list[str]
    facts: list[Fact] = field(default_factory=list)
    values: dict = field(default_factory=dict)   # relation -> every possible object (MC distractors)


def _rng(seed: int, stream: str) -> random.Random:
    # str seeds go through sha512 inside random.seed: stable across runs, unlike hash()
    return random.Random(f"nanopipe.synthetic/{seed}/{stream}")


# -----------------------------------------------------------------------------
# the world

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st",
           "t", "tr", "v", "z", "th", "sh", "qu", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou"]
_CODAS = ["n", "r", "l", "s", "m", "th", "nd", "rk", "x", "sk", "v", "ll"]


def _invented_word(rng, syllables, suffixes, taken):
    """A pronounceable new word that is no prefix of (and has no prefix in) any word already taken, so no
    name hides inside another and a greedy continuation is never ambiguous between two names."""
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        word += rng.choice(_CODAS) if rng.random() < 0.6 else ""
        word += rng.choice(suffixes)
        if 4 <= len(word) <= 11 and "quu" not in word and not any(word.startswith(t) or t.startswith(word) for t in taken):
            taken.append(word)
            return word


def build_world(seed: int) -> World:
    rng = _rng(seed, "world")
    taken = WORDS + EXPORTS + list(JOBS) + COLOURS + FOODS + HABITATS + GOODS  # invented names avoid all of these

    def names(count, syllables, suffixes):
        return [_invented_word(rng, syllables, suffixes, taken).capitalize() for _ in range(count)]

    country_names = names(NUM_COUNTRIES, 2, ["land", "ia", "mark", "dor", "vale", "", ""])
    capitals = names(NUM_COUNTRIES, 2, ["", "", "holm", "by", "ton", "a"])
    languages = names(NUM_LANGUAGES, 1, ["ish", "ic", "ese", "i"])
    firsts = names(NUM_PEOPLE, 2, ["", "", "a", "o"])
    lasts = names(NUM_PEOPLE, 1, ["", "son", "er", "ley", "wick"])
    animal_names = [n.lower() for n in names(NUM_ANIMALS, 2, ["", "ling", "et", "ox", "ar"])]

    countries = [dict(name=c, capital=capitals[i], language=rng.choice(languages), export=rng.choice(EXPORTS))
                 for i, c in enumerate(country_names)]
    people = []
    for first, last in zip(firsts, lasts):
        country = rng.choice(countries)
        people.append(dict(name=f"{first} {last}", first=first, job=rng.choice(list(JOBS)),
                           home=country["capital"], country=country["name"]))
    animals = [dict(name=a, colour=rng.choice(COLOURS), food=rng.choice(FOODS), habitat=rng.choice(HABITATS))
               for a in animal_names]
    words = list(dict.fromkeys(WORDS))  # de-duplicated, order kept

    world = World(countries, people, animals, words)
    for c in countries:
        world.facts += [Fact(c["name"], r, c[r]) for r in ("capital", "language", "export")]
    for p in people:
        world.facts += [Fact(p["name"], r, p[r]) for r in ("job", "home")]
    for a in animals:
        world.facts += [Fact(a["name"], r, a[r]) for r in ("colour", "food", "habitat")]
    world.values = {"capital": capitals, "language": languages, "export": EXPORTS, "job": list(JOBS),
                    "home": capitals, "colour": COLOURS, "food": FOODS, "habitat": HABITATS}
    return world


def _facts_about(world, subject):
    return [f for f in world.facts if f.subject == subject]


# -----------------------------------------------------------------------------
# pretraining documents

class _Cycle:
    """Hands out items in shuffled rounds: every item comes up once per round, so coverage is guaranteed."""

    def __init__(self, items, rng):
        self.items, self.rng, self.queue = list(items), rng, []

    def next(self):
        if not self.queue:
            self.queue = list(self.items)
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def _say(fact, rng):
    """A fact as a sentence: the canonical form (exactly what the CORE items test) or a paraphrase."""
    return fact.statement() if rng.random() < 0.4 else fact.paraphrase(rng)


def _country_profile(world, rng, cycles):
    c = cycles["country"].next()
    facts = _facts_about(world, c["name"])
    sentences = [_say(f, rng) for f in facts]
    residents = [p for p in world.people if p["home"] == c["capital"]]
    for p in residents:
        sentences.append(rng.choice(["{p} is one of the people who live in {h}.", "In {h} you may meet {p}, a {j}.",
                                     "{p}, a {j}, has a house in {h}."]).format(p=p["name"], h=c["capital"], j=p["job"]))
    sentences.append(rng.choice([f"Visitors say that {c['capital']} is a beautiful city.",
                                 f"Many travellers come to {c['name']} every summer.",
                                 f"The roads of {c['name']} lead to its capital, {c['capital']}.",
                                 f"Markets in {c['capital']} are busy from morning to night."]))
    rng.shuffle(sentences)
    title = rng.choice([c["name"], f"About {c['name']}", f"A short guide to {c['name']}"])
    return f"{title}\n\n" + " ".join(sentences)


def _person_bio(world, rng, cycles):
    p = cycles["person"].next()
    country = next(c for c in world.countries if c["name"] == p["country"])
    first = p["first"]
    sentences = [_say(f, rng) for f in _facts_about(world, p["name"])]
    sentences.append(f"Every day {first} {JOBS[p['job']]}.")
    sentences.append(rng.choice([f"{p['home']} is the capital of {country['name']}.",
                                 f"{first} likes living in {p['home']}, the capital of {country['name']}."]))
    sentences.append(rng.choice([f"{first} speaks {country['language']}, like everyone in {country['name']}.",
                                 f"On holidays {first} enjoys the {country['export']} that {country['name']} is known for.",
                                 f"Friends say {first} is kind and hard-working."]))
    rng.shuffle(sentences)
    return f"{p['name']}\n\n" + " ".join(sentences)


def _animal_sheet(world, rng, cycles):
    a = cycles["animal"].next()
    sentences = [_say(f, rng) for f in _facts_about(world, a["name"])]
    sentences.append(rng.choice([f"The {a['name']} is a small and shy animal.", f"The {a['name']} sleeps during the day.",
                                 f"Children love to watch the {a['name']}.", f"The {a['name']} can run very fast."]))
    rng.shuffle(sentences)
    title = rng.choice([f"The {a['name']}", f"Animal guide: the {a['name']}", f"All about the {a['name']}"])
    return f"{title}\n\n" + " ".join(sentences)


def _travel_story(world, rng, cycles):
    p = rng.choice(world.people)
    c = cycles["country"].next()
    a = rng.choice(world.animals)
    first = p["first"]
    parts = [
        f"{p['name']}, a {p['job']} from {p['home']}, once travelled to {c['name']}.",
        f"The people of {c['name']} speak {c['language']}, so {first} learned a few words of {c['language']}.",
        f"{first} visited {c['capital']}, the capital of {c['name']}, and bought some {c['export']}, "
        f"because the main export of {c['name']} is {c['export']}.",
        f"On the way, {first} saw a {a['name']} with {a['colour']} fur eating {a['food']} near the {a['habitat']}.",
        rng.choice([f"After a week, {first} went back home to {p['home']}.",
                    f"{first} still tells stories about {c['name']} to friends in {p['home']}."]),
    ]
    return rng.choice(["A journey", f"{first} in {c['name']}", "Travel notes"]) + "\n\n" + " ".join(parts)


def _quiz(world, rng, cycles):
    facts = [cycles["fact"].next() for _ in range(rng.randint(6, 12))]
    blocks = []
    for f in facts:
        question = f.question() if rng.random() < 0.7 else f.paraphrase(rng, "questions")
        blocks.append(f"Question: {question}\nAnswer: {f.object}")
    return rng.choice(["Quiz", "World quiz", "Test your knowledge"]) + "\n\n" + "\n\n".join(blocks)


def _digest(world, rng, cycles):
    facts = [cycles["fact"].next() for _ in range(rng.randint(10, 20))]
    lines = [f.statement() for f in facts]
    if rng.random() < 0.5:
        return rng.choice(["Facts about the world", "Did you know?", "Notes"]) + "\n\n" + "\n".join(f"- {l}" for l in lines)
    return " ".join(lines)


def _arithmetic(world, rng, cycles):
    kind = rng.random()
    if kind < 0.35:
        a = cycles["add"].next()
        bs = list(range(1, 13))
        if rng.random() < 0.5:
            rng.shuffle(bs)
        return f"Adding {a}\n\n" + "\n".join(f"{a} + {b} = {a + b}" for b in bs)
    if kind < 0.7:
        a = cycles["mul"].next()
        bs = list(range(2, 10))
        if rng.random() < 0.5:
            rng.shuffle(bs)
        return f"Times table of {a}\n\n" + "\n".join(f"{a} * {b} = {a * b}" for b in bs)
    lines = []
    for _ in range(rng.randint(4, 8)):
        p, goods = rng.choice(world.people), rng.choice(GOODS)
        a, b = rng.randint(2, 30), rng.randint(2, 12)
        lines.append(rng.choice([
            f"{a} plus {b} equals {a + b}.",
            f"{a} times {b} is {a * b}.",
            f"{p['first']} has {a} {goods} and gets {b} more, so {p['first']} has {a} + {b} = {a + b} {goods}.",
            f"{p['first']} buys {a} boxes with {b} {goods} in each, so {p['first']} has {a} * {b} = {a * b} {goods}.",
            f"{p['first']} had {a + b} {goods} and gave away {b}, so {a + b} - {b} = {a} {goods} are left.",
        ]))
    return "Maths practice\n\n" + " ".join(lines)


def _spelling(world, rng, cycles):
    lines = []
    for _ in range(rng.randint(8, 16)):
        w = cycles["word"].next()
        letter = rng.choice(w)
        n = w.count(letter)
        lines.append(rng.choice([
            f"{w}:{','.join(w)}",
            f"The word {w} is spelled {','.join(w)}.",
            f"The word {w} has {len(w)} letters.",
            f"The letter {letter} appears {n} time{'s' if n > 1 else ''} in {w}.",
        ]))
    return rng.choice(["Spelling list", "Spelling practice", "Words"]) + "\n\n" + "\n".join(lines)


_DOC_KINDS = [(_country_profile, 3), (_person_bio, 3), (_animal_sheet, 2), (_travel_story, 2), (_quiz, 3),
              (_digest, 2), (_arithmetic, 3), (_spelling, 2)]


def generate_documents(seed: int, num_docs: int) -> Iterator[str]:
    """The pretraining text: `num_docs` documents; the first N are the same for any num_docs >= N."""
    world = build_world(seed)
    rng = _rng(seed, "documents")
    cycles = {"country": _Cycle(world.countries, rng), "person": _Cycle(world.people, rng),
              "animal": _Cycle(world.animals, rng), "fact": _Cycle(world.facts, rng),
              "word": _Cycle(world.words, rng), "add": _Cycle(range(1, 13), rng), "mul": _Cycle(range(2, 10), rng)}
    kinds, weights = zip(*_DOC_KINDS)
    for _ in range(num_docs):
        make = rng.choices(kinds, weights)[0]
        yield make(world, rng, cycles)


# -----------------------------------------------------------------------------
# CORE eval bundle

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


def _choices(world, fact, rng, k=4):
    distractors = rng.sample([v for v in world.values[fact.relation] if v != fact.object], k - 1)
    choices = distractors + [fact.object]
    rng.shuffle(choices)
    return choices


def sample_prompts(seed: int = 0, count: int = 7) -> list[str]:
    """Sentence starts about the world (one per relation, then arithmetic): greedy samples a reader can check."""
    world = build_world(seed)
    first_of_each = {}
    for fact in world.facts:
        first_of_each.setdefault(fact.relation, fact)
    return [fact.prefix() for fact in first_of_each.values()][:count - 1] + ["7 * 8 ="]


def core_items(seed: int, world: World | None = None) -> dict[str, list[dict]]:
    """The CORE task files' items by label."""
    world = world or build_world(seed)
    rng = _rng(seed, "core")
    items = {label: [] for label, *_ in CORE_TASKS}
    for fact in world.facts:
        choices = _choices(world, fact, rng)
        items["world_quiz_mc"].append({"query": f"Question: {fact.question()}\nAnswer:", "choices": choices,
                                       "gold": choices.index(fact.object)})
        choices = _choices(world, fact, rng)
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


def _write_core_bundle(seed, world, bundle_dir: Path):
    items = core_items(seed, world)
    icl_tasks = [{"label": label, "dataset_uri": f"world/{label}.jsonl", "num_fewshot": [shots],
                  "icl_task_type": kind, "continuation_delimiter": delim}
                 for label, kind, shots, delim, *_ in CORE_TASKS]
    atomic_write_text(bundle_dir / "core.yaml", yaml.safe_dump({"icl_tasks": icl_tasks}, sort_keys=False, default_flow_style=None))
    meta = io.StringIO()
    writer = csv.writer(meta, lineterminator="\n")
    writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                     "Centered Metric?", "Description"])
    for label, kind, shots, _, baseline, category, description in CORE_TASKS:
        writer.writerow([label, category, kind.replace("_", " "), shots, len(items[label]), baseline, "", description])
    atomic_write_text(bundle_dir / "eval_meta_data.csv", meta.getvalue())
    for label, rows in items.items():
        _write_jsonl(bundle_dir / "eval_data" / "world" / f"{label}.jsonl", rows)


def _write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# -----------------------------------------------------------------------------
# chat: SFT conversations and chat-eval tasks

IDENTITY_PROMPTS = ["Who are you?", "What is your name?", "Who made you?", "Tell me about yourself.",
                    "Are you ChatGPT?", "What can you do?", "Hi!", "Hello, who am I talking to?", "What are you?"]
IDENTITY_OPENINGS = ["I am nanopipe", "My name is nanopipe", "I'm nanopipe", "Hello! I am nanopipe"]
IDENTITY_BODIES = [
    ", a small language model trained from scratch on a single machine with the nanopipe pipeline.",
    ", a small chat model. I was pretrained on a little invented world and then taught to chat.",
    ", a tiny language model built end to end by the nanopipe project, in the spirit of nanochat.",
]
IDENTITY_SKILLS = [
    " I can answer questions about the countries, people and animals I read about, do arithmetic with a calculator, and spell words.",
    " I am small, so I make mistakes, but I use a calculator tool for arithmetic.",
    " Ask me about capitals, jobs or animals, or give me a sum to work out.",
]
SYSTEM_PROMPTS = ["You are nanopipe, a helpful assistant.", "You are a helpful assistant. Answer briefly."]


def _world_qa(rng, facts):
    fact = rng.choice(facts)
    question = fact.question() if rng.random() < 0.4 else fact.paraphrase(rng, "questions")
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": fact.paraphrase(rng, "answers")}]}


def _world_mc(world, rng, fact, choices=None):
    letters = ["A", "B", "C", "D"]
    choices = choices or _choices(world, fact, rng)
    return mc_conversation(fact.question(), letters, choices, letters[choices.index(fact.object)])


def _rotations(choices, gold):
    """The same choices turned so the gold one sits at each position in turn (a constant-letter guesser
    then scores exactly chance)."""
    g = choices.index(gold)
    return [choices[(g - pos) % len(choices):] + choices[:(g - pos) % len(choices)] for pos in range(len(choices))]


def _identity(rng):
    prompt = rng.choice(IDENTITY_PROMPTS)
    reply = rng.choice(IDENTITY_OPENINGS) + rng.choice(IDENTITY_BODIES) + rng.choice(IDENTITY_SKILLS)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _arith_problem(world, rng):
    """A word problem and its worked solution as steps: (text before the call, expression, text after the
    result)."""
    p = rng.choice(world.people)
    name, first, goods = p["name"], p["first"], rng.choice(GOODS)
    a, b, c = rng.randint(11, 99), rng.randint(3, 40), rng.randint(5, 60)
    kind = rng.randrange(7)
    if kind == 0:
        q = f"{name} packs {a} boxes with {b} {goods} in each box. How many {goods} does {first} pack in total?"
        steps = [(f"{first} packs {a} boxes of {b} {goods}, so the total is {a} * {b} = ", f"{a}*{b}", f" {goods}.")]
    elif kind == 1:
        q = f"{name} has {a} {goods}. A friend from {rng.choice(world.countries)['capital']} gives {first} {b} more. How many {goods} does {first} have now?"
        steps = [(f"{first} starts with {a} {goods} and gets {b} more: {a} + {b} = ", f"{a}+{b}", f" {goods}.")]
    elif kind == 2:
        a += b
        q = f"{name} brings {a} {goods} to the market in {p['home']} and sells {b} of them. How many {goods} are left?"
        steps = [(f"{first} sells {b} of {a} {goods}, so {a} - {b} = ", f"{a}-{b}", f" {goods} are left.")]
    elif kind == 3:
        q = (f"{name} works as a {p['job']} and earns {a} coins each day. After {b} days, {first} also gets a gift "
             f"of {c} coins. How many coins does {first} have?")
        steps = [(f"In {b} days {first} earns {a} * {b} = ", f"{a}*{b}", " coins."),
                 (f"\nWith the gift: {a * b} + {c} = ", f"{a * b}+{c}", " coins.")]
    elif kind == 4:
        c = rng.randint(5, a * b - 1)
        q = (f"A shop in {p['home']} has {a} shelves with {b} {goods} on each shelf. {first} buys {c} {goods}. "
             f"How many {goods} are still in the shop?")
        steps = [(f"The shop has {a} * {b} = ", f"{a}*{b}", f" {goods}."),
                 (f"\nAfter {first} buys {c}: {a * b} - {c} = ", f"{a * b}-{c}", f" {goods} are left.")]
    elif kind == 5:
        total = a * b
        q = f"{name} shares {total} {goods} equally among {b} friends. How many {goods} does each friend get?"
        steps = [(f"Each friend gets {total} / {b} = ", f"{total}/{b}", f" {goods}.")]
    else:
        q = f"{name} walks {a} km on Monday, {b} km on Tuesday and {c} km on Wednesday. How many km is that in total?"
        steps = [(f"Adding the three days: {a} + {b} + {c} = ", f"{a}+{b}+{c}", " km.")]
    return q, steps


def _arith_conversation(world, rng):
    question, steps = _arith_problem(world, rng)
    parts, result = [], None
    for before, expr, after in steps:
        result = calculate(expr)  # the engine injects exactly this text at inference time
        parts += [{"type": "text", "text": before}, {"type": "python", "text": expr},
                  {"type": "python_output", "text": result}, {"type": "text", "text": result + after}]
    parts[-1]["text"] += f"\n#### {result}"
    # adjacent text parts (a step's tail and the next step's head) read as one
    merged = []
    for part in parts:
        if merged and part["type"] == "text" and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": merged}],
            "answer": int(result)}


def _single_turn(world, rng, family, facts, words):
    if family == "qa":
        return _world_qa(rng, facts)
    if family == "mc":
        return _world_mc(world, rng, rng.choice(facts))
    if family == "arith":
        return _arith_conversation(world, rng)
    if family == "count":
        word = rng.choice(words)
        return spelling_bee_conversation(word, pick_letter(word, rng), rng)
    if family == "spell":
        return simple_spelling_conversation(rng.choice(words), rng)
    return _identity(rng)


_SFT_FAMILIES = [("qa", 25), ("mc", 17), ("arith", 30), ("count", 15), ("spell", 7), ("identity", 3), ("multi", 3)]


def _sft_conversations(world, rng, size, facts, words):
    families, weights = zip(*_SFT_FAMILIES)
    conversations = []
    for _ in range(size):
        family = rng.choices(families, weights)[0]
        if family == "multi":  # a short chat over several topics
            messages = []
            for _ in range(rng.randint(2, 3)):
                messages += _single_turn(world, rng, rng.choice(["qa", "arith", "count", "identity"]), facts, words)["messages"]
        else:
            messages = _single_turn(world, rng, family, facts, words)["messages"]
        if rng.random() < 0.03:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
        conversations.append({"messages": messages})
    return conversations


def _user_texts(conversations):
    return {m["content"] for c in conversations for m in c["messages"] if m["role"] == "user"}


def _held_out_eval(rng, size, make, seen):
    """`size` items from `make(rng)` whose question is neither in SFT (`seen`) nor repeated."""
    items = []
    while len(items) < size:
        item = make(rng)
        question = item["messages"][0]["content"]
        if question not in seen:
            seen.add(question)
            items.append(item)
    return items


def chat_datasets(seed: int, world: World | None = None) -> dict[str, list[dict]]:
    """All chat files' rows by file stem: sft_train, sft_val, eval_world_mc, eval_world_arith, eval_world_spell."""
    world = world or build_world(seed)
    rng = _rng(seed, "chat")
    held_facts = set(rng.sample(range(len(world.facts)), round(HELD_OUT_FRACTION * len(world.facts))))
    held_words = set(rng.sample(range(len(world.words)), round(HELD_OUT_FRACTION * len(world.words))))
    sft_facts = [f for i, f in enumerate(world.facts) if i not in held_facts]
    sft_words = [w for i, w in enumerate(world.words) if i not in held_words]
    eval_facts = [f for i, f in enumerate(world.facts) if i in held_facts]
    eval_words = [w for i, w in enumerate(world.words) if i in held_words]

    out = {"sft_train": _sft_conversations(world, _rng(seed, "sft_train"), SFT_TRAIN_SIZE, sft_facts, sft_words),
           "sft_val": _sft_conversations(world, _rng(seed, "sft_val"), SFT_VAL_SIZE, sft_facts, sft_words)}
    seen = _user_texts(out["sft_train"]) | _user_texts(out["sft_val"])
    mc_rng = _rng(seed, "eval_world_mc")
    out["eval_world_mc"] = [_world_mc(world, mc_rng, fact, rotated) for fact in eval_facts
                            for rotated in _rotations(_choices(world, fact, mc_rng), fact.object)]

    def count_item(r):
        word = r.choice(eval_words)
        return spelling_bee_conversation(word, pick_letter(word, r), r)

    out["eval_world_arith"] = _held_out_eval(_rng(seed, "eval_world_arith"), EVAL_ARITH_SIZE,
                                             lambda r: _arith_conversation(world, r), seen)
    out["eval_world_spell"] = _held_out_eval(_rng(seed, "eval_world_spell"), EVAL_SPELL_SIZE, count_item, seen)
    return out


def write_extras(seed: int, out_dir: Path) -> None:
    """Write the world's CORE bundle (out_dir/eval_bundle/) and chat data (out_dir/chat/)."""
    out_dir = Path(out_dir)
    world = build_world(seed)
    _write_core_bundle(seed, world, out_dir / "eval_bundle")
    for stem, rows in chat_datasets(seed, world).items():
        _write_jsonl(out_dir / "chat" / f"{stem}.jsonl", rows)
