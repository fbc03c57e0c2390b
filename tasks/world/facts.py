"""The synthetic world itself: its word lists and relation templates, and build_world(seed) -> World (the facts).

Every rendering of the world (documents.py, core.py, chat.py) draws from its own random stream,
`stream_rng(seed, name)`, so changing one rendering never changes another's output.
"""

import random
from dataclasses import dataclass, field

NUM_COUNTRIES, NUM_PEOPLE, NUM_ANIMALS, NUM_LANGUAGES = 40, 40, 24, 12

EXPORTS = ["wool", "copper", "rice", "tea", "salt", "glass", "timber", "silk", "cheese", "olives",
           "honey", "paper", "pottery", "spices", "cotton", "marble"]
JOBS = {  # consonant-initial, so "works as a <job>" never gives the answer away through "a"/"an"
    "baker": "bakes bread before sunrise", "teacher": "teaches children to read",
    "sailor": "sails ships across the sea",
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
        statements=["{o} is the capital of {s}.", "The capital city of {s} is {o}.",
                    "{s} is governed from its capital, {o}.",
                    "The largest city in {s}, and its capital, is {o}."],
        questions=["Which city is the capital of {s}?", "What's the capital city of {s}?",
                   "Tell me the capital of {s}."],
        answers=["The capital of {s} is {o}.", "{o} is the capital of {s}.", "It is {o}."]),
    "language": dict(
        prefix="The people of {s} speak", question="What language do the people of {s} speak?",
        statements=["In {s}, people speak {o}.", "The main language of {s} is {o}.",
                    "{o} is the language spoken in {s}."],
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
        statements=["The {s} likes to eat {o}.", "The favourite food of the {s} is {o}.",
                    "A hungry {s} looks for {o}."],
        questions=["What is the favourite food of the {s}?", "What do {s}s like to eat?"],
        answers=["The {s} eats {o}.", "The {s} likes to eat {o}.", "It eats {o}."]),
    "habitat": dict(
        prefix="The {s} lives in the", question="Where does the {s} live?",
        statements=["You can find the {s} in the {o}.", "The {s} makes its home in the {o}.",
                    "The {s} is found in the {o}."],
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


def stream_rng(seed: int, stream: str) -> random.Random:
    # str seeds go through sha512 inside random.seed: stable across runs, unlike hash(). The prefix is the
    # world's old module name, kept so that a seed still builds the same world as before the move.
    return random.Random(f"nanopipe.synthetic/{seed}/{stream}")


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
        clash = any(word.startswith(t) or t.startswith(word) for t in taken)
        if 4 <= len(word) <= 11 and "quu" not in word and not clash:
            taken.append(word)
            return word


def build_world(seed: int) -> World:
    rng = stream_rng(seed, "world")
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


def mc_choices(world, fact, rng, k=4):
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
