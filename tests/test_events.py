import json
import math

import pytest

from nanochat.events import EventReader, EventWriter, as_float, read_events, stage_event_files


def test_writer_schema_and_reader(tmp_path):
    ev = EventWriter(tmp_path, "base_train")
    ev.start(argv=["x"])
    ev.step(step=1, total_steps=10, loss=3.5, lrm=1.0, dt=0.1, tok_per_sec=100.0, mfu=None, tokens=10, eta_s=0.9)
    ev.eval(task="val", metric="bpb", value=1.25, step=1)
    ev.end(status="ok", num_params=123)
    ev.close()
    events, bad = read_events(tmp_path / "base_train" / "events.jsonl")
    assert bad == 0
    assert [e["kind"] for e in events] == ["start", "step", "eval", "end"]
    assert all(e["v"] == 1 and e["stage"] == "base_train" and isinstance(e["ts"], float) for e in events)
    assert events[1]["loss"] == 3.5 and events[2]["value"] == 1.25 and events[3]["num_params"] == 123
    assert list(stage_event_files(tmp_path)) == [("base_train", tmp_path / "base_train" / "events.jsonl")]


def test_nan_loss_survives_json(tmp_path):
    ev = EventWriter(tmp_path, "s")
    ev.step(step=1, total_steps=2, loss=float("nan"), big=float("inf"))
    ev.close()
    (e,), _ = read_events(tmp_path / "s" / "events.jsonl")
    assert math.isnan(as_float(e["loss"])) and as_float(e["big"]) == math.inf


def test_non_master_rank_writes_nothing(tmp_path):
    ev = EventWriter(tmp_path, "s", rank=1)
    assert ev.emit("log", message="hi") is None
    assert not (tmp_path / "s").exists()


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown event kind 'stepp'"):
        EventWriter(tmp_path, "s").emit("stepp")


def test_reader_tolerates_torn_line_and_counts_malformed(tmp_path):
    path = tmp_path / "events.jsonl"
    good = json.dumps({"v": 1, "kind": "step", "step": 1})
    path.write_text(good + "\n" + "{not json\n" + '"a string"\n' + '{"v":1,"kind":"st')  # torn tail
    r = EventReader(path)
    assert [e["step"] for e in r.poll()] == [1]
    assert r.malformed == 2
    assert r.poll() == []  # the torn line is not consumed yet
    with open(path, "a") as f:
        f.write('ep","step":2}\n')
    assert [e["step"] for e in r.poll()] == [2]
    assert r.malformed == 2


def test_reader_restarts_on_truncation(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"kind": "start"}) + "\n" + json.dumps({"kind": "log"}) + "\n")
    r = EventReader(path)
    assert len(r.poll()) == 2
    path.write_text(json.dumps({"kind": "end"}) + "\n")
    assert [e["kind"] for e in r.poll()] == ["end"]


def test_error_event_carries_traceback(tmp_path):
    ev = EventWriter(tmp_path, "s")
    try:
        1 / 0
    except ZeroDivisionError as e:
        ev.error(e)
    ev.close()
    (e,), _ = read_events(tmp_path / "s" / "events.jsonl")
    assert e["kind"] == "error" and e["exc_type"] == "ZeroDivisionError"
    assert "1 / 0" in e["traceback"] and e["message"] == "division by zero"
