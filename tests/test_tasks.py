"""Chat eval tasks: the Task protocol, loaders (made-up files and ../shared/data), answer extraction,
HumanEval in the sandbox, SpellingBee, and one-line errors for missing sources."""
from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat.tasks import common
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task, TaskDataError
from nanochat.tasks.gsm8k import GSM8K, extract_answer, parts_text, solution_parts
from nanochat.tasks.humaneval import HumanEval, build_program, extract_code, extract_imports
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spellingbee import DEFAULT_WORDS, TEMPLATES, SimpleSpelling, SpellingBee

from conftest import SHARED_DATA as SHARED  # noqa: E402


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
    # the reference's rule: the first "#### " (one space), then digits, '.', ',' and a leading '-'; commas dropped
    assert extract_answer("so 5 + 4 = 9\n#### 9") == "9"
    assert extract_answer("#### 1,234,567") == "1234567" and extract_answer("#### -3.5 apples") == "-3.5"
    assert extract_answer("#### $12") is None and extract_answer("####12") is None
    assert extract_answer("first #### 4 then #### 5") == "4"
    assert extract_answer("the answer is 9") is None and extract_answer("#### nine") is None
    parts = solution_parts("He has 2*3 = <<2*3=6>>6 cats and 6+1=<<6+1=7>>7.\n#### 7")
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "2*3" and parts[2]["text"] == "6" and parts[-1]["text"] == "7.\n#### 7"
    assert parts_text(parts) == "He has 2*3 = <<2*3=6>>6 cats and 6+1=<<6+1=7>>7.\n#### 7"
    assert solution_parts("no tools #### 3") == [{"type": "text", "text": "no tools #### 3"}]


def gsm8k_of(tmp_path, answer: str):
    p = tmp_path / "test.jsonl"
    p.write_text(json.dumps({"question": "How many?", "answer": answer}) + "\n")
    t = GSM8K(path=p)
    return t, t[0]


def test_gsm8k_strings_that_pass_and_fail(tmp_path):
    t, c = gsm8k_of(tmp_path, "9*2=<<9*2=18>>18\n#### 18")
    assert t.eval_type == "generative" and c["messages"][0]["content"] == "How many?"
    assert t.evaluate(c, "It is 18.\n#### 18") and t.evaluate(c, "#### 18 apples") and t.reward(c, "#### 18") == 1.0
    for wrong in ("####18", "#### $18", "#### 18.0", "#### 18.", "18", "#### 19", "#### 17\n#### 18"):
        assert not t.evaluate(c, wrong), wrong  # no space, a dollar, another spelling, no marker, the first counts
    assert t.evaluate(c, "#### 18\n#### 17")  # two markers: the first one is the answer
    t, c = gsm8k_of(tmp_path, "#### 1,234")
    assert t.evaluate(c, "#### 1,234") and t.evaluate(c, "#### 1234") and not t.evaluate(c, "#### 1.234")
    t, c = gsm8k_of(tmp_path, "5-8=<<5-8=-3>>-3\n#### -3")
    assert t.evaluate(c, "#### -3") and not t.evaluate(c, "#### 3") and not t.evaluate(c, "#### - 3")


@needs("gsm8k", "test.jsonl")
def test_gsm8k_extraction_agrees_with_all_gold_answers():
    rows = [json.loads(line) for line in open(SHARED / "gsm8k" / "test.jsonl")]
    t = GSM8K()
    assert len(rows) == len(t) == 1319
    for row, conv in zip(rows, t):
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_answer(row["answer"]) == final
        assert parts_text(conv["messages"][1]["content"]) == row["answer"]  # tool-call rendering is lossless
        assert t.evaluate(conv, f"So the answer is\n#### {final}") and not t.evaluate(conv, f"#### {int(final) + 1}")
    # the gold answers score 1,319 / 1,319
    assert sum(t.evaluate(conv, row["answer"]) for row, conv in zip(rows, t)) == 1319


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
    assert a["messages"][1]["content"] == ROWS[0]["prompt"] + "\n" + ROWS[0]["canonical_solution"]
    assert t.evaluate(a, a["messages"][1]["content"]) and t.evaluate(b, b["messages"][1]["content"])  # the gold
    assert t.evaluate(a, "Here:\n```python\ndef add(xs):\n    return sum(xs)\n```\nDone.")  # the prompt's imports come along
    assert t.evaluate(a, "```\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```")   # a bare fence, List imported
    # only the imports are prepended: a completion without the prompt's helper fails
    assert not t.evaluate(b, "```python\ndef twice(x):\n    return helper(x)\n```")
    assert t.evaluate(b, "```python\ndef helper(x):\n    return 2 * x\n\ndef twice(x):\n    return helper(x)\n```")
    assert not t.evaluate(a, "    return sum(xs)\n")  # a bare body is not a program (the prompt is not prepended)
    assert not t.evaluate(a, "```python\ndef add(xs):\n    return sum(xs)\n")  # an unclosed fence is run as is
    assert not t.evaluate(a, "```python\ndef add(xs):\n    return 0\n```")  # wrong
    assert not t.evaluate(b, "def twice(x):\n    while True: pass\n")  # never returns: the time limit
    assert extract_code("no fence ") == "no fence" and extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_imports("import math\n# c\n\nfrom typing import List\ndef f():\n    import os\n") == \
        "import math\nfrom typing import List"
    assert build_program(a, "x") == "from typing import List\n\nx\n\n" + ROWS[0]["test"] + "\ncheck(add)"


