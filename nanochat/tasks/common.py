"""The task protocol shared by the evals and the training mixtures.

A task is an indexable list of conversations plus a judge:

    task = GSM8K(split="test")                # loads (or fails with one line naming the missing source)
    len(task); task[i] -> {"messages": [...], ...}; task[10:20] -> a view of examples 10..19
    task.eval_type                            # "categorical" (pick a letter) or "generative" (sample text)
    task.evaluate(conversation, completion)   # -> bool, is the completion right
    task.reward(conversation, completion)     # -> float, for RL (default: 1.0 if right else 0.0)

`Task(start, stop, step)` and slicing select examples start, start+step, ... < stop of the source.
Subclasses define `num_examples()` and `get_example(index)` over the whole source.

Categorical conversations carry `letters` (the answer letters, e.g. "ABCD"): the scorer compares the
logits of exactly those tokens after <|assistant_start|>, and the assistant message is the gold letter.

Where local data is looked for, in order: the task's `path=` argument, $NANOCHAT_DATA_DIR,
<base>/data, and ../shared/data next to the repository (the development checkout). Online, the
HuggingFace datasets are used when no local copy exists.
"""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

from nanochat.common import get_base_dir

LETTERS = "ABCDEFGHIJ"


class TaskDataError(FileNotFoundError):
    """A source that is neither on disk nor reachable; the one-line message says how to provide it."""


class Task:
    eval_type = "generative"
    shuffled = False  # True where karpathy/nanochat reads the task HF-shuffled (seed 42): see chat_eval.problem_order

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if step < 1:
            raise ValueError(f"task step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    # --- what a subclass defines
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    # --- indexing over the selected examples
    def _range(self) -> range:
        return range(self.num_examples())[self.start:self.stop:self.step]

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, i):
        r = self._range()
        if isinstance(i, slice):  # a view sharing the loaded data
            sub = r[i]
            view = copy.copy(self)
            view.start, view.stop, view.step = sub.start, sub.stop, sub.step
            return view
        return self.get_example(r[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def render_mc(question: str, choices: list[str], letters: str = LETTERS) -> str:
    """The user turn of a multiple-choice question (the format the demo chat data teaches too)."""
    lines = "\n".join(f"- {c}={letter}" for letter, c in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\n\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, choices: list[str], gold: int, **extra) -> dict:
    letters = LETTERS[:len(choices)]
    return {"messages": [{"role": "user", "content": render_mc(question, choices, letters)},
                         {"role": "assistant", "content": letters[gold]}], "letters": letters, **extra}


def evaluate_letter(conversation: dict, completion: str) -> bool:
    return completion.strip() == conversation["messages"][-1]["content"]


# ----------------------------------------------------------------------------- finding the data

def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("NANOCHAT_DATA_DIR"):
        roots.append(Path(os.environ["NANOCHAT_DATA_DIR"]).expanduser())
    roots.append(get_base_dir() / "data")
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return roots


def find_local(rel: str, path: str | os.PathLike | None = None) -> Path | None:
    """`path` if given (it must exist), else the first data root holding `rel`."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise TaskDataError(f"{p} does not exist")
        return p
    return next((r / rel for r in data_roots() if (r / rel).exists()), None)


_online: bool | None = None


def hf_online(timeout: float = 3.0) -> bool:
    """Can huggingface.co be reached? Checked once per process; HF_HUB_OFFLINE=1 forces no."""
    global _online
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("NANOCHAT_OFFLINE") == "1":
        return False
    if _online is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _online = True
        except OSError:
            _online = False
    return _online


def load_hf(name: str, what: str, hint: str, *args, **kwargs):
    """datasets.load_dataset(name, *args, **kwargs) when online, else a TaskDataError naming the source."""
    if not hf_online():
        raise TaskDataError(f"{what}: no local copy and HuggingFace ({name}) is unreachable; {hint}")
    from datasets import load_dataset
    return load_dataset(name, *args, **kwargs)
