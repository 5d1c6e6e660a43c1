"""Any local JSONL file of conversations, one per line, as a task.

A line is either `{"messages": [...]}` or the bare list of messages:

    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]

An optional system message comes first; then user and assistant alternate, ending with the assistant.
Assistant content may be a string or a list of parts ({"type": "text"|"python"|"python_output", "text"}).
Judging a model's reply (for quick evals) is an exact match with the last assistant message.
"""
from __future__ import annotations

import json
from pathlib import Path

from nanochat.tasks.common import Task, TaskDataError

PART_TYPES = ("text", "python", "python_output")


def check_conversation(conv, where: str) -> dict:
    """The conversation as {"messages": [...]}, or a ValueError naming `where` and what is wrong."""
    messages = conv.get("messages") if isinstance(conv, dict) else conv
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a list of messages or {{\"messages\": [...]}}")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or body != expected or len(body) % 2:
        raise ValueError(f"{where}: roles must be [system,] user, assistant, user, ..., assistant; got {roles}")
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and m["role"] == "assistant":
            for p in content:
                if not isinstance(p, dict) or p.get("type") not in PART_TYPES or not isinstance(p.get("text"), str):
                    raise ValueError(f"{where}: an assistant part must be {{\"type\": one of {PART_TYPES}, \"text\": str}}")
        elif not isinstance(content, str):
            raise ValueError(f"{where}: {m['role']} content must be a string")
    return conv if isinstance(conv, dict) else {"messages": messages}


def read_conversations(path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskDataError(f"conversations file {path} not found (a JSONL file, one conversation per line)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(check_conversation(conv, f"{path}:{n}"))
    if not out:
        raise TaskDataError(f"{path} holds no conversations")
    return out


def last_reply(conversation: dict) -> str:
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


class CustomJSON(Task):
    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path).expanduser()
        self.conversations = read_conversations(self.path)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == last_reply(conversation).strip()
