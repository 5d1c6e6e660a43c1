"""HumanEval: 164 Python functions to complete, judged by running their unit tests in the sandbox.

The user turn is the function's signature and docstring; the reference answer is prompt + "\n" +
canonical solution. A completion is judged as karpathy/nanochat's tasks/humaneval.py judges it: the
code of its first closed ```python (or ```) block, else the whole completion, stripped; the program is
the prompt's leading import lines, the code, the task's `check` tests and `check(<entry_point>)`. Only
the imports are prepended: a completion that leaves out a helper function the prompt defines fails, and
an unclosed ``` block is run as it stands (so it fails). It passes when the program exits cleanly
within 5 s and 256 MB (the reference's limits), run by nanochat.sandbox.run_code.

Offline it reads `humaneval/HumanEval.jsonl.gz`; online HuggingFace `openai/openai_humaneval`.
"""
from __future__ import annotations

import gzip
import json
import re

from nanochat.tasks.common import Task, find_local, load_hf

FENCE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)
TIMEOUT_S, MEMORY_MB = 5.0, 256


def extract_imports(prompt: str) -> str:
    """The prompt's import lines, up to its first line of other code (blank lines and comments skipped)."""
    imports = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_code(completion: str) -> str:
    m = FENCE_RE.search(completion)
    return (m.group(1) if m else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    return (extract_imports(conversation["messages"][0]["content"]) + "\n\n" + extract_code(completion) + "\n\n"
            + conversation["test"] + "\n" + f"check({conversation['entry_point']})")


class HumanEval(Task):
    eval_type = "generative"
    shuffled = True

    def __init__(self, split: str = "test", path=None, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
                 **kwargs):
        super().__init__(**kwargs)
        if split != "test":
            raise ValueError(f"HumanEval split {split!r}: only 'test' exists")
        self.timeout, self.memory_mb = timeout, memory_mb
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
                             {"role": "assistant", "content": r["prompt"] + "\n" + r["canonical_solution"]}],
                "task": "HumanEval", "task_id": r["task_id"], "entry_point": r["entry_point"],
                "prompt": r["prompt"], "test": r["test"]}

    def evaluate(self, conversation, completion):
        from nanochat.sandbox import run_code
        return run_code(build_program(conversation, completion), timeout=self.timeout, memory_mb=self.memory_mb).ok
