"""GSM8K: grade-school math word problems with worked solutions and a final `#### <number>` line.

The solutions mark calculator use as `<<48/2=24>>`. For training these become tool calls: the
expression a python part, its result a python_output part, so the model learns to call the calculator
that the Engine runs at inference.

Judged as the reference (karpathy/nanochat tasks/gsm8k.py, after OpenAI's grade-school-math): the
first `#### <number>` (exactly one space after the marker; the number is digits, '.', ',' with an
optional '-') of the completion, commas removed, must equal the gold answer's as a string. So
`#### 1,234` == "1234", but `####18`, `#### $18`, `#### 18.0` and `#### 18.` against "18" do not pass.

Offline it reads `gsm8k/{train,test}.jsonl` ({"question", "answer"}); online HuggingFace `openai/gsm8k`.
"""
from __future__ import annotations

import json
import re

from nanochat.tasks.common import Task, find_local, load_hf

ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
CALL_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
SPLITS = ("train", "test")


def extract_answer(text: str) -> str | None:
    """The number after the first '#### ', commas removed; None if there is none."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


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
    shuffled = True

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
        gold = extract_answer(final_text(conversation["messages"][-1]["content"]))
        return extract_answer(completion) == gold


def final_text(content) -> str:
    """The last text of an assistant message (a string, or the last part): where the gold `####` is."""
    return content if isinstance(content, str) else content[-1]["text"]
