import json
import math

import pytest

from nanochat.events import EventReader, EventWriter, as_float, read_events, stage_event_files


def test_writer_schema_and_reader(tmp_path):
    ev = EventWriter(tmp_path, "base_train")
    ev.start(argv=["x"])
    ev.step(step=1, total_steps=10, loss=3.5, lrm=1.0, dt=0.1, tok_per_sec=100.0, mfu=None, tokens=10, eta_s=0.9)
    ev.eval(task="val", metric="bpb", value=1.25, phase="base", step=1)
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


# ------------------------------------------------------------------------------ malformed input

GOOD = {"v": 1, "ts": 1.5, "stage": "base_train", "kind": "step", "step": 1, "total_steps": 9, "loss": 3.0}
BAD = [  # valid JSON, wrong types: each must be skipped and counted, never raised
    {**GOOD, "step": "5"}, {**GOOD, "stage": ["a", "b"]}, {**GOOD, "ts": "noon"}, {**GOOD, "ts": float("nan")},
    {**GOOD, "step": True}, {**GOOD, "loss": [1]}, {**GOOD, "tok_per_sec": {"x": 1}}, {**GOOD, "kind": 7},
    {"v": 1, "kind": "eval", "task": "val", "metric": "bpb"}, {"kind": "eval", "task": 3, "metric": "m", "value": 1},
    {"kind": "config", "config": "x"}, {"kind": "sample", "prompt": None, "text": 5}, {"kind": "checkpoint", "step": 1.5},
]
RAW_BAD = [b"\xff\xfe not utf-8 {", b'{"kind": "step", "step": 2, "loss": 1.0, "x": "\xc3\x28"}', b"[1, 2]", b'"str"',
           b"NaN", b"{" * 100_000, b'{"kind": "step", "step": 3, "loss": NaN, "ts": Infinity}',
           b'{"kind":"log","message":"' + b"x" * (4 << 20) + b'"}']


def _malformed_file(path):
    lines = [json.dumps(GOOD).encode()] + [json.dumps(b).encode() for b in BAD] + RAW_BAD
    lines.append(json.dumps({**GOOD, "step": 2, "loss": float("nan")}).encode())  # NaN loss (bare NaN): allowed
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(BAD) + len(RAW_BAD)


def test_wrong_types_invalid_utf8_and_huge_lines_are_skipped_and_counted(tmp_path):
    from nanochat.events import check_event
    path = tmp_path / "events.jsonl"
    n_bad = _malformed_file(path)
    evs, bad = read_events(path)
    assert [e["step"] for e in evs] == [1, 2] and bad == n_bad
    assert math.isnan(as_float(evs[1]["loss"]))
    assert all(check_event(b) for b in BAD) and check_event(GOOD) is None
    assert check_event({**GOOD, "step": "5"}) == "step = '5' is not of type int"


def test_every_reader_survives_malformed_events(tmp_path):
    from tui.runmodel import RunModel, RunReader, load_run, quick_summary
    run = tmp_path / "run"
    (run / "base_train").mkdir(parents=True)
    _malformed_file(run / "base_train" / "events.jsonl")
    m = RunModel(run)
    m.ingest(BAD + [GOOD, "a string", None, [1]])  # fed directly: checked here
    assert m.malformed == len(BAD) + 3 and m.stages["base_train"].step == 1 and m.loss["base_train"].ys == [3.0]
    m = load_run(run)
    assert m.stages["base_train"].step == 2 and m.n_events == 2 and RunReader(run).poll() is not None
    s = quick_summary(run, {"status": "running", "stages": [], "raw": {}}, now=10.0, fallback_rate=1.0)
    assert s.started == 1.5
    # the run list's first/last-line reader, with a malformed line at each end
    (run / "x").mkdir()
    (run / "x" / "events.jsonl").write_bytes(b'{"kind": "start", "ts": "x"}\n' + json.dumps(GOOD).encode() + b'\n[1]\n')
    assert quick_summary(run, {"status": "running", "stages": [], "raw": {}}, 10.0, 1.0).started == 1.5
    # the big-file path of RunReader (one JSON array) falls back to the line reader on any bad line
    big = tmp_path / "big"
    (big / "s").mkdir(parents=True)
    with open(big / "s" / "events.jsonl", "w") as f:
        for i in range(12_000):
            f.write(json.dumps({**GOOD, "stage": "s", "step": i, "pad": "x" * 80}) + "\n")
        f.write(json.dumps({**GOOD, "stage": "s", "step": "oops"}) + "\n")
    r = RunReader(big)
    assert len(r.poll()) == 12_000 and r.malformed == 1


def test_writer_starts_a_new_line_after_a_torn_one(tmp_path):
    ev = EventWriter(tmp_path, "s")
    ev.step(step=1, total_steps=3, loss=2.0)
    ev.close()
    with open(ev.path, "a") as f:
        f.write('{"v":1,"kind":"step","step":2,"tot')  # the stage was killed mid-write
    ev = EventWriter(tmp_path, "s")  # the resumed stage
    ev.start(resume=True)
    ev.step(step=2, total_steps=3, loss=1.5)
    ev.close()
    evs, bad = read_events(ev.path)
    assert [e["kind"] for e in evs] == ["step", "start", "step"] and bad == 1
    assert EventWriter(tmp_path, "s").emit("log", message="lone \udc80 surrogate")["message"]  # no UnicodeEncodeError


def test_reader_bounded_on_a_huge_torn_line(tmp_path):
    from nanochat.events import MAX_LINE_BYTES
    path = tmp_path / "events.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b"x" * (MAX_LINE_BYTES + 10))
    r = EventReader(path)
    assert len(r.poll()) == 1 and r.malformed == 1  # the over-long torn line is given up on, not kept
    assert r.poll() == []  # unchanged file: nothing read at all
    with open(path, "ab") as f:
        f.write(b"yyy\n" + json.dumps({**GOOD, "step": 2}).encode() + b"\n")
    assert [e["step"] for e in r.poll()] == [2] and r.malformed == 1


def test_logfile_reads_malformed_and_huge_lines_in_linear_time(tmp_path):
    from tui.logfile import CUT_MARK, LINE_CAP, LogFile, compile_query
    p = tmp_path / "stderr.log"
    p.write_bytes(b"start\n" + b"\xff\xfe[/]" * 10 + b"\n" + b"y" * (16 << 20) + b"\nend\n")
    lf = LogFile(p)
    lf.refresh()
    assert len(lf) == 4
    lines = lf.lines(0, 10)
    assert lines[0] == "start" and "\ufffd" in lines[1] and lines[3] == "end"
    assert len(lf.raw_lines(2, 1)[0]) == LINE_CAP + len(CUT_MARK)  # what the screen gets is bounded
    assert lf.find(compile_query("end", False), 0) == 3
