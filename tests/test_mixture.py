"""Task mixtures and the chat data sources: determinism, exact coverage, slicing, specs, data files."""
import collections
import json

import pytest

from nanochat.tasks.common import Task, TaskDataError
from nanochat.tasks.mixture import TaskMixture, TaskSequence, build_mixture, parse_spec


class Numbers(Task):
    """Examples are ("name", i): easy to count."""

    def __init__(self, name, n, **kw):
        super().__init__(**kw)
        self.name, self.n = name, n

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return (self.name, i)

    def evaluate(self, conversation, completion):
        return completion == self.name


def test_mixture_is_deterministic_and_shuffled():
    a, b = Numbers("a", 50), Numbers("b", 30)
    m1, m2 = TaskMixture([a, b], [1, 2], seed=7), TaskMixture([a, b], [1, 2], seed=7)
    assert [m1[i] for i in range(len(m1))] == [m2[i] for i in range(len(m2))]
    other = TaskMixture([a, b], [1, 2], seed=8)
    assert [m1[i] for i in range(len(m1))] != [other[i] for i in range(len(other))]
    # shuffled: the first 40 examples are not all from the first task
    assert {m1[i][0] for i in range(40)} == {"a", "b"}


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 3, 0], [2, 1, 5]])
def test_every_example_appears_exactly_weight_times_per_epoch(weights):
    tasks = [Numbers("a", 17), Numbers("b", 5), Numbers("c", 11)]
    mix = TaskMixture(tasks, weights, seed=1)
    assert len(mix) == sum(w * len(t) for w, t in zip(weights, tasks))
    counts = collections.Counter(mix[i] for i in range(len(mix)))
    for t, w in zip(tasks, weights):
        for i in range(len(t)):
            assert counts[(t.name, i)] == w
    assert sum(counts.values()) == len(mix)
    # the judge of an example is the task it came from
    for i in range(len(mix)):
        assert mix.task_of(i).name == mix[i][0]


def test_sequence_slicing_and_views():
    seq = TaskSequence([Numbers("a", 3), Numbers("b", 4)])
    assert [seq[i] for i in range(len(seq))] == [("a", 0), ("a", 1), ("a", 2)] + [("b", i) for i in range(4)]
    assert seq[-1] == ("b", 3)
    view = seq[2:6:2]
    assert len(view) == 2 and [view[0], view[1]] == [("a", 2), ("b", 1)]
    assert view.task_of(1).name == "b"
    assert view[1:][0] == ("b", 1)  # views slice again
    mix = TaskMixture([Numbers("a", 10)], seed=0)
    assert [mix[5:8][i] for i in range(3)] == [mix[i] for i in range(5, 8)]
    with pytest.raises(IndexError):
        seq[7]
    # a sliced task (the Task protocol's own slicing) mixes like any other
    assert len(TaskMixture([Numbers("a", 10)[2:6]], [2])) == 8


def test_bad_weights_and_specs_have_clear_errors():
    with pytest.raises(ValueError, match="whole number"):
        TaskMixture([Numbers("a", 3)], [1.5])
    with pytest.raises(ValueError, match="2 weights"):
        TaskMixture([Numbers("a", 3)], [1, 2])
    with pytest.raises(ValueError, match="did you mean 'smoltalk'"):
        parse_spec("smoltlk|identity")
    with pytest.raises(ValueError, match="empty mixture"):
        parse_spec(" | ")
    assert parse_spec("SmolTalk:100*3|identity|customjson:/x/a.jsonl*2|my.mod:Cls") == [
        ("smoltalk", "100", 3), ("identity", "", 1), ("customjson", "/x/a.jsonl", 2), ("my.mod", "Cls", 1)]


def test_build_mixture_from_offline_sources(tmp_path):
    path = tmp_path / "mine.jsonl"
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(5)]
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    mix = build_mixture(f"demo:40|identity*2|customjson:{path}*3", split="train", seed=3)
    from nanochat.tasks.identity import Identity
    assert len(mix) == 40 + 2 * len(Identity()) + 15
    texts = collections.Counter(json.dumps(mix[i]) for i in range(len(mix)))
    assert texts[json.dumps({"messages": convs[2]})] == 3
    # validation: sources without a val split (identity, customjson) drop out
    val = build_mixture(f"demo:40|identity|customjson:{path}", split="val")
    assert len(val) == 40
    assert build_mixture(f"identity|customjson:{path}", split="val") is None
    assert len(build_mixture("demo", split="val", max_examples=10)) == 10


