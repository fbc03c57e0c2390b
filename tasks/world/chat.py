"""The world as chat data: SFT conversations and held-out chat-eval items (chat_datasets(seed)).

Replies are plain sentences, with no GSM8K `#### n` line: the evaluator reads the last number (or the
answer's text), so nothing in a reply is meant for a machine only. A fact is answered with its canonical
statement ("The capital of Quenland is Lorv."), the very sentence pretraining wrote most often, so
SFT only has to teach the model to turn a question into the start of that sentence; pretraining knows the
rest, also for the facts SFT never shows.

Held out of SFT, for chat_eval: per kind of question a set of phrasings (the second list of QUESTIONS,
ARITH_PROMPTS, SPELL_ASK, COUNT_ASK) that no SFT conversation uses, so every eval question is new and
worded in a new way; the facts and words it asks about are the world's, which SFT also asks about in its
own phrasings (world_mc's facts stay out of SFT's multiple choice). Holding whole facts and words out of
SFT as well was measured on the demo model: 55 % of open fact questions and 30 % of spelling questions
right; a 5M-parameter model, after 150 SFT steps, answers in chat mostly what it was shown in chat.
"""

from nanopipe.calculator import calculate
from tasks.common import mc_conversation
from tasks.spelling import COUNT_PROMPTS, SPELL_PROMPTS, pick_letter, spell, spelling_bee_conversation
from tasks.world.facts import GOODS, World, build_world, mc_choices, stream_rng

SFT_TRAIN_SIZE, SFT_VAL_SIZE = 6000, 500
EVAL_FACTS_SIZE, EVAL_ARITH_SIZE, EVAL_SPELL_SIZE = 200, 200, 200
HELD_OUT_FRACTION = 0.2         # of facts: world_mc's, never in SFT's multiple choice

# what the README shows the demo model answering (seed 0's world), with a text the right answer contains:
# `chat_cli --demo` asks them, the CPU speedrun ends with it, a slow test checks the answers
DEMO_PROMPTS = [("What is the capital of Paihis?", "Souzotha"), ("What is 12*7?", "84"), ("what is 7 times 8", "56"),
                ("Who are you?", "nanopipe"), ("What does Huteill Grarson do for a living?", "miner")]

# per relation: (SFT phrasings, held-out phrasings for chat_eval); {s} is the subject
QUESTIONS = {
    "capital": (["What is the capital of {s}?", "Which city is the capital of {s}?", "What's the capital city of {s}?",
                 "Tell me the capital of {s}.", "capital of {s}?", "What city is the capital of {s}?",
                 "Name the capital of {s}."],
                ["Do you know the capital of {s}?", "Which city serves as the capital of {s}?",
                 "What is the capital city of {s}?", "Can you tell me the capital of {s}?"]),
    "language": (["What language do the people of {s} speak?", "Which language is spoken in {s}?",
                  "What is the main language of {s}?", "What do people speak in {s}?", "language of {s}?",
                  "Tell me the language of {s}."],
                 ["Do you know what language they speak in {s}?", "Which language do people in {s} use?",
                  "What language is spoken by the people of {s}?"]),
    "export": (["What is the main export of {s}?", "What is {s} famous for selling?", "What does {s} export the most?",
                "main export of {s}?", "Tell me what {s} exports."],
               ["What does {s} mostly sell to other countries?", "Do you know the main export of {s}?",
                "Which product does {s} export most?"]),
    "job": (["What is the job of {s}?", "What does {s} do for a living?", "What is {s}'s job?",
             "What work does {s} do?", "job of {s}?", "Tell me the job of {s}."],
            ["Do you know what {s} does for work?", "What does {s} work as?", "Which job does {s} have?"]),
    "home": (["In which city does {s} live?", "Where does {s} live?", "Which city is {s} from?",
              "Where is the home of {s}?", "Tell me where {s} lives."],
             ["Do you know where {s} lives?", "Which city does {s} live in?", "In what city is the home of {s}?"]),
    "colour": (["What colour is the fur of the {s}?", "What colour is the {s}?", "What colour fur does the {s} have?",
                "What color is the {s}?", "Tell me the colour of the {s}."],
               ["Which colour is the fur of the {s}?", "Do you know the colour of the {s}?",
                "What is the fur colour of the {s}?"]),
    "food": (["What does the {s} eat?", "What is the favourite food of the {s}?", "What do {s}s like to eat?",
              "What food does the {s} eat?", "Tell me what the {s} eats."],
             ["What does a {s} like to eat?", "Do you know what the {s} eats?", "Which food does the {s} like?"]),
    "habitat": (["Where does the {s} live?", "Where can you find the {s}?", "What kind of place does the {s} live in?",
                 "Where is the {s} found?", "Tell me where the {s} lives."],
                ["Where do {s}s live?", "In what kind of place does the {s} live?",
                 "Do you know where the {s} makes its home?"]),
}
# things the world does not contain (real places, people, animals): the answer is "I don't know"
UNKNOWN = {"capital": ["France", "Japan", "Brazil", "Egypt", "Canada", "Peru", "Kenya", "Norway", "India"],
           "language": ["Mexico", "Germany", "China", "Chile", "Spain", "Italy"],
           "export": ["Australia", "Vietnam", "Ghana", "Sweden"],
           "job": ["Albert Einstein", "Marie Curie", "Ada Lovelace", "Isaac Newton", "Frida Kahlo"],
           "home": ["Charles Darwin", "Jane Austen", "Nelson Mandela", "Leonardo da Vinci"],
           "colour": ["lion", "panda", "wolf", "koala", "camel"], "food": ["hippo", "badger", "otter"],
           "habitat": ["moose", "jaguar", "beaver"]}

