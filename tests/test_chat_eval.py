"""Chat eval scoring with stand-in models and engines whose answers are known: categorical (letter
logits), generative (pass@k through an engine), ChatCORE, task selection, torchrun == single process."""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import chat_eval as ch
from nanochat.tasks.arc import ARC
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spellingbee import SpellingBee
from test_core_eval import ByteTok, TinyLM

REPO = Path(__file__).resolve().parents[1]


class ChatTok(ByteTok):
    """ByteTok plus the one special the scorers need: <|assistant_start|> (id 256 is BOS)."""
    assistant_start = 257

    def get_vocab_size(self):
        return 258

    def render_for_completion(self, conv):
        msgs = conv["messages"][:-1] if conv["messages"][-1]["role"] == "assistant" else conv["messages"]
        ids = [self.bos]
        for m in msgs:
            ids += self.encode(f"{m['role']}: {m['content']}\n")
        return ids + [self.assistant_start]


class LetterModel(torch.nn.Module):
    """Puts one letter on top at the last real position of each row: pick(prompt text) -> letter or None."""

    def __init__(self, pick):
        super().__init__()
        self.pick, self.tok = pick, ChatTok()

    def forward(self, ids):
        out = torch.zeros(*ids.shape, self.tok.get_vocab_size())
        for b, row in enumerate(ids.tolist()):
            n = len(row)
            while row[n - 1] == self.tok.bos:
                n -= 1
            letter = self.pick(self.tok.decode(row[:n]))
            if letter:
                out[b, n - 1, ord(letter)] = 5.0
        return out


class ScriptedEngine:
    """generate_batch like the Engine's (prompt + completion tokens), completions from answer(prompt text, sample)."""

    def __init__(self, answer):
        self.answer, self.tok, self.calls = answer, ChatTok(), 0

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls += 1
        text = self.tok.decode(tokens)
        return [list(tokens) + self.tok.encode(self.answer(text, s)) for s in range(num_samples)], None


# ----------------------------------------------------------------------------- made-up tasks

NUMBERS = ["one", "two", "three", "four"]
QUESTIONS = [(f"Which number is {w}?", NUMBERS, NUMBERS.index(w)) for w in "one two three four one two three four one three".split()]


def make_tasks(root: Path) -> dict:
    """Small files in the local data layout (usable as $NANOCHAT_DATA_DIR), and the six tasks on them."""
    arc = root / "core_icl" / "local_data" / "world_knowledge"
    arc.mkdir(parents=True, exist_ok=True)
    for name in ("arc_easy", "arc_challenge"):
        (arc / f"{name}.jsonl").write_text("".join(json.dumps({"query": f"Question: {q}", "choices": c, "gold": g}) + "\n"
                                                  for q, c, g in QUESTIONS))
    (root / "mmlu" / "test").mkdir(parents=True)
    with open(root / "mmlu" / "test" / "counting_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        w.writerows([(q.replace("Which", "What"), *c, g) for q, c, g in QUESTIONS[:8]])
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"What is {a} plus {b}?", "answer": f"<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}) + "\n"
        for a, b in [(1, 2), (0, 0), (5, 5), (7, -6), (3, 4)]))
    (root / "humaneval").mkdir()
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        for k in range(3):
            f.write(json.dumps({"task_id": f"M/{k}", "entry_point": f"plus{k}", "prompt": f"def plus{k}(x):\n    \"\"\"x + {k}\"\"\"\n",
                                "canonical_solution": f"    return x + {k}\n",
                                "test": f"def check(f):\n    assert f(1) == {1 + k}\n"}) + "\n")
    (root / "english_words").mkdir()
    with zipfile.ZipFile(root / "english_words" / "words_alpha.zip", "w") as z:
        z.writestr("words_alpha.txt", "strawberry\r\nbanana\r\nkiwi\r\nmississippi\r\n")
    return {"ARC-Easy": ARC("ARC-Easy", path=arc / "arc_easy.jsonl"),
            "ARC-Challenge": ARC("ARC-Challenge", path=arc / "arc_challenge.jsonl"),
            "MMLU": MMLU(path=root / "mmlu"), "GSM8K": GSM8K(path=root / "gsm8k" / "test.jsonl"),
            "HumanEval": HumanEval(path=root / "humaneval" / "HumanEval.jsonl.gz", timeout=5),
            "SpellingBee": SpellingBee(size=12, split="test", words_path=root / "english_words" / "words_alpha.zip")}