def test_custom_task_class_by_module_path():
    mix = build_mixture("test_mixture:SplitNumbers*2", split="train")
    assert len(mix) == 2 * 6 and mix[0][0] == "train"


class SplitNumbers(Numbers):
    def __init__(self, split):
        super().__init__(split, 6)


def test_customjson_validates_lines(tmp_path):
    from nanochat.tasks.customjson import CustomJSON
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "hi"}]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: roles must be"):
        CustomJSON(bad)
    bad.write_text('{"messages": [}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        CustomJSON(bad)
    with pytest.raises(TaskDataError, match="not found"):
        CustomJSON(tmp_path / "missing.jsonl")
    good = tmp_path / "good.jsonl"
    parts = [{"type": "text", "text": "2+2 is "}, {"type": "python", "text": "2+2"},
             {"type": "python_output", "text": "4"}, {"type": "text", "text": "4"}]
    good.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": parts}]}) + "\n")
    t = CustomJSON(good)
    assert len(t) == 1 and t.evaluate(t[0], " 2+2 is 4 ") and not t.evaluate(t[0], "5")


def test_identity_default_file_is_the_generators_output(tmp_path):
    """The shipped file is exactly what tools/gen_identity.py writes (so it can be regenerated/edited)."""
    import subprocess
    import sys
    from conftest import REPO
    from nanochat.tasks.identity import DEFAULT_PATH, Identity
    out = tmp_path / "identity.jsonl"
    subprocess.run([sys.executable, str(REPO / "tools" / "gen_identity.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_text() == DEFAULT_PATH.read_text()
    t = Identity()
    assert len(t) == 300 and all("nanochat" in json.dumps(t[i]) for i in range(0, 300, 7) if "name" in json.dumps(t[i]))
    t2 = Identity(path=out)  # a user's own file
    assert len(t2) == 300


def test_missing_sources_name_themselves_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    from nanochat.tasks.smoltalk import SmolTalk
    with pytest.raises(TaskDataError, match=r"SmolTalk train: .*python -m nanochat.tasks.smoltalk"):
        SmolTalk(split="train")
    from nanochat.tasks.alpaca import Alpaca
    with pytest.raises(TaskDataError, match="does not exist"):
        Alpaca(path=tmp_path / "nope.json")


def test_local_smoltalk_and_alpaca_files(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    (tmp_path / "smoltalk").mkdir()
    conv = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]}
    (tmp_path / "smoltalk" / "test.jsonl").write_text(json.dumps(conv) + "\n")
    from nanochat.tasks.smoltalk import SmolTalk
    assert SmolTalk(split="val")[0] == conv
    (tmp_path / "alpaca").mkdir()
    recs = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "loudly", "output": str(i)} for i in range(40)]
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text(json.dumps(recs))
    from nanochat.tasks.alpaca import Alpaca
    train, val = Alpaca(), Alpaca(split="val")
    assert len(train) == 38 and len(val) == 2
    assert train[0]["messages"][0]["content"] == "Say 0.\n\nloudly" and train[1]["messages"][1]["content"] == "1"


def test_demo_data_is_reproducible_and_judged():
    from nanochat.tasks.demo import DemoChat, DemoMath
    d1, d2 = DemoChat("train"), DemoChat("train")
    assert all(d1[i] == d2[i] for i in range(50))
    assert DemoChat("val")[0] != d1[0]
    kinds = collections.Counter()
    for i in range(300):
        c = d1[i]
        content = c["messages"][-1]["content"]
        kinds["math" if isinstance(content, list) else "choice" if "letters" in c else "other"] += 1
    assert kinds["math"] > 50 and kinds["choice"] > 30
    m = DemoMath("val")
    conv = m[3]
    parts = conv["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert str(eval(parts[1]["text"])) == parts[2]["text"]  # the calculator call computes the answer
    answer = parts[2]["text"]
    assert m.reward(conv, f"... #### {answer}") == 1.0 and m.reward(conv, f"#### {int(answer) + 1}") == 0.0


@pytest.mark.shared_data
def test_shared_data_sources_mix():
    from conftest import needs_shared_data
    needs_shared_data("gsm8k", "train.jsonl")
    needs_shared_data("alpaca", "alpaca_5000.json")
    mix = build_mixture("gsm8k|alpaca|identity*2|spelling_bee:100|simple_spelling:100", split="train")
    assert len(mix) == 7473 + 4750 + 600 + 200
    val = build_mixture("gsm8k|alpaca", split="val")
    assert len(val) == 1319 + 250
