"""Alpaca-format instruction data as single-turn chats: an offline SFT source when the file is present.

Records are `{"instruction", "input", "output"}` in a JSON array (alpaca_5000.json) or JSONL. The user
turn is the instruction, followed by the input when there is one; the assistant turn is the output.
Every 20th record is held out as the validation split.
"""
from __future__ import annotations

import json

from nanochat.tasks.common import Task, TaskDataError, find_local
from nanochat.tasks.customjson import last_reply

REL_PATH = "alpaca/alpaca_5000.json"
VAL_EVERY = 20


def read_records(path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON array or JSONL of alpaca records ({e.msg})") from None
    for n, r in enumerate(records):
        if not isinstance(r, dict) or not {"instruction", "output"} <= r.keys():
            raise ValueError(f"{path}: record {n} lacks 'instruction' and 'output'")
    return records


class Alpaca(Task):
    def __init__(self, path=None, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"Alpaca split {split!r}: use train or val")
        found = find_local(REL_PATH, path)
        if found is None:
            raise TaskDataError(f"Alpaca: {REL_PATH} not found; put alpaca_5000.json (a JSON array of instruction/"
                                f"input/output records) into $NANOCHAT_DATA_DIR/alpaca/ or give alpaca:/path/to/file")
        records = read_records(found)
        self.records = [r for n, r in enumerate(records) if (n % VAL_EVERY == VAL_EVERY - 1) == (split == "val")]

    def num_examples(self) -> int:
        return len(self.records)

    def get_example(self, index: int) -> dict:
        r = self.records[index]
        user = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r.get("input", "").strip() else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"].strip()}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == last_reply(conversation).strip()
