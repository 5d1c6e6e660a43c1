"""Task mixtures for mid-training, SFT and RL: many conversation sources seen as one indexable list.

A task is anything with `len(task)` and `task[i] -> conversation dict` (nanochat/tasks/common.py).

    TaskMixture([smoltalk, identity], weights=[1, 3], seed=42)   # identity seen 3x per epoch, shuffled
    TaskSequence([easy, hard])                                   # one after the other (a curriculum)
    mixture[100:200]                                             # a view of examples 100..199

The shuffle is a fixed permutation drawn from `seed`, so every rank and every resume agree on the order
without communicating; each epoch contains every example of a task exactly `weight` times.

`build_mixture("smoltalk|identity*2|customjson:my.jsonl", split="train")` builds a mixture from the
one-line spec the config uses: `|`-separated sources, each `name[:argument][*weight]`.
"""
from __future__ import annotations

import bisect
import importlib
import random


class TaskView:
    """examples start, start+step, ... < stop of an indexable task, itself indexable and sliceable."""

    def __init__(self, task, start: int = 0, stop: int | None = None, step: int = 1):
        self.task, self.range = task, range(len(task))[slice(start, stop, step)]

    def __len__(self):
        return len(self.range)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TaskView(self, *i.indices(len(self)))
        return self.task[self.range[i]]

    def task_of(self, i: int):
        return self.task.task_of(self.range[i]) if hasattr(self.task, "task_of") else self.task

    def __getattr__(self, name):  # eval_type, evaluate, reward, ... of the underlying task
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)


class TaskSequence:
    """Tasks one after another, in order."""

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.offsets = [0]
        for t in self.tasks:
            self.offsets.append(self.offsets[-1] + len(t))

    def __len__(self):
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (task number, index within that task)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        t = bisect.bisect_right(self.offsets, i) - 1
        return t, i - self.offsets[t]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TaskView(self, *i.indices(len(self)))
        t, j = self.locate(i)
        return self.tasks[t][j]

    def task_of(self, i: int):
        """The task example i comes from (its evaluate/reward judge that example)."""
        return self.tasks[self.locate(i)[0]]


class TaskMixture(TaskSequence):
    """Every example of task k appears weights[k] times per epoch, in an order shuffled once by `seed`."""

    def __init__(self, tasks, weights=None, seed: int = 42):
        tasks = list(tasks)
        weights = [1] * len(tasks) if weights is None else list(weights)
        if len(weights) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(weights)} weights")
        for w in weights:
            if not isinstance(w, int) or w < 0:
                raise ValueError(f"mixture weight {w!r} must be a whole number of repetitions >= 0")
        # repeat by listing the task `weight` times, then shuffle global indices: exact counts, no sampling noise
        super().__init__([t for t, w in zip(tasks, weights) for _ in range(w)])
        self.order = list(range(len(self)))
        random.Random(seed).shuffle(self.order)

    def locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        return super().locate(self.order[i])


# ----------------------------------------------------------------------------------------- sources

class SourceMissing(FileNotFoundError):
    """A data source whose files are not on disk; the message names it and how to get it (one line)."""


def _smoltalk(arg, split):
    from nanochat.tasks.smoltalk import SmolTalk
    return SmolTalk(split=split, stop=int(arg) if arg else None)  # smoltalk:10000 = the first 10k


def _identity(arg, split):
    from nanochat.tasks.identity import Identity
    return Identity(path=arg or None) if split == "train" else None


def _customjson(arg, split):
    from nanochat.tasks.customjson import CustomJSON
    if not arg:
        raise ValueError("customjson needs a file: customjson:/path/to/conversations.jsonl")
    return CustomJSON(arg) if split == "train" else None


def _alpaca(arg, split):
    from nanochat.tasks.alpaca import Alpaca
    return Alpaca(path=arg or None, split=split)


def _simple_spelling(arg, split):
    from nanochat.tasks.spellingbee import SimpleSpelling
    return SimpleSpelling(size=int(arg) if arg else 1000) if split == "train" else None  # as the reference: no val


def _spelling_bee(arg, split):
    from nanochat.tasks.spellingbee import SpellingBee
    return SpellingBee(size=int(arg) if arg else 1000) if split == "train" else None  # test = the eval's items


def _gsm8k(arg, split):
    from nanochat.tasks.gsm8k import GSM8K
    return GSM8K(split="train" if split == "train" else "test", stop=int(arg) if arg else None)


def _arc(subset):
    def build(arg, split):
        from nanochat.tasks.arc import ARC
        return ARC(subset=subset, split="train" if split == "train" else "test")
    return build


def _mmlu(arg, split):
    from nanochat.tasks.mmlu import MMLU
    return MMLU(subset="auxiliary_train", split="train") if split == "train" else MMLU(subset="all", split="test")


def _demo(arg, split):
    from nanochat.tasks.demo import DemoChat
    return DemoChat(split=split, size=int(arg) if arg else None)


def _demo_math(arg, split):
    from nanochat.tasks.demo import DemoMath
    return DemoMath(split=split, size=int(arg) if arg else None)


# name -> builder(argument or "", split) returning a task, or None when the source has no such split
SOURCES = {
    "smoltalk": _smoltalk, "identity": _identity, "customjson": _customjson, "alpaca": _alpaca,
    "simple_spelling": _simple_spelling, "spelling_bee": _spelling_bee, "gsm8k": _gsm8k,
    "mmlu": _mmlu, "arc_easy": _arc("ARC-Easy"), "arc_challenge": _arc("ARC-Challenge"),
    "demo": _demo, "demo_math": _demo_math,
}


def parse_spec(spec: str) -> list[tuple[str, str, int]]:
    """'smoltalk|identity*2|customjson:a.jsonl' -> [(name, argument, weight), ...]."""
    out = []
    for item in (s.strip() for s in spec.split("|")):
        if not item:
            continue
        weight = 1
        head, star, w = item.rpartition("*")
        if star and w.strip().isdigit():
            item, weight = head, int(w)
        name, _, arg = item.partition(":")
        name = name.strip()
        if name.lower().replace("-", "_") in SOURCES:
            name = name.lower().replace("-", "_")
        elif not arg.strip():  # not a known source, and not module:ClassName either
            import difflib
            close = difflib.get_close_matches(name, SOURCES, n=1)
            raise ValueError(f"unknown chat data source {name!r}"
                             + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(SOURCES)}")
                             + " (or module.path:ClassName)")
        out.append((name, arg.strip(), weight))
    if not out:
        raise ValueError(f"empty mixture spec {spec!r}; e.g. 'smoltalk|identity*2'")
    return out


def build_task(name: str, arg: str = "", split: str = "train"):
    """One source. Any other name is a module, its argument a class built as Class(split=...), so a
    task of your own plugs in without editing this file: 'mypkg.tasks:MyTask'."""
    if name in SOURCES:
        return SOURCES[name](arg, split)
    cls = getattr(importlib.import_module(name), arg)
    return cls(split=split)


def build_mixture(spec: str, split: str = "train", seed: int = 42, max_examples: int = -1):
    """A shuffled TaskMixture of the spec's sources (sources without this split are left out).
    Returns None when no source has the split (e.g. a validation mixture of identity data only)."""
    tasks, weights = [], []
    for name, arg, weight in parse_spec(spec):
        task = build_task(name, arg, split)
        if task is not None and len(task) and weight:
            tasks.append(task)
            weights.append(weight)
    if not tasks:
        return None
    mix = TaskMixture(tasks, weights, seed=seed)
    return mix[:max_examples] if 0 <= max_examples < len(mix) else mix