def gold_letter(tasks):
    table = {}
    for name in ("ARC-Easy", "MMLU"):
        for c in tasks[name]:
            table[c["messages"][0]["content"]] = c["messages"][1]["content"]
    return lambda text: next(v for k, v in table.items() if k in text)


def gold_answer(tasks):
    """The reference answer of whichever generative problem the prompt holds, as a model would write it."""
    refs = {}
    for name in ("GSM8K", "SpellingBee"):
        for c in tasks[name]:
            parts = c["messages"][1]["content"]
            refs[c["messages"][0]["content"]] = "".join(p["text"] for p in parts if p["type"] == "text")
    for c in tasks["HumanEval"]:
        refs[c["messages"][0]["content"]] = "```python\n" + c["messages"][1]["content"] + "```"
    return lambda text, s: next(v for k, v in refs.items() if k in text)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return make_tasks(tmp_path_factory.mktemp("chat"))


# ----------------------------------------------------------------------------- scoring

def test_categorical_scoring_exact(tasks):
    tok = ChatTok()
    for name in ("ARC-Easy", "MMLU"):
        t = tasks[name]
        golds = [c["messages"][1]["content"] for c in t]
        frac = lambda L: sum(g == L for g in golds) / len(golds)  # noqa: E731
        assert 0 < frac("A") < 1
        for model, expected in [(LetterModel(gold_letter(tasks)), 1.0), (LetterModel(lambda s: "A"), frac("A")),
                                (LetterModel(lambda s: "C"), frac("C")), (LetterModel(lambda s: None), frac("A"))]:
            for bs in (1, 3):  # batching (with padding) changes nothing
                out = ch.evaluate_chat_task(t, model, tok, batch_size=bs)
                assert sum(out) / len(out) == pytest.approx(expected)
    # a letter the model prefers that is not among the choices is never picked
    three = [c for c in tasks["ARC-Easy"]]
    assert all(len(c["letters"]) == 4 for c in three)
    out = ch.evaluate_chat_task(tasks["ARC-Easy"], LetterModel(lambda s: "E"), tok)
    assert out == [tasks["ARC-Easy"][i]["messages"][1]["content"] == "A" for i in ch.problem_order(tasks["ARC-Easy"])]


def test_categorical_cuts_only_past_what_the_model_can_forward(tasks):
    class Short(LetterModel):
        max_seq_len = 40  # a model that cannot forward more (nanochat's GPT forwards 10x its training context)

        def forward(self, ids):
            assert ids.shape[1] <= 40
            return super().forward(ids)

    class Long(LetterModel):
        config = type("C", (), {"sequence_len": 40})  # trained on 40, but no limit stated: nothing is cut

        def forward(self, ids):
            assert ids.shape[1] > 40
            return super().forward(ids)
    # the kept tail still ends with the instruction, so a model reading the last tokens still answers
    order = ch.problem_order(tasks["ARC-Easy"])
    for model in (Short(lambda s: "B"), Long(lambda s: "B")):
        out = ch.evaluate_chat_task(tasks["ARC-Easy"], model, ChatTok())
        assert out == [tasks["ARC-Easy"][i]["messages"][1]["content"] == "B" for i in order]


def test_generative_scoring_exact(tasks):
    tok = ChatTok()
    for name in ("GSM8K", "HumanEval", "SpellingBee"):
        t = tasks[name]
        eng = ScriptedEngine(gold_answer(tasks))
        assert all(ch.evaluate_chat_task(t, None, tok, engine=eng))
        assert eng.calls == len(t)
    gsm = tasks["GSM8K"]
    zero = ch.evaluate_chat_task(gsm, None, tok, engine=ScriptedEngine(lambda s, k: "I think\n#### 0"))
    assert zero == [gsm[i]["messages"][1]["content"][-1]["text"].endswith("#### 0") for i in ch.problem_order(gsm)]
    assert sum(zero) == 1
    # pass@k: right only on the second sample
    second = ScriptedEngine(lambda s, k: gold_answer(tasks)(s, k) if k == 1 else "no idea")
    assert not any(ch.evaluate_chat_task(gsm, None, tok, engine=second, num_samples=1))
    assert all(ch.evaluate_chat_task(gsm, None, tok, engine=second, num_samples=2))
    wrong_code = ScriptedEngine(lambda s, k: "```python\ndef plus0(x):\n    return x\n```")
    he = tasks["HumanEval"]
    assert ch.evaluate_chat_task(he, None, tok, engine=wrong_code) == \
        [he[i]["entry_point"] == "plus0" for i in ch.problem_order(he)]