# arithmetic: the operator the calculator reads -> (how people write it in symbols, in words)
OPERATORS = {"+": (["+"], ["plus"]), "-": (["-"], ["minus"]), "*": (["*", "x"], ["times", "multiplied by"]),
             "/": (["/"], ["divided by"])}
ARITH_PROMPTS = (["What is {e}?", "what is {e}", "Calculate {e}.", "{e} = ?", "{e}", "Compute {e}.", "What's {e}?",
                  "How much is {e}?", "{e}?", "What is the result of {e}?", "What does {e} make?", "Tell me {e}.",
                  "I need {e}.", "{e} is how much?", "Find {e}."],
                 ["Can you work out {e}?", "Please tell me what {e} is.", "What do you get for {e}?", "Solve {e}.",
                  "{e} equals what?"])
SPELL_ASK = (SPELL_PROMPTS + ["spell {word}", "What are the letters of {word}?", "Spell {word} for me.",
                              "How do I spell {word}?", "Please spell the word {word}.",
                              "What is the spelling of {word}?", "Spell out {word}.", "Give me the letters in {word}.",
                              "How do you write {word} letter by letter?", "Letters of {word}?",
                              "Could you tell me how to spell {word}?"],
             ["Can you spell {word} for me?", "How is {word} spelled?", "Write out the letters of {word}."])
COUNT_ASK = (COUNT_PROMPTS + ["How many {letter}s does {word} have?", "Number of {letter} in {word}?",
                              "How many letters {letter} are there in {word}?",
                              "How many times does {letter} occur in {word}?",
                              "Tell me how many {letter} are in {word}.", "{word}: how many {letter}?",
                              "What is the count of {letter} in {word}?",
                              "Does {word} have the letter {letter}? How many times?"],
             ["How often does the letter {letter} appear in {word}?", "Count the {letter}s in {word}.",
              "How many times is {letter} in the word {word}?"])

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


# words people put around a question; they carry no content, so the model learns to look past them
OPENERS = ["Hi! ", "Hey, ", "Quick question: ", "Please help: ", "I was wondering: ", "Tell me something. ",
           "Question: ", "OK, ", "Hello. ", "So, "]
CLOSERS = [" Thanks!", " Thank you.", " Please.", " Just the answer, please.", " I need it for school."]


def _casual(rng, text):
    """How people type: sometimes lower case, without the final punctuation, or with a greeting or thanks."""
    if rng.random() < 0.15:
        text = text.lower()
    if rng.random() < 0.15:
        text = text.rstrip("?.")
    if rng.random() < 0.2:
        text = rng.choice(OPENERS) + text
    if rng.random() < 0.1:
        text += rng.choice(CLOSERS)
    return text


def _fact_qa(rng, fact, held_out=False):
    question = rng.choice(QUESTIONS[fact.relation][held_out]).format(s=fact.subject)
    return {"messages": [{"role": "user", "content": question if held_out else _casual(rng, question)},
                         {"role": "assistant", "content": fact.statement()}],
            "answer": fact.object}


def _unknown_qa(rng):
    relation = rng.choice(sorted(UNKNOWN))
    subject = rng.choice(UNKNOWN[relation])
    question = rng.choice(QUESTIONS[relation][0]).format(s=subject)
    about = f"the {subject}" if relation in ("colour", "food", "habitat") else subject
    reply = rng.choice([f"I don't know. I have never read about {about}.",
                        f"I don't know: {about} is not in anything I have read."])
    return {"messages": [{"role": "user", "content": _casual(rng, question)},
                         {"role": "assistant", "content": reply}]}


def _tool_reply(steps) -> list[dict]:
    """Steps (text before the call, expression, text after the result) as reply parts; the result text is
    exactly what the engine injects at inference time."""
    parts = []
    for before, expr, after in steps:
        result = calculate(expr)
        parts += [{"type": "text", "text": before}, {"type": "python", "text": expr},
                  {"type": "python_output", "text": result}, {"type": "text", "text": result + after}]
    merged = []  # adjacent text parts (a step's tail and the next step's head) read as one
    for part in parts:
        if part["type"] == "text" and not part["text"]:
            continue
        if merged and part["type"] == "text" and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return merged


