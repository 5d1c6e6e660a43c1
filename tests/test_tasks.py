"""Chat eval tasks: the Task protocol, loaders (made-up files and ../shared/data), answer extraction,
HumanEval in the sandbox, SpellingBee, and one-line errors for missing sources."""
from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat.tasks import common
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task, TaskDataError
from nanochat.tasks.gsm8k import GSM8K, extract_answer, parts_text, same_number, solution_parts
from nanochat.tasks.humaneval import HumanEval, build_program, extract_code
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spellingbee import DEFAULT_WORDS, SimpleSpelling, SpellingBee

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs(*parts):
    p = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not p.exists(), reason=f"{p} absent")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No data roots with anything in them, and no network."""
    monkeypatch.setattr(common, "data_roots", lambda: [tmp_path / "nothing"])
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")


# ----------------------------------------------------------------------------- protocol

class Squares(Task):
    def num_examples(self):
        return 10

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": str(i * i)}]}

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


def test_task_protocol_slicing():
    ans = lambda t: [int(c["messages"][0]["content"]) for c in t]  # noqa: E731
    assert len(Squares()) == 10 and ans(Squares()) == list(range(10))
    assert ans(Squares(start=2, stop=9, step=3)) == [2, 5, 8]
    t = Squares(step=2)
    assert ans(t[1:4]) == [2, 4, 6] and ans(t[1:4][::2]) == [2, 6] and len(t[7:]) == 0
    assert t[-1]["messages"][0]["content"] == "8"
    with pytest.raises(IndexError):
        t[5]
    c = Squares()[3]
    assert Squares().evaluate(c, "9") and not Squares().evaluate(c, "8")
    assert Squares().reward(c, "9") == 1.0 and Squares().reward(c, "1") == 0.0
    with pytest.raises(ValueError, match="step"):
        Squares(step=0)


# ----------------------------------------------------------------------------- ARC / MMLU

def test_arc_from_core_jsonl(tmp_path):
    p = tmp_path / "arc.jsonl"
    p.write_text(json.dumps({"query": "Question: Which is a mammal?", "choices": ["shark", "whale", "trout"], "gold": 1}) + "\n")
    t = ARC("ARC-Challenge", path=p)
    assert t.eval_type == "categorical" and len(t) == 1
    c = t[0]
    assert c["letters"] == "ABC" and c["messages"][1]["content"] == "B"
    assert c["messages"][0]["content"] == ("Multiple Choice question: Which is a mammal?\n- shark=A\n- whale=B\n"
                                           "- trout=C\n\nRespond only with the letter of the correct answer.")
    assert t.evaluate(c, "B") and t.evaluate(c, " B\n") and not t.evaluate(c, "A")
    with pytest.raises(ValueError, match="ARC-Easy, ARC-Challenge"):
        ARC("arc")


def test_missing_sources_name_themselves(offline):
    cases = [(lambda: ARC("ARC-Easy", split="train"), "ARC ARC-Easy train.*allenai/ai2_arc"),
             (lambda: ARC("ARC-Easy"), "arc_easy.jsonl"),
             (lambda: MMLU(), r"MMLU all test.*cais/mmlu.*mmlu/test/"),
             (lambda: MMLU("auxiliary_train", split="train"), "MMLU auxiliary_train"),
             (lambda: GSM8K(split="train"), "GSM8K train.*openai/gsm8k.*gsm8k/"),
             (lambda: HumanEval(), "HumanEval.*openai_humaneval.*HumanEval.jsonl.gz")]
    for make, pattern in cases:
        with pytest.raises(TaskDataError, match=pattern) as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(TaskDataError, match="does not exist"):
        GSM8K(path="/no/such/file.jsonl")


def test_mmlu_csv(tmp_path):
    for split, subject, rows in [("test", "astronomy", [('What orbits, "mostly", the Sun?\nPick one', "Earth", "Moon", "Io", "Titan", 0),
                                                         ("Largest planet?", "Mars", "Jupiter", "Venus", "Pluto", 1)]),
                                 ("test", "virology", [("A virus is?", "a cell", "not a cell", "a plant", "a rock", 1)]),
                                 ("dev", "astronomy", [("Dev q?", "a", "b", "c", "d", 3)])]:
        d = tmp_path / "mmlu" / split
        d.mkdir(parents=True, exist_ok=True)
        import csv
        with open(d / f"{subject}_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            w.writerows(rows)
    t = MMLU(path=tmp_path / "mmlu")
    assert len(t) == 3 and [c["subject"] for c in t] == ["astronomy", "astronomy", "virology"]
    c = t[0]
    assert c["messages"][0]["content"].startswith('Multiple Choice question: What orbits, "mostly", the Sun?\nPick one\n- Earth=A')
    assert c["messages"][1]["content"] == "A" and t[1]["messages"][1]["content"] == "B"
    assert len(MMLU("virology", path=tmp_path / "mmlu")) == 1
    assert MMLU(split="dev", path=tmp_path / "mmlu")[0]["messages"][1]["content"] == "D"


@needs("core_icl")
def test_arc_shared_counts():
    easy, chal = ARC("ARC-Easy"), ARC("ARC-Challenge")
    assert (len(easy), len(chal)) == (2376, 1172)
    assert not easy[0]["messages"][0]["content"].startswith("Multiple Choice question: Question:")
    assert all(c["messages"][1]["content"] in c["letters"] for c in chal)


@needs("mmlu")
def test_mmlu_shared_counts():
    t = MMLU()
    assert len(t) == 14042 and len({c["subject"] for c in t}) == 57
    assert len(MMLU(split="dev")) == 285 and len(MMLU("astronomy")) > 100


# ----------------------------------------------------------------------------- GSM8K

def test_gsm8k_extraction_made_up():
    assert extract_answer("so 5 + 4 = 9\n#### 9") == "9"
    assert extract_answer("#### 1,234,567") == "1234567"
    assert extract_answer("#### -3.5 apples") == "-3.5"
    assert extract_answer("#### $12") == "12"
    assert extract_answer("first #### 4 then #### 5") == "5"
    assert extract_answer("the answer is 9") is None and extract_answer("#### nine") is None
    assert same_number("18", "18.00") and not same_number("18", "19") and not same_number(None, "1")
    parts = solution_parts("He has 2*3 = <<2*3=6>>6 cats and 6+1=<<6+1=7>>7.\n#### 7")
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "2*3" and parts[2]["text"] == "6" and parts[-1]["text"] == "7.\n#### 7"
    assert parts_text(parts) == "He has 2*3 = <<2*3=6>>6 cats and 6+1=<<6+1=7>>7.\n#### 7"
    assert solution_parts("no tools #### 3") == [{"type": "text", "text": "no tools #### 3"}]


def test_gsm8k_task_made_up(tmp_path):
    p = tmp_path / "test.jsonl"
    p.write_text(json.dumps({"question": "2 times 3?", "answer": "2*3=<<2*3=6>>6\n#### 6"}) + "\n")
    t = GSM8K(path=p)
    c = t[0]
    assert t.eval_type == "generative" and c["messages"][0]["content"] == "2 times 3?"
    assert t.evaluate(c, "It is six.\n#### 6") and t.evaluate(c, "#### 6.0")
    assert not t.evaluate(c, "#### 7") and not t.evaluate(c, "6") and t.reward(c, "#### 6") == 1.0


@needs("gsm8k", "test.jsonl")
def test_gsm8k_extraction_agrees_with_all_gold_answers():
    rows = [json.loads(line) for line in open(SHARED / "gsm8k" / "test.jsonl")]
    t = GSM8K()
    assert len(rows) == len(t) == 1319
    for row, conv in zip(rows, t):
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_answer(row["answer"]) == final
        assert parts_text(conv["messages"][1]["content"]) == row["answer"]  # tool-call rendering is lossless
        assert t.evaluate(conv, row["answer"]) and t.evaluate(conv, f"So the answer is\n#### {final}")
        assert not t.evaluate(conv, f"#### {int(final) + 1}")


# ----------------------------------------------------------------------------- HumanEval

ROWS = [
    {"task_id": "Made/0", "entry_point": "add", "prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"},
    {"task_id": "Made/1", "entry_point": "twice", "prompt": "def helper(x):\n    return 2 * x\n\n\ndef twice(x):\n    \"\"\"Double via helper.\"\"\"\n",
     "canonical_solution": "    return helper(x)\n", "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]


@pytest.fixture
def made_up_humaneval(tmp_path):
    p = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    return HumanEval(path=p, timeout=2)


def test_humaneval_made_up(made_up_humaneval):
    t = made_up_humaneval
    a, b = t[0], t[1]
    assert a["messages"][1]["content"] == ROWS[0]["prompt"] + ROWS[0]["canonical_solution"]
    assert t.evaluate(a, ROWS[0]["canonical_solution"])                                  # a bare body
    assert t.evaluate(a, "Here:\n```python\ndef add(xs):\n    return sum(xs)\n```\nDone.")  # a whole function
    assert t.evaluate(b, "```python\ndef twice(x):\n    return helper(x)\n```")           # uses the prompt's helper
    assert not t.evaluate(a, "```python\ndef add(xs):\n    return 0\n```")                # wrong
    assert not t.evaluate(a, "def add(xs) return")                                          # syntax error
    assert not t.evaluate(b, "    while True: pass\n")                                      # never returns
    assert extract_code("no fence") == "no fence" and extract_code("```\nx = 1\n```") == "x = 1\n"


@needs("humaneval", "HumanEval.jsonl.gz")
def test_humaneval_canonical_solutions_pass_all_164():
    t = HumanEval()
    assert len(t) == 164

    def run(c):
        return t.evaluate(c, "```python\n" + c["messages"][1]["content"] + "\n```")

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, t))
    assert sum(outcomes) == 164, [c["task_id"] for c, ok in zip(t, outcomes) if not ok]
    wrong = t[0]
    assert not t.evaluate(wrong, "```python\n" + wrong["prompt"] + "    return not " + "True\n```")
    assert "check(has_close_elements)" in build_program(wrong, "    return False\n")


# ----------------------------------------------------------------------------- SpellingBee

def test_spellingbee_default_words_offline(offline):
    t = SpellingBee(size=50)
    assert t.words == sorted(set(DEFAULT_WORDS))
    convs = list(t)
    assert convs == list(SpellingBee(size=50))  # deterministic
    assert convs != list(SpellingBee(size=50, split="train"))
    for c in convs:
        assert c["count"] == c["word"].count(c["letter"])
        parts = c["messages"][1]["content"]
        assert parts[1]["text"] == f"'{c['word']}'.count('{c['letter']}')" and parts[2]["text"] == str(c["count"])
        ref = "".join(p["text"] for p in parts if p["type"] == "text")
        assert t.evaluate(c, ref) and not t.evaluate(c, f"#### {c['count'] + 1}")
    assert any(c["count"] == 0 for c in convs) and any(c["count"] >= 2 for c in convs)
    assert len(t[10:20]) == 10 and t[10:20][0] == convs[10]
    s = SimpleSpelling(size=5)
    c = s[0]
    w = c["messages"][1]["content"].split(":")[0]
    assert c["messages"][1]["content"] == f"{w}: {','.join(w)}" and s.evaluate(c, c["messages"][1]["content"])


def test_spellingbee_python_part_runs_in_the_calculator(offline):
    from nanochat.sandbox import calculator
    c = SpellingBee(size=3)[1]
    out, status = calculator(c["messages"][1]["content"][1]["text"])
    assert status == "ok" and out == str(c["count"])


@needs("english_words", "words_alpha.zip")
def test_spellingbee_uses_the_word_list():
    t = SpellingBee(size=20)
    assert len(t.words) == 370099
    assert any(c["word"] not in DEFAULT_WORDS for c in t)
