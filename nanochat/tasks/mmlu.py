"""MMLU: 57 subjects of 4-choice exam questions, answered with a letter.

Offline it reads `mmlu/{test,dev}/<subject>_{test,dev}.csv` (header question,choice0..3,answer with an
integer answer); online, and for `auxiliary_train`, HuggingFace `cais/mmlu`.
"""
from __future__ import annotations

import csv

from nanochat.tasks.common import Task, TaskDataError, evaluate_letter, find_local, load_hf, mc_conversation

SPLITS = ("test", "dev", "validation", "train")


class MMLU(Task):
    eval_type = "categorical"
    shuffled = True

    def __init__(self, subset: str = "all", split: str = "test", path=None, **kwargs):
        """subset: "all", one subject (e.g. "astronomy"), or "auxiliary_train" (HuggingFace only)."""
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"MMLU split {split!r}: use one of {', '.join(SPLITS)}")
        self.subset, self.split = subset, split
        root = find_local("mmlu", path) if subset != "auxiliary_train" else None
        files = sorted((root / split).glob(f"*_{split}.csv")) if root is not None else []
        if subset not in ("all", "auxiliary_train"):
            files = [f for f in files if f.name == f"{subset}_{split}.csv"]
        if files:
            self.rows = []
            for f in files:
                subject = f.name[:-len(f"_{split}.csv")]
                with open(f, newline="", encoding="utf-8") as fh:
                    for r in csv.DictReader(fh):
                        choices = [r[f"choice{k}"] for k in range(4)]
                        self.rows.append((r["question"], choices, int(r["answer"]), subject))
        else:
            hf_split = "train" if subset == "auxiliary_train" else split
            ds = load_hf("cais/mmlu", f"MMLU {subset} {split}",
                         f"put <subject>_{split}.csv files in $NANOCHAT_DATA_DIR/mmlu/{split}/ or go online",
                         subset, split=hf_split)
            self.rows = []
            for r in ds:
                r = r.get("train", r)  # auxiliary_train nests each row under "train"
                self.rows.append((r["question"], list(r["choices"]), int(r["answer"]), r.get("subject", "")))
        if not self.rows:
            raise TaskDataError(f"MMLU {subset} {split}: no questions found")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, choices, gold, subject = self.rows[index]
        return mc_conversation(question, choices, gold, task="MMLU", subject=subject)

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)
