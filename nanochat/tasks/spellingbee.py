"""SpellingBee and SimpleSpelling: the tasks of karpathy/nanochat's October-2025 tasks/spellingbee.py
(the version the seed's report card was made with), item for item.

SpellingBee: "How many r are in strawberry?". Item i of a split draws everything from
`random.Random(i)` (train) or `random.Random(-(i + 1))` (test), in this order: the word (from the
word list), the letter (one of the word's letters with probability 0.9, else any of a-z), the question
template (51, in seven languages; lower-cased with probability 0.3), the quotes around the letter and
around the word ('', ' or "), and a trailing "?" (probability 0.5). The answer spells the word out as
`word:w,o,r,d`, counts letter by letter (`3:r hit! count=1`), double-checks with the calculator
(`'strawberry'.count('r')`) and ends with `#### 3`. Judged like GSM8K: the first `#### <number>`.
The eval is the test split, 256 items.

SimpleSpelling (training only): "Spell the word: apple" -> "apple:a,p,p,l,e", its word list shuffled
with Random(42) first so it draws other words than SpellingBee.

Words: dwyl's words_alpha (370,105 words; `english_words/words_alpha.zip` or a .txt, one word a line).
Without it a small built-in list is used so the task still works offline; those items are not the
reference's, and `source` says so.
"""
from __future__ import annotations

import io
import random
import zipfile

from nanochat.tasks.common import Task, find_local
from nanochat.tasks.gsm8k import extract_answer, final_text

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "test")
EVAL_SIZE = 256  # the seed's chat_eval scores the first 256 test items
DEFAULT_WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon mango papaya pineapple coconut avocado
tomato potato carrot cabbage broccoli pepper onion garlic ginger cucumber pumpkin spinach lettuce
mississippi tennessee massachusetts connecticut california colorado alabama pennsylvania minnesota
elephant giraffe hippopotamus kangaroo crocodile alligator butterfly caterpillar dragonfly mosquito
penguin parrot peacock flamingo ostrich dolphin octopus jellyfish squirrel raccoon hedgehog porcupine
bookkeeper committee balloon coffee toffee address success possess accommodate embarrass millennium
necessary occasion occurrence parallel recommend referred separate tomorrow vacuum weird rhythm
""".split()

TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}",
    "How many times is {letter} in {word}", "Number of {letter} in {word}",
    "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}",
    "{word} has how many {letter}", "In {word}, count the {letter}",
    "How many {letter} appear in {word}", "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}", "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}", "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}", "¿Cuántas letras {letter} tiene {word}?",
    # Chinese
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}", "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}", "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
]
_words_cache: dict[str, list[str]] = {}


def load_words(path=None) -> tuple[list[str], str]:
    """(the word list in file order, where it came from)."""
    src = find_local("english_words/words_alpha.zip", path)
    if src is None:
        return list(DEFAULT_WORDS), "built-in word list (words_alpha not found: not the reference's items)"
    key = str(src)
    if key not in _words_cache:
        if src.suffix == ".zip":
            with zipfile.ZipFile(src) as z:
                name = next(n for n in z.namelist() if n.endswith(".txt"))
                lines = list(io.TextIOWrapper(z.open(name), encoding="utf-8"))
        else:
            with open(src, encoding="utf-8") as f:
                lines = list(f)
        _words_cache[key] = [w.strip() for w in lines]
    return _words_cache[key], str(src)


class _WordTask(Task):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", words_path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__} split {split!r}: use one of {', '.join(SPLITS)}")
        self.size, self.split = size, split
        self.words, self.source = load_words(words_path)

    def num_examples(self):
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else -(index + 1))  # test: no collision at 0


class SpellingBee(_WordTask):
    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            question += "?"
        lines, running = [], 0
        for i, ch in enumerate(word, 1):  # no space between i and the letter: " a" and "a" are other tokens
            running += ch == letter
            lines.append(f"{i}:{ch} hit! count={running}" if ch == letter else f"{i}:{ch}")
        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
                  f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of "
                  f"'{letter}':\n" + "".join(line + "\n" for line in lines) + f"\nThis gives us {running}.")
        parts = [{"type": "text", "text": manual},
                 {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "task": "SpellingBee", "word": word, "letter": letter, "count": count}

    def evaluate(self, conversation, completion):
        return extract_answer(completion) == extract_answer(final_text(conversation["messages"][-1]["content"]))


class SimpleSpelling(_WordTask):
    """Training only: spell a word, so the model learns which letters its tokens stand for."""

    def __init__(self, size: int = 1000, split: str = "train", words_path=None, **kwargs):
        super().__init__(size, split, words_path, **kwargs)
        self.words = list(self.words)
        random.Random(42).shuffle(self.words)  # other words than SpellingBee's

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}], "task": "SimpleSpelling"}

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]
