"""ARC (AI2 Reasoning Challenge): grade-school science questions, 3-5 choices, answered with a letter.

Offline it reads the test sets from the CORE bundle's jsonl (`core_icl/local_data/world_knowledge/
arc_{easy,challenge}.jsonl`: {"query": "Question: ...", "choices": [...], "gold": i}); online, and for
the train/validation splits, HuggingFace `allenai/ai2_arc`.
"""
from __future__ import annotations

import json

from nanochat.tasks.common import Task, TaskDataError, evaluate_letter, find_local, load_hf, mc_conversation

SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"
    shuffled = True

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset {subset!r}: use one of {', '.join(SUBSETS)}")
        if split not in SPLITS:
            raise ValueError(f"ARC split {split!r}: use one of {', '.join(SPLITS)}")
        self.subset, self.split = subset, split
        rel = f"core_icl/local_data/world_knowledge/{SUBSETS[subset]}.jsonl"
        local = find_local(rel, path) if split == "test" or path is not None else None
        if local is not None:
            with open(local, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.rows = [(r["query"].removeprefix("Question:").strip(), r["choices"], r["gold"]) for r in rows]
        else:
            ds = load_hf("allenai/ai2_arc", f"ARC {subset} {split}",
                         f"put the CORE bundle's {rel} under $NANOCHAT_DATA_DIR (test split only) or go online",
                         subset, split=split)
            self.rows = []
            for r in ds:
                labels = list(r["choices"]["label"])
                if r["answerKey"] not in labels:
                    raise TaskDataError(f"ARC {subset} {split}: answer {r['answerKey']!r} not among {labels}")
                self.rows.append((r["question"], list(r["choices"]["text"]), labels.index(r["answerKey"])))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, choices, gold = self.rows[index]
        return mc_conversation(question, choices, gold, task=self.subset)

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)