def test_humaneval_limits_are_the_reference_5s_256mb(tmp_path, made_up_humaneval):
    path = tmp_path / "HumanEval.jsonl.gz"
    assert (HumanEval(path=path).timeout, HumanEval(path=path).memory_mb) == (5.0, 256)
    hungry = "```python\nBLOCK = bytearray(300 * 2**20)\n\ndef add(xs):\n    return sum(xs)\n```"  # 300 MB, once
    a = made_up_humaneval[0]
    assert not HumanEval(path=path).evaluate(a, hungry) and HumanEval(path=path, memory_mb=2048).evaluate(a, hungry)


@pytest.mark.slow
@needs("humaneval", "HumanEval.jsonl.gz")
def test_humaneval_canonical_solutions_pass_all_164():
    t = HumanEval()
    assert len(t) == 164 and (t.timeout, t.memory_mb) == (5.0, 256)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda c: t.evaluate(c, c["messages"][1]["content"]), t))
    assert sum(outcomes) == 164, [c["task_id"] for c, ok in zip(t, outcomes) if not ok]
    wrong = t[0]
    assert not t.evaluate(wrong, "```python\n" + wrong["prompt"] + "    return not " + "True\n```")


# ----------------------------------------------------------------------------- SpellingBee

def test_spellingbee_items_offline(offline):
    t = SpellingBee(size=50, split="test")
    assert t.words == DEFAULT_WORDS and "not the reference's items" in t.source
    convs = list(t)
    assert convs == list(SpellingBee(size=50, split="test"))  # deterministic
    assert convs != list(SpellingBee(size=50, split="train"))
    for c in convs:
        word, letter, count = c["word"], c["letter"], c["count"]
        assert count == word.count(letter)
        parts = c["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        assert f"First spell the word out:\n{word}:{','.join(word)}\n" in parts[0]["text"]
        hits = [ln for ln in parts[0]["text"].splitlines() if "hit!" in ln]
        assert len(hits) == count and (not hits or hits[-1].endswith(f"count={count}"))
        assert parts[2]["text"] == f"'{word}'.count('{letter}')" and parts[3]["text"] == str(count)
        assert parts[4]["text"].endswith(f"My final answer is:\n\n#### {count}")
        assert t.evaluate(c, parts[4]["text"]) and not t.evaluate(c, f"#### {count + 1}")
        assert not t.evaluate(c, f"####{count}")  # judged like GSM8K
    assert any(c["count"] == 0 for c in convs) and any(c["count"] >= 2 for c in convs)
    assert len(t[10:20]) == 10 and t[10:20][0] == convs[10]
    assert len(TEMPLATES) == 51  # in seven languages, as the reference (the issue said 53)
    assert len(SpellingBee()) == 1000 and len(SpellingBee(size=256, split="test")) == 256
    c = SimpleSpelling(size=5)[0]
    w = c["messages"][0]["content"].removeprefix("Spell the word: ")
    assert c["messages"][1]["content"] == f"{w}:{','.join(w)}" and SimpleSpelling(size=5).evaluate(c, f" {w}:{','.join(w)}")


def test_spellingbee_python_part_runs_in_the_calculator(offline):
    from nanochat.sandbox import calculator
    c = SpellingBee(size=3)[1]
    out, status = calculator(c["messages"][1]["content"][2]["text"])
    assert status == "ok" and out == str(c["count"])


@needs("english_words", "words_alpha.zip")
def test_spellingbee_items_are_the_reference_october_2025_items():
    words = SHARED / "english_words" / "words_alpha.zip"
    t = SpellingBee(size=256, split="test", words_path=words)
    assert len(t.words) == 370099 and len(t) == 256
    # items the reference's tasks/spellingbee.py (commit 8c9b004) generates from the same word list
    first = t[0]
    assert first["messages"][0]["content"] == "how many times is 'o' in 'cottonize'" and first["count"] == 2
    assert t[1]["messages"][1]["content"][0]["text"].startswith(
        "We are asked to find the number 'a' in the word 'beaune'. Let me try a manual approach first.\n\n"
        "First spell the word out:\nbeaune:b,e,a,u,n,e\n\nThen count the occurrences of 'a':\n1:b\n2:e\n3:a hit! count=1\n")
    assert SpellingBee(size=1, split="train", words_path=words)[0]["messages"][0]["content"] == \
        'count the number of "s" in \'nonclastic\'?'
    assert SimpleSpelling(size=1, split="train", words_path=words)[0]["messages"] == [
        {"role": "user", "content": "Spell the word: wombats"}, {"role": "assistant", "content": "wombats:w,o,m,b,a,t,s"}]