def test_run_chat_eval_and_chatcore(tasks):
    tok = ChatTok()
    seen = []
    res = ch.run_chat_eval(LetterModel(gold_letter(tasks)), tok, list(ch.ALL_TASKS), engine=ScriptedEngine(gold_answer(tasks)),
                           tasks=tasks, on_task=lambda n, r: seen.append(n))
    assert seen == list(ch.ALL_TASKS) and res["chatcore"] == 1.0 and not res["partial"]
    res = ch.run_chat_eval(LetterModel(lambda s: "A"), tok, list(ch.ALL_TASKS), tasks=tasks,
                           engine=ScriptedEngine(lambda s, k: "#### 0"), max_problems=8)
    arc_a = sum(g == 0 for _, _, g in QUESTIONS[:10]) / 10
    sub = ch.problem_order(tasks["ARC-Easy"], 8)
    arc_a8 = sum(QUESTIONS[i][2] == 0 for i in sub) / 8
    mmlu_a = sum(QUESTIONS[i][2] == 0 for i in ch.problem_order(tasks["MMLU"], 8)) / 8
    assert res["tasks"]["ARC-Easy"]["n"] == 8 and res["tasks"]["ARC-Easy"]["acc"] == pytest.approx(arc_a8)
    assert res["tasks"]["MMLU"]["acc"] == pytest.approx(mmlu_a) and arc_a > 0
    assert res["tasks"]["ARC-Easy"]["centered"] == pytest.approx((arc_a8 - 0.25) / 0.75)
    assert res["tasks"]["GSM8K"]["acc"] == pytest.approx(1 / 5) and res["tasks"]["GSM8K"]["centered"] == pytest.approx(0.2)
    spelling = sum(tasks["SpellingBee"][i]["count"] == 0 for i in range(8)) / 8  # not shuffled: the first 8
    assert res["tasks"]["SpellingBee"]["acc"] == pytest.approx(spelling) and res["tasks"]["HumanEval"]["acc"] == 0
    expected = [(arc_a8 - .25) / .75, (arc_a8 - .25) / .75, (mmlu_a - .25) / .75, 0.2, 0.0, spelling]
    assert res["chatcore"] == pytest.approx(sum(expected) / 6)
    part = ch.run_chat_eval(LetterModel(lambda s: "A"), tok, ["MMLU"], tasks=tasks)
    assert part["partial"] and part["missing"] == ["ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval", "SpellingBee"]
    assert "partial: missing ARC-Easy, ARC-Challenge, GSM8K, HumanEval, SpellingBee" in ch.format_table(part)


def test_problem_order_is_the_reference_one():
    import numpy as np
    from nanochat.tasks.common import Task

    class Shuffled(Task):
        shuffled = True

        def num_examples(self):
            return 6

    class Plain(Shuffled):
        shuffled = False
    # HF datasets' shuffle(seed=42) order, which the reference reads ARC, MMLU, GSM8K and HumanEval in
    assert ch.problem_order(Shuffled()) == np.random.default_rng(42).permutation(6).tolist() == [3, 2, 5, 4, 1, 0]
    assert ch.problem_order(Shuffled(), 3) == [3, 2, 5] and ch.problem_order(Plain(), 3) == [0, 1, 2]
    assert ch.problem_order(Plain(), -1) == list(range(6))
    assert GSM8K.shuffled and HumanEval.shuffled and ARC.shuffled and MMLU.shuffled and not SpellingBee.shuffled


def test_parse_tasks():
    assert ch.parse_tasks("all") == list(ch.ALL_TASKS)
    assert ch.parse_tasks("arc-easy|gsm8k|ARC_Challenge|GSM8K") == ["ARC-Easy", "GSM8K", "ARC-Challenge"]
    with pytest.raises(ValueError, match="unknown chat eval task 'MMLUX'; allowed: ARC-Easy"):
        ch.parse_tasks("MMLUX")