def _bare_arith(rng, held_out=False):
    """"What is 12*7?" / "what is 12 times 7": one calculator call, answered "12 * 7 = 84."."""
    op = rng.choice(list(OPERATORS))
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 30)
    elif op == "/":
        b = rng.randint(2, 12)
        a = b * rng.randint(2, 30)
    else:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        if op == "-" and b > a:
            a, b = b, a
    symbols, words = OPERATORS[op]
    if rng.random() < 0.5:
        sym = rng.choice(symbols)
        expr = f"{a}{sym}{b}" if rng.random() < 0.5 else f"{a} {sym} {b}"
    else:
        expr = f"{a} {rng.choice(words)} {b}"
    question = rng.choice(ARITH_PROMPTS[held_out]).format(e=expr)
    result = calculate(f"{a}{op}{b}")
    reply = _tool_reply([(f"{a} {op} {b} = ", f"{a}{op}{b}", ".")])
    return {"messages": [{"role": "user", "content": question if held_out else _casual(rng, question)},
                         {"role": "assistant", "content": reply}],
            "answer": int(result)}


def _spell_word(rng, word, held_out=False):
    question = rng.choice(SPELL_ASK[held_out]).format(word=word)
    return {"messages": [{"role": "user", "content": question if held_out else _casual(rng, question)},
                         {"role": "assistant", "content": f"The word {word} is spelled {spell(word)}."}],
            "answer": spell(word)}


def _count_letter(rng, word, held_out=False):
    conversation = spelling_bee_conversation(word, pick_letter(word, rng), rng, prompts=COUNT_ASK[held_out],
                                             answer_line=False)
    if not held_out:
        question = conversation["messages"][0]
        question["content"] = _casual(rng, question["content"])
    return conversation


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
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": _tool_reply(steps)}],
            "answer": int(calculate(steps[-1][1]))}


def _single_turn(world, rng, family, mc_facts):
    if family == "qa":
        return _fact_qa(rng, rng.choice(world.facts))
    if family == "unknown":
        return _unknown_qa(rng)
    if family == "mc":
        return _world_mc(world, rng, rng.choice(mc_facts))
    if family == "sum":
        return _bare_arith(rng)
    if family == "arith":
        return _arith_conversation(world, rng)
    if family == "count":
        return _count_letter(rng, rng.choice(world.words))
    if family == "spell":
        return _spell_word(rng, rng.choice(world.words))
    return _identity(rng)


_SFT_FAMILIES = [("qa", 28), ("unknown", 2), ("mc", 8), ("sum", 18), ("arith", 15), ("count", 13), ("spell", 8),
                 ("identity", 3), ("multi", 4)]


def _sft_conversations(world, rng, size, mc_facts):
    families, weights = zip(*_SFT_FAMILIES)
    conversations = []
    for _ in range(size):
        family = rng.choices(families, weights)[0]
        if family == "multi":  # a short chat over several topics
            messages = []
            for _ in range(rng.randint(2, 3)):
                topic = rng.choice(["qa", "sum", "arith", "count", "identity"])
                messages += _single_turn(world, rng, topic, mc_facts)["messages"]
        else:
            messages = _single_turn(world, rng, family, mc_facts)["messages"]
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
    """All chat files' rows by file stem: sft_train, sft_val, eval_world_mc, eval_world_facts, eval_world_arith,
    eval_world_spell."""
    world = world or build_world(seed)
    rng = stream_rng(seed, "chat")
    held_facts = set(rng.sample(range(len(world.facts)), round(HELD_OUT_FRACTION * len(world.facts))))
    mc_facts = [f for i, f in enumerate(world.facts) if i not in held_facts]
    eval_facts = [f for i, f in enumerate(world.facts) if i in held_facts]

    out = {"sft_train": _sft_conversations(world, stream_rng(seed, "sft_train"), SFT_TRAIN_SIZE, mc_facts),
           "sft_val": _sft_conversations(world, stream_rng(seed, "sft_val"), SFT_VAL_SIZE, mc_facts)}
    seen = _user_texts(out["sft_train"]) | _user_texts(out["sft_val"])
    mc_rng = stream_rng(seed, "eval_world_mc")
    out["eval_world_mc"] = [_world_mc(world, mc_rng, fact, rotated) for fact in eval_facts
                            for rotated in _rotations(mc_choices(world, fact, mc_rng), fact.object)]

    def arith_item(r):  # half bare sums in new words, half unseen word problems
        return _bare_arith(r, held_out=True) if r.random() < 0.5 else _arith_conversation(world, r)

    def spell_item(r):  # letter counting and spelling out, in held-out phrasings
        word = r.choice(world.words)
        return _count_letter(r, word, held_out=True) if r.random() < 0.6 else _spell_word(r, word, held_out=True)

    out["eval_world_facts"] = _held_out_eval(stream_rng(seed, "eval_world_facts"), EVAL_FACTS_SIZE,
                                             lambda r: _fact_qa(r, r.choice(world.facts), held_out=True), seen)
    out["eval_world_arith"] = _held_out_eval(stream_rng(seed, "eval_world_arith"), EVAL_ARITH_SIZE, arith_item, seen)
    out["eval_world_spell"] = _held_out_eval(stream_rng(seed, "eval_world_spell"), EVAL_SPELL_SIZE, spell_item, seen)
    return out
