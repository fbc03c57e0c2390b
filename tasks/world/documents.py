"""The world as pretraining prose: generate_documents(seed, num_docs) (profiles, biographies, animal sheets,
travel stories, quizzes, digests, arithmetic and spelling practice), in a fixed order."""

from typing import Iterator

from tasks.world.facts import GOODS, JOBS, build_world, stream_rng


def _facts_about(world, subject):
    return [f for f in world.facts if f.subject == subject]


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
                                     "{p}, a {j}, has a house in {h}."]).format(p=p["name"], h=c["capital"],
                                                                                 j=p["job"]))
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
                                 f"On holidays {first} enjoys the {country['export']} that {country['name']} is "
                                 f"known for.",
                                 f"Friends say {first} is kind and hard-working."]))
    rng.shuffle(sentences)
    return f"{p['name']}\n\n" + " ".join(sentences)


def _animal_sheet(world, rng, cycles):
    a = cycles["animal"].next()
    sentences = [_say(f, rng) for f in _facts_about(world, a["name"])]
    sentences.append(rng.choice([f"The {a['name']} is a small and shy animal.",
                                 f"The {a['name']} sleeps during the day.",
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
        title = rng.choice(["Facts about the world", "Did you know?", "Notes"])
        return title + "\n\n" + "\n".join(f"- {line}" for line in lines)
    return " ".join(lines)


def _arithmetic(world, rng, cycles):
    kind = rng.random()
    if kind < 0.7:  # a table: addition (a + 1..12) or multiplication (a * 2..9)
        adding = kind < 0.35
        a = cycles["add" if adding else "mul"].next()
        bs = list(range(1, 13) if adding else range(2, 10))
        if rng.random() < 0.5:
            rng.shuffle(bs)
        if adding:
            return f"Adding {a}\n\n" + "\n".join(f"{a} + {b} = {a + b}" for b in bs)
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
    rng = stream_rng(seed, "documents")
    cycles = {"country": _Cycle(world.countries, rng), "person": _Cycle(world.people, rng),
              "animal": _Cycle(world.animals, rng), "fact": _Cycle(world.facts, rng),
              "word": _Cycle(world.words, rng), "add": _Cycle(range(1, 13), rng), "mul": _Cycle(range(2, 10), rng)}
    kinds, weights = zip(*_DOC_KINDS)
    for _ in range(num_docs):
        make = rng.choices(kinds, weights)[0]
        yield make(world, rng, cycles)
