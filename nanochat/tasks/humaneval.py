"""HumanEval: 164 Python functions to complete, judged by running their unit tests in the sandbox.

The user turn is the function's signature and docstring; the reference answer is the whole function.
A completion is judged by the code in its first ```python block (or the whole text when there is no
block), placed after the prompt (see build_program), then the task's `check(candidate)` tests and
`check(<entry_point>)`; it passes when that program exits cleanly within the time limit.

Offline it reads `humaneval/HumanEval.jsonl.gz`; online HuggingFace `openai/openai_humaneval`.
"""
from __future__ import annotations

import gzip
import json
import re

from nanochat.tasks.common import Task, find_local, load_hf

FENCE_RE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    m = FENCE_RE.search(completion)
    return m.group(1) if m else completion


def build_program(row: dict, completion: str) -> str:
    """The prompt first (its imports and helper functions), then the completion: a bare body continues
    the prompt's signature, a whole function redefines the docstring-only stub."""
    code = extract_code(completion)
    defines = re.search(rf"^\s*def\s+{re.escape(row['entry_point'])}\s*\(", code, re.MULTILINE)
    program = row["prompt"] + ("\n\n" + code if defines else code)
    return f"{program}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, split: str = "test", path=None, timeout: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if split != "test":
            raise ValueError(f"HumanEval split {split!r}: only 'test' exists")
        self.timeout = timeout
        local = find_local("humaneval/HumanEval.jsonl.gz", path)
        if local is not None:
            opener = gzip.open if str(local).endswith(".gz") else open
            with opener(local, "rt", encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        else:
            self.rows = list(load_hf("openai/openai_humaneval", "HumanEval",
                                     "put HumanEval.jsonl.gz in $NANOCHAT_DATA_DIR/humaneval/ or go online", split="test"))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["prompt"]},
                             {"role": "assistant", "content": r["prompt"] + r["canonical_solution"]}],
                "task": "HumanEval", "task_id": r["task_id"], "entry_point": r["entry_point"],
                "prompt": r["prompt"], "test": r["test"]}

    def evaluate(self, conversation, completion):
        from nanochat.sandbox import run_code
        return run_code(build_program(conversation, completion), timeout=self.timeout).ok