def test_letter_must_be_one_token(tasks):
    class Wide(ChatTok):
        def encode(self, text, prepend=None, append=None):
            ids = super().encode(text, prepend, append)
            return ids + ids if text in "ABCD" and text else ids
    with pytest.raises(ValueError, match="one token"):
        ch.evaluate_chat_task(tasks["ARC-Easy"], LetterModel(lambda s: "A"), Wide())


# ----------------------------------------------------------------------------- multi-process

DIST_SCRIPT = """
import json, sys, zlib
sys.path.insert(0, {tests!r})
from pathlib import Path
from nanochat.common import compute_init, compute_cleanup
from nanochat import chat_eval as ch
from test_chat_eval import ChatTok, ScriptedEngine, make_tasks
from test_core_eval import TinyLM
info = compute_init("cpu")
tasks = make_tasks(Path({root!r}) / f"r{{info.rank}}")
parity = ScriptedEngine(lambda text, k: "#### %d" % (zlib.crc32(text.encode()) % 3))
res = ch.run_chat_eval(TinyLM(258), ChatTok(), ["ARC-Easy", "MMLU", "GSM8K", "SpellingBee"], engine=parity, tasks=tasks,
                       batch_size=3)
outs = {{n: ch.evaluate_chat_task(tasks[n], TinyLM(258), ChatTok(), engine=parity, batch_size=2) for n in ("ARC-Easy", "GSM8K")}}
if info.rank == 0:
    json.dump({{"res": {{k: v["acc"] for k, v in res["tasks"].items()}}, "chatcore": res["chatcore"], "outs": outs}},
              open({out!r}, "w"))
compute_cleanup()
"""


def test_torchrun_two_processes_equal_one(tmp_path):
    results = []
    for n in (1, 2):
        out = tmp_path / f"out{n}.json"
        script = tmp_path / "run_chat.py"
        script.write_text(DIST_SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path / f"data{n}"), out=str(out)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]
    flat = [o for v in results[0]["outs"].values() for o in v]
    assert any(flat) and not all(flat)
    assert re.match(r"^-?\d", str(results[0]["chatcore"]))


# ----------------------------------------------------------------------------- the stage

def test_chat_eval_stage(tiny_run, tmp_path, monkeypatch):
    from conftest import run_stage
    from nanochat.events import read_events
    run_dir, base = tiny_run
    run_stage("stages.base_train", run_dir, "--set", "base_train.num_iterations=4", "--set", "base_train.eval_every=0",
              base_dir=base)
    make_tasks(tmp_path / "data")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "data"))  # stage_env passes os.environ on
    p = run_stage("stages.chat_eval", run_dir, "-i", "base", "-a", "ARC-Easy|MMLU|GSM8K|SpellingBee",
                  "--max-problems", "4", "--max-new-tokens", "6", "--stage-name", "chat_eval_base", base_dir=base)
    bad = run_stage("stages.chat_eval", run_dir, "-i", "sft", base_dir=base, check=False)
    typo = run_stage("stages.chat_eval", run_dir, "-i", "base", "-a", "GSM9K", base_dir=base, check=False)
    assert "ChatCORE" in p.stdout and "partial" in p.stdout
    events, malformed = read_events(run_dir / "chat_eval_base" / "events.jsonl")
    assert malformed == 0
    evals = {(e["task"], e["metric"]): e for e in events if e["kind"] == "eval"}
    for name in ("ARC-Easy", "MMLU", "GSM8K", "SpellingBee"):
        acc = evals[(name, "acc")]
        assert acc["phase"] == "base" and acc["n"] == 4 and 0 <= acc["value"] <= 1 and acc["step"] == 4
        assert evals[(name, "centered")]["value"] == pytest.approx(ch.centered(acc["value"], ch.BASELINES[name]))
    core = evals[("ChatCORE", "chatcore")]
    assert core["partial"] and core["value"] == pytest.approx(
        sum(evals[(n, "centered")]["value"] for n in ("ARC-Easy", "MMLU", "GSM8K", "SpellingBee")) / 4)
    assert events[-1]["kind"] == "end" and events[-1]["chatcore"] == core["value"]
    assert bad.returncode != 0 and "no sft checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    assert typo.returncode != 0 and "unknown chat eval task 'GSM9K'" in typo.stderr
