"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn conversations, the bulk of mid/SFT data.

Offline it reads `smoltalk/{train,test}.jsonl` (one `{"messages": [...]}` per line) from a data root
(nanochat/tasks/common.py); `python -m nanochat.tasks.smoltalk` writes those files while online.
Online with no local copy, it loads from HuggingFace directly.
"""
from __future__ import annotations

import argparse
import json

from nanochat.common import atomic_write, get_base_dir
from nanochat.tasks.common import Task, find_local, load_hf
from nanochat.tasks.customjson import check_conversation, last_reply, read_conversations

HF_NAME = "HuggingFaceTB/smol-smoltalk"
FETCH = "python -m nanochat.tasks.smoltalk"


class SmolTalk(Task):
    def __init__(self, split: str = "train", path=None, **kwargs):
        super().__init__(**kwargs)
        split = {"val": "test"}.get(split, split)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split {split!r}: use train or test")
        local = find_local(f"smoltalk/{split}.jsonl", path)
        if local is not None:
            self.conversations = read_conversations(local)
        else:
            ds = load_hf(HF_NAME, f"SmolTalk {split}", f"fetch it while online: {FETCH}", split=split)
            self.conversations = ds  # rows are {"messages": [...]}, read lazily

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]["messages"]}  # HF rows carry extra columns

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == last_reply(conversation).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=FETCH, description="download SmolTalk to local JSONL for offline use")
    ap.add_argument("--dir", default=str(get_base_dir() / "data" / "smoltalk"))
    args = ap.parse_args(argv)
    from datasets import load_dataset
    for split in ("train", "test"):
        ds = load_dataset(HF_NAME, split=split)
        lines = []
        for n, row in enumerate(ds):
            try:  # keep only well-formed conversations, so the offline reader never trips on one
                lines.append(json.dumps(check_conversation({"messages": row["messages"]}, f"{split}[{n}]"),
                                        ensure_ascii=False) + "\n")
            except ValueError:
                continue
        atomic_write(f"{args.dir}/{split}.jsonl", "".join(lines))
        print(f"wrote {len(lines)} conversations to {args.dir}/{split}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
