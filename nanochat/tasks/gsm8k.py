"""GSM8K: grade-school math word problems with worked solutions and a final `#### <number>` line.

The solutions mark calculator use as `<<48/2=24>>`. For training these become tool calls: the
expression a python part, its result a python_output part, so the model learns to call the calculator
that the Engine runs at inference. Judged on the number after the last `####` only.

Offline it reads `gsm8k/{train,test}.jsonl` ({"question", "answer"}); online HuggingFace `openai/gsm8k`.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation

from nanochat.tasks.common import Task, find_local, load_hf

ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
CALL_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
SPLITS = ("train", "test")


def extract_answer(text: str) -> str | None:
    """The number after the last '####', thousands separators removed; None if there is none."""
    found = ANSWER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(a: str | None, b: str | None) -> bool:
    """'18' == '18.0' == '18.00'; None never matches."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def solution_parts(answer: str) -> list[dict]:
    """'... = <<16-3-4=9>>9 eggs ... #### 18' -> text / python / python_output parts (joined back by
    `text + "<<" + python + "=" + output + ">>"` they give the original string exactly)."""
    parts, pos = [], 0
    for m in CALL_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def parts_text(parts) -> str:
    """Parts joined back into GSM8K's original answer text (tool calls as <<expr=result>>)."""
    if isinstance(parts, str):
        return parts
    out = []
    for p in parts:
        if p["type"] == "python":
            out.append("<<" + p["text"] + "=")
        elif p["type"] == "python_output":
            out.append(p["text"] + ">>")
        else:
            out.append(p["text"])
    return "".join(out)


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"GSM8K split {split!r}: use one of {', '.join(SPLITS)}")
        self.split = split
        local = find_local(f"gsm8k/{split}.jsonl", path)
        if local is not None:
            with open(local, encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        else:
            self.rows = list(load_hf("openai/gsm8k", f"GSM8K {split}",
                                     f"put {split}.jsonl in $NANOCHAT_DATA_DIR/gsm8k/ or go online", subset, split=split))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": solution_parts(r["answer"])}], "task": "GSM8K"}

    def evaluate(self, conversation, completion):
        gold = extract_answer(parts_text(conversation["messages"][-1]["content"]))
        return same_number(extract_answer(completion), gold)
