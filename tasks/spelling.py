"""
Spelling tasks (nanochat's SimpleSpelling and SpellingBee) over a word list.

A tokenizer hides letters inside tokens, so a small model cannot see how a word is spelled. SimpleSpelling
teaches it to spell words out (`apple:a,p,p,l,e`); SpellingBee asks how often a letter occurs and answers by
spelling the word, then counting with the calculator tool (`' apple'.count('p')`), ending GSM8K-style with
`#### 2`. SpellingBee is generative: a completion passes if its last number is the count.

The counting reply writes the word as a question usually does, after a space, inside the call's quotes too:
a BPE tokenizer cuts `' apple'` into the same tokens as ` apple` in "how many p in apple", but `'apple'` into
others (at vocab 2048: ` st|rawberry` against `'s|t|rawberry`), and a small model copying a word into the
call then has to re-spell it in other tokens, which it gets wrong (it wrote 'star' for 'strawberry'). The
space changes no letter count.

Words come from a one-word-per-line file (nanochat uses dwyl's words_alpha.txt), by default
<base>/chat_data/words/words_alpha.txt, or from a list passed in. Examples are drawn with a per-index
RNG, so any index (and any slice) is reproducible on its own; the test split uses other seeds than train.
"""

import random

from nanopipe.common import UserError, read_text_file
from nanopipe.calculator import calculate
from tasks.common import Task, chat_file, last_number, same_number

SPELL_PROMPTS = ["Spell the word: {word}", "How do you spell {word}?", "Spell {word} letter by letter."]
COUNT_PROMPTS = [
    "How many times does the letter '{letter}' appear in the word '{word}'?",
    "How many {letter}'s are in {word}?",
    "Count the letter {letter} in '{word}'.",
    "In the word {word}, how many times does {letter} occur?",
    "how many {letter} in {word}",
]
SPLIT_SEED_OFFSET = {"train": 0, "test": 10_000_000}


def spell(word: str) -> str:
    return ",".join(word)


def simple_spelling_conversation(word: str, rng: random.Random) -> dict:
    prompt = rng.choice(SPELL_PROMPTS).format(word=word)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": f"{word}:{spell(word)}"}]}


def spelling_bee_conversation(word: str, letter: str, rng: random.Random, prompts=COUNT_PROMPTS,
                              answer_line: bool = True) -> dict:
    """Count `letter` in `word`: spell it out, call the tool, answer in a sentence and (`answer_line`, nanochat's
    format) `#### n`. The question is one of `prompts`. Carries `answer` (int). The sentences are the ones the
    synthetic world's spelling practice pretrains on ("The word apple is spelled a,p,p,l,e.")."""
    expr = f"' {word}'.count('{letter}')"  # the space: see the module docstring
    count = calculate(expr)  # exactly what the engine will inject at inference time
    times = "time" if count == "1" else "times"
    reply = [
        {"type": "text", "text": f"The word {word} is spelled {spell(word)}.\n"
                                 f"I count the letter {letter} with Python.\n\n"},
        {"type": "python", "text": expr},
        {"type": "python_output", "text": count},
        {"type": "text", "text": f"\n\nThe letter {letter} appears {count} {times} in {word}."
                                 + (f"\n\n#### {count}" if answer_line else "")},
    ]
    prompt = rng.choice(prompts).format(word=word, letter=letter)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "answer": int(count)}


def pick_letter(word: str, rng: random.Random) -> str:
    """Mostly a letter of the word (the interesting case), sometimes any letter (answer often 0)."""
    return rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")


def load_words(path=None) -> list[str]:
    path = chat_file(path, "words", "words_alpha.txt")
    words = [w.strip().lower() for w in read_text_file(path).splitlines()]
    # only plain a-z words of a sensible length: they fit the calculator's .count() literal rules
    words = [w for w in words if 3 <= len(w) <= 16 and w.isascii() and w.isalpha()]
    if not words:
        raise UserError(f"{path} has no word of 3-16 letters a-z (one per line): download it again with "
                        "`python -m scripts.dataset chat-data --only words`")
    return words


class _WordTask(Task):
    default_size: int  # examples when the caller gives no size

    def __init__(self, size: int | None = None, split: str = "train", words=None, words_path=None):
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"split must be one of {list(SPLIT_SEED_OFFSET)}, got {split!r}")
        self.size = self.default_size if size is None else size
        self.seed_offset = SPLIT_SEED_OFFSET[split]
        self.words = list(words) if words is not None else load_words(words_path)

    def num_examples(self):
        return self.size

    def validate(self):
        pass  # examples are generated from the word list, which load_words checked

    def _rng(self, index):
        return random.Random(self.seed_offset + index)


class SimpleSpelling(_WordTask):
    name = "SimpleSpelling"
    default_size = 1000

    def get_example(self, index):
        rng = self._rng(index)
        return simple_spelling_conversation(rng.choice(self.words), rng)


class SpellingBee(_WordTask):
    name = "SpellingBee"
    default_size = 256

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        return spelling_bee_conversation(word, pick_letter(word, rng), rng)

    def evaluate(self, conversation, completion):
        return same_number(last_number(completion), conversation["answer"])
