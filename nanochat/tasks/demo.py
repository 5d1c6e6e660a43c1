"""Made-up chat data for the demo profile: fully offline, generated from a seed, nothing to download.

It teaches what the chat stages are for, at a scale a 2-layer model on 2 CPU cores can pick up:
- the special tokens of a conversation (user/assistant turns, where an answer ends)
- tool use: arithmetic answered with a calculator call (`<|python_start|>7 * 12<|python_end|>`), the
  tool's output copied into the answer, and a GSM8K-style final line `#### 84`
- multiple choice answered with one letter, spelling, identity (the shipped identity file), and questions about the made-up world
  of the demo pretraining corpus (nanochat/demo_corpus.py), whose facts the base model has read

Example i of a split is generated from (split, i) alone, so any slice is reproducible and cheap.
"""
from __future__ import annotations

import random
import re

from nanochat.demo_corpus import COLORS, FOODS, TOWNS, make_world, questions
from nanochat.tasks.common import Task, mc_conversation
from nanochat.tasks.identity import Identity

ANSWER_RE = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 1}
DEFAULT_SIZES = {"train": 4000, "val": 200, "test": 200}


def extract_answer(text: str) -> str | None:
    """The number after the last '####', without thousands separators."""
    found = ANSWER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def conv(user: str, assistant) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def math_example(rng: random.Random) -> dict:
    """A sum, difference or product, worked with the calculator tool, GSM8K-style final line."""
    x, y = rng.randint(2, 99), rng.randint(2, 99)
    op, word = rng.choice([("+", "plus"), ("-", "minus"), ("*", "times")])
    if op == "*":
        y = rng.randint(2, 12)
    if op == "-" and y > x:
        x, y = y, x
    result = eval(f"{x} {op} {y}")  # noqa: S307 - two ints we just drew
    question = rng.choice([f"What is {x} {word} {y}?", f"Compute {x} {op} {y}.", f"How much is {x} {word} {y}?"])
    parts = [{"type": "text", "text": "Let me use the calculator. "},
             {"type": "python", "text": f"{x} {op} {y}"},
             {"type": "python_output", "text": str(result)},
             {"type": "text", "text": f"{x} {word} {y} is {result}.\n#### {result}"}]
    return conv(question, parts)


def spelling_example(rng: random.Random, world) -> dict:
    word = rng.choice([e["name"].lower() for e in world] + COLORS + FOODS + [t.lower() for t in TOWNS])
    question = rng.choice([f"How do you spell {word}?", f"Spell the word {word}.", f"Spell {word} letter by letter."])
    return conv(question, f"{word} is spelled: {'-'.join(word)}")


def world_example(rng: random.Random, world) -> dict:
    """One of the corpus's own Q/A pairs about the world, as a chat turn: the base model read the facts."""
    q, ans = questions(rng, world).split("\n\n")[0].removeprefix("Q: ").split("\nA: ")
    return conv(q, ans)


def choice_example(rng: random.Random, world) -> dict:
    """Multiple choice in the chat format the evals use: options listed, answer is one letter."""
    e = rng.choice(world)
    field, options = rng.choice([("town", TOWNS), ("color", COLORS), ("food", FOODS)])
    wrong = rng.sample([o for o in options if o != e[field]], 3)
    choices = wrong + [e[field]]
    rng.shuffle(choices)
    question = {"town": f"Where does {e['name']} live?", "color": f"What color does {e['name']} like?",
                "food": f"What does {e['name']} like to eat?"}[field]
    return mc_conversation(question, choices, choices.index(e[field]))


class DemoChat(Task):
    """A mix of all demo conversation kinds (arithmetic with tool calls weighted up: it is the RL task)."""
    KINDS = [("math", 3), ("world", 3), ("choice", 2), ("spelling", 1), ("identity", 1)]

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLIT_SEEDS:
            raise ValueError(f"demo split {split!r}: use one of {', '.join(SPLIT_SEEDS)}")
        self.split, self.size = split, DEFAULT_SIZES[split] if size is None else size
        self.world = make_world(random.Random(seed))  # the demo corpus's world (same seed)
        self.identity = Identity() if any(k == "identity" for k, _ in self.KINDS) else None
        self.seed = SPLIT_SEEDS[split]

    def num_examples(self) -> int:
        return self.size

    def get_example(self, i: int) -> dict:
        rng = random.Random(f"{type(self).__name__}-{self.seed}-{i}")  # str seeds hash the same in every process
        kind = rng.choices([k for k, _ in self.KINDS], [w for _, w in self.KINDS])[0]
        if kind == "math":
            return math_example(rng)
        if kind == "world":
            return world_example(rng, self.world)
        if kind == "choice":
            return choice_example(rng, self.world)
        if kind == "spelling":
            return spelling_example(rng, self.world)
        return self.identity[rng.randrange(len(self.identity))]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Math: the final answer; everything else: the reference reply, exactly (whitespace aside)."""
        ref = conversation["messages"][-1]["content"]
        if isinstance(ref, list):
            return extract_answer(completion) == extract_answer(ref[-1]["text"])
        return completion.strip() == ref.strip()


class DemoMath(DemoChat):
    """Only the arithmetic-with-calculator conversations: the demo's RL task (reward = answer correct)."""
    KINDS = [("math", 1)]
