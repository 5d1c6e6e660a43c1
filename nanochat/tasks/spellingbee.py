"""SpellingBee: "How many r are in strawberry?" — counting letters, which tokens hide from a model.

Each example draws a word and a letter (usually one that occurs in the word) from a seeded stream, so
example i of a split is the same everywhere and any size is free. The reference answer spells the
word out, counts as it goes, double-checks with the calculator tool (`'strawberry'.count('r')`) and
ends GSM8K-style with `#### 3`; it is judged on that final number.

SimpleSpelling (training only) just spells a word letter by letter.

Words come from `english_words/words_alpha.zip` (or a .txt, one word a line) when found, else from a
small built-in list, so the task always works offline.
"""
from __future__ import annotations

import io
import random
import string
import zipfile
from pathlib import Path

from nanochat.tasks.common import Task, find_local
from nanochat.tasks.gsm8k import extract_answer, same_number

DEFAULT_WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon mango papaya pineapple coconut avocado
tomato potato carrot cabbage broccoli pepper onion garlic ginger cucumber pumpkin spinach lettuce
mississippi tennessee massachusetts connecticut california colorado alabama pennsylvania minnesota
elephant giraffe hippopotamus kangaroo crocodile alligator butterfly caterpillar dragonfly mosquito
penguin parrot peacock flamingo ostrich dolphin octopus jellyfish squirrel raccoon hedgehog porcupine
bookkeeper committee balloon coffee toffee address success possess accommodate embarrass millennium
necessary occasion occurrence parallel recommend referred separate tomorrow vacuum weird rhythm
banana pajamas assessment bassoon giggle puzzle pizzazz razzmatazz bubble hubbub knickknack
programming computer keyboard monitor network algorithm variable function iterator recursion
language grammar sentence paragraph dictionary encyclopedia vocabulary alphabet syllable consonant
mountain valley river ocean island desert forest jungle glacier volcano canyon waterfall meadow
summer autumn winter spring january february september november december wednesday saturday
chocolate caramel marshmallow lollipop cinnamon vanilla peppermint butterscotch licorice
teacher student library classroom homework notebook pencil scissors calculator microscope
happiness friendship kindness courage patience excellence independence responsibility
""".split()
QUESTIONS = ["How many {l} are in the word {w}?", "How many times does the letter {l} appear in {w}?",
             "Count the letter {l} in {w}.", "How many {l}s are there in {w}?", "In '{w}', how many '{l}' are there?"]
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
_words_cache: dict[str, list[str]] = {}


def load_words(path=None) -> list[str]:
    src = find_local("english_words/words_alpha.zip", path)
    if src is None:
        return sorted(set(DEFAULT_WORDS))
    key = str(src)
    if key not in _words_cache:
        if src.suffix == ".zip":
            with zipfile.ZipFile(src) as z:
                name = next(n for n in z.namelist() if n.endswith(".txt"))
                text = io.TextIOWrapper(z.open(name), encoding="utf-8").read()
        else:
            text = Path(src).read_text(encoding="utf-8")
        _words_cache[key] = [w.strip().lower() for w in text.splitlines() if w.strip().isalpha()]
    return _words_cache[key]


class _WordTask(Task):
    def __init__(self, size: int | None = None, split: str = "test", words_path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLIT_SEEDS:
            raise ValueError(f"{type(self).__name__} split {split!r}: use one of {', '.join(SPLIT_SEEDS)}")
        self.size = (10_000 if split == "train" else 500) if size is None else size
        self.split, self.words = split, load_words(words_path)

    def num_examples(self):
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{type(self).__name__}-{SPLIT_SEEDS[self.split]}-{index}")


class SpellingBee(_WordTask):
    eval_type = "generative"

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        running, steps = 0, []
        for ch in word:  # count out loud, one letter at a time
            running += ch == letter
            steps.append(f"{ch}{' <- ' + str(running) if ch == letter else ''}")
        parts = [{"type": "text", "text": f"Spelling out {word}, counting each {letter}:\n" + "\n".join(steps) +
                  f"\nThat makes {count}. Checking with Python: "},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\nThere {'is' if count == 1 else 'are'} {count} '{letter}' in {word}.\n#### {count}"}]
        question = rng.choice(QUESTIONS).format(l=letter, w=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "task": "SpellingBee", "word": word, "letter": letter, "count": count}

    def evaluate(self, conversation, completion):
        return same_number(extract_answer(completion), str(conversation["count"]))


class SimpleSpelling(_WordTask):
    """Training only: spell a word, so the model learns which letters its tokens stand for."""
    eval_type = "generative"

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        question = rng.choice(["Spell the word {w}.", "How do you spell {w}?", "Spell {w} letter by letter."]).format(w=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": f"{word}: {','.join(word)}"}], "task": "SimpleSpelling"}

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]
