"""The world as chat data: SFT conversations and held-out chat-eval items (chat_datasets(seed))."""

from nanopipe.execution import calculate
from tasks.common import mc_conversation
from tasks.spelling import pick_letter, simple_spelling_conversation, spelling_bee_conversation
from tasks.world.facts import GOODS, World, build_world, mc_choices, stream_rng

SFT_TRAIN_SIZE, SFT_VAL_SIZE = 6000, 500
EVAL_ARITH_SIZE, EVAL_SPELL_SIZE = 200, 200
HELD_OUT_FRACTION = 0.2         # of facts (chat world_mc) and of words (chat world_spell), never in SFT

IDENTITY_PROMPTS = ["Who are you?", "What is your name?", "Who made you?", "Tell me about yourself.",
                    "Are you ChatGPT?", "What can you do?", "Hi!", "Hello, who am I talking to?", "What are you?"]
IDENTITY_OPENINGS = ["I am nanopipe", "My name is nanopipe", "I'm nanopipe", "Hello! I am nanopipe"]
IDENTITY_BODIES = [
    ", a small language model trained from scratch on a single machine with the nanopipe pipeline.",
    ", a small chat model. I was pretrained on a little invented world and then taught to chat.",
    ", a tiny language model built end to end by the nanopipe project, in the spirit of nanochat.",
]
IDENTITY_SKILLS = [
    " I can answer questions about the countries, people and animals I read about, do arithmetic with a calculator,"
    " and spell words.",
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
    choices = choices or mc_choices(world, fact, rng)
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
        q = (f"{name} has {a} {goods}. A friend from {rng.choice(world.countries)['capital']} gives {first} {b} more. "
             f"How many {goods} does {first} have now?")
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
                topic = rng.choice(["qa", "arith", "count", "identity"])
                messages += _single_turn(world, rng, topic, facts, words)["messages"]
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
    rng = stream_rng(seed, "chat")
    held_facts = set(rng.sample(range(len(world.facts)), round(HELD_OUT_FRACTION * len(world.facts))))
    held_words = set(rng.sample(range(len(world.words)), round(HELD_OUT_FRACTION * len(world.words))))
    sft_facts = [f for i, f in enumerate(world.facts) if i not in held_facts]
    sft_words = [w for i, w in enumerate(world.words) if i not in held_words]
    eval_facts = [f for i, f in enumerate(world.facts) if i in held_facts]
    eval_words = [w for i, w in enumerate(world.words) if i in held_words]

    out = {"sft_train": _sft_conversations(world, stream_rng(seed, "sft_train"), SFT_TRAIN_SIZE, sft_facts, sft_words),
           "sft_val": _sft_conversations(world, stream_rng(seed, "sft_val"), SFT_VAL_SIZE, sft_facts, sft_words)}
    seen = _user_texts(out["sft_train"]) | _user_texts(out["sft_val"])
    mc_rng = stream_rng(seed, "eval_world_mc")
    out["eval_world_mc"] = [_world_mc(world, mc_rng, fact, rotated) for fact in eval_facts
                            for rotated in _rotations(mc_choices(world, fact, mc_rng), fact.object)]

    def count_item(r):
        word = r.choice(eval_words)
        return spelling_bee_conversation(word, pick_letter(word, r), r)

    out["eval_world_arith"] = _held_out_eval(stream_rng(seed, "eval_world_arith"), EVAL_ARITH_SIZE,
                                             lambda r: _arith_conversation(world, r), seen)
    out["eval_world_spell"] = _held_out_eval(stream_rng(seed, "eval_world_spell"), EVAL_SPELL_SIZE, count_item, seen)
    return out

