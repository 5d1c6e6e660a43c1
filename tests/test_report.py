"""report.md from a completed and from a failed run, checked against the events they came from."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from nanochat import supervisor as sv
from nanochat.events import read_events
from nanochat.report import build_report, fmt_duration, write_report
from nanochat.system import gpu_hourly_rate

pytestmark = pytest.mark.timeout(120)
PHASES = ["BASE", "MID", "SFT", "RL"]


def fake(name, *args):
    return {"name": name, "module": "tests.fake_stage", "args": [str(a) for a in args]}


def run_to_end(tmp_path, monkeypatch, stages) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    d = sv.create_run("demo", stages=stages, root=tmp_path / "runs")
    sv.start_run(d)
    deadline = time.time() + 60
    while sv.is_live(d) and time.time() < deadline:
        time.sleep(0.05)
    assert not sv.is_live(d)
    return d


def summary_cells(report: str) -> dict[str, list[str]]:
    part = report.split("## Summary", 1)[1].split("Total wall-clock", 1)[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in part.splitlines() if ln.startswith("| ")]
    assert rows[0] == ["Metric", *PHASES]
    return {r[0]: r[1:] for r in rows[1:]}


def section(report: str, stage: str) -> str:
    return report.split(f"## {stage}\n", 1)[1].split("\n## ", 1)[0]


def all_events(d: Path) -> dict[str, list[dict]]:
    return {p.parent.name: read_events(p)[0] for p in d.glob("*/events.jsonl")}


COMPLETED = [
    fake("tok_train", "--steps", 2, "--end", "vocab_size=2048"),
    fake("tok_eval", "--steps", 0, "--eval", "compression:bytes_per_token:4.125"),
    fake("base_train", "--steps", 3, "--eval", "val:bpb:1.2345:base", "--end", "num_params=123456",
         "--end", "tokens=3000", "--end", "total_flops=1.5e12", "--end", "mfu=0.41", "--end", "min_val_bpb=1.2345"),
    fake("base_eval", "-i", "base", "--steps", 0, "--eval", "hellaswag:acc:0.3", "--eval", "hellaswag:centered:0.1",
         "--eval", "arc_easy:acc:0.5", "--eval", "arc_easy:centered:0.25", "--eval", "CORE:core:0.175"),
    fake("mid_train", "--steps", 3),
    fake("chat_eval_mid", "-i", "mid", "--steps", 0, "--eval", "ARC-Easy:acc:0.31", "--eval", "GSM8K:acc:0.02",
         "--eval", "ChatCORE:chatcore:0.05"),
    fake("chat_sft", "--steps", 2),
    fake("chat_eval_sft", "-i", "sft", "--steps", 0, "--eval", "ARC-Easy:acc:0.35", "--eval", "ARC-Challenge:acc:0.28",
         "--eval", "MMLU:acc:0.3", "--eval", "HumanEval:acc:0.0625", "--eval", "GSM8K:acc:0.04",
         "--eval", "ChatCORE:chatcore:0.09"),
]


def test_report_of_a_completed_run_matches_its_events(tmp_path, monkeypatch):
    d = run_to_end(tmp_path, monkeypatch, COMPLETED)
    assert sv.read_state(d)["status"] == "succeeded"
    assert "status **succeeded**" in (d / "report.md").read_text()  # the driver wrote it as the run ended
    path = write_report(d)
    assert path == d / "report.md" and not list(d.glob(".report.md.*"))  # atomic: no temp left
    rep = path.read_text()
    evs = all_events(d)

    # summary: every cell is the eval event of that task and phase, '-' where nothing ran
    cells = summary_cells(rep)
    expected = {row: ["-"] * 4 for row in cells}
    names = {"core": "CORE", "arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge", "gsm8k": "GSM8K",
             "humaneval": "HumanEval", "mmlu": "MMLU", "chatcore": "ChatCORE"}
    for stage, es in evs.items():
        for e in es:
            core_task = any(x.get("task") == e.get("task") and x.get("metric") == "centered" for x in es)
            if e["kind"] == "eval" and e["task"].lower() in names and not core_task and \
                    (e["task"] != "CORE" or e["metric"] == "core"):
                phase = e["phase"]
                expected[names[e["task"].lower()]][PHASES.index(phase.upper())] = f"{e['value']:.4f}"
    assert cells == expected
    assert cells["CORE"] == ["0.1750", "-", "-", "-"] and cells["ARC-Easy"] == ["-", "0.3100", "0.3500", "-"]
    assert all(v == "-" for row in cells.values() for v in row[3:])  # no RL stage

    # per-stage facts come from each stage's end event
    base_end = next(e for e in evs["base_train"] if e["kind"] == "end")
    base = section(rep, "base_train")
    assert f"Parameters: {base_end['num_params']:,}" in base and "Training tokens: 3,000" in base
    assert "Training FLOPs: 1.500e+12" in base and "MFU: 41.00%" in base and "Min validation bpb: 1.2345" in base
    assert "Steps: 3/3" in base and "| val | bpb | 1.2345 |" in base
    assert "Vocabulary size: 2,048" in section(rep, "tok_train")
    assert "| compression | bytes_per_token | 4.1250 |" in section(rep, "tok_eval")
    core = section(rep, "base_eval")
    assert "| hellaswag | 0.3000 | 0.1000 |" in core and "| arc_easy | 0.5000 | 0.2500 |" in core
    assert "| CORE | core | 0.1750 |" in core
    assert "Steps: 2/2" in section(rep, "chat_sft")

    # header: machine snapshot of the driver, cost, wall clock from the first to the last event
    ts = [e["ts"] for es in evs.values() for e in es]
    assert f"Total wall-clock time: {fmt_duration(max(ts) - min(ts))}" in rep
    assert "status **succeeded**" in rep and "- CPUs: " in rep and "- Code: " in rep
    assert "Cost: $0.00 (CPU only" in rep  # this machine has no GPU
    state = sv.read_state(d)
    if state["system"]["git"]:
        assert f"commit `{state['system']['git']['commit'][:12]}`" in rep


def test_report_of_a_failed_run(tmp_path, monkeypatch):
    d = run_to_end(tmp_path, monkeypatch, [
        fake("tok_train", "--steps", 1, "--end", "vocab_size=512"),
        fake("base_train", "--steps", 4, "--crash-at", 2),
        fake("base_eval", "--eval", "CORE:core:0.2"),
        fake("chat_eval_sft", "-i", "sft", "--eval", "MMLU:acc:0.3"),
    ])
    st = sv.read_state(d)
    assert st["status"] == "failed"
    assert "status **failed**" in (d / "report.md").read_text()  # written by the driver, no separate command
    rep = build_report(d)
    err = next(e for e in read_events(d / "base_train" / "events.jsonl")[0] if e["kind"] == "error")
    base = section(rep, "base_train")
    assert "Status: **failed**" in base and f"**Error:** {err['exc_type']}: {err['message']}" in base
    assert err["traceback"].rstrip().splitlines()[-1] in base  # the traceback's tail, verbatim
    assert "Steps: 1/4" in base
    assert section(rep, "base_eval").strip() == "_not run_"
    assert section(rep, "chat_eval_sft").strip() == "_not run_"
    assert all(v == "-" for row in summary_cells(rep).values() for v in row)
    assert "Vocabulary size: 512" in section(rep, "tok_train") and "status **failed**" in rep


def write_events(d: Path, stage: str, events: list[dict], junk: str = ""):
    (d / stage).mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"v": 1, "stage": stage, **e}) + "\n" for e in events)
    (d / stage / "events.jsonl").write_text(lines + junk)


def test_cost_is_gpu_hours_of_the_stages_that_ran_times_the_rate(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    t0 = 1_700_000_000.0
    # 1 h of base_train, 30 min with nothing running, 1 h of chat_sft: 2 h of stages on 8 GPUs = 16 GPU-hours
    write_events(d, "base_train", [{"kind": "start", "ts": t0}, {"kind": "step", "ts": t0 + 3600, "step": 1,
                                    "total_steps": 2, "loss": 3.0}])
    write_events(d, "chat_sft", [{"kind": "start", "ts": t0 + 5400}, {"kind": "end", "ts": t0 + 9000, "status": "ok"}],
                 junk='{"kind": "st')  # a torn last line
    gpus = [{"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * 2**30}] * 8
    state = {"run_id": "run", "status": "succeeded", "stages": [], "system": {"gpus": gpus, "cpus": 8, "git": None}}
    (d / "state.json").write_text(json.dumps(state))
    (d / "config.toml").write_text("[run]\ngpu_hourly_usd = -1.0\nnproc_per_node = 8\nnnodes = 1\n")
    rep = build_report(d)
    assert "Cost: $48.00 = 16.00 GPU-hours (8 GPUs × 2.00 h of stages running) × $3.00/GPU-hour " \
           "(typical 2025 on-demand price, nanochat/system.py GPUS (H100))" in rep
    assert "Total wall-clock time: 2h30m" in rep and "8 × NVIDIA H100 80GB HBM3 (80.0 GiB each)" in rep
    assert "Steps: 1/2" in rep and section(rep, "chat_sft").count("malformed") == 0  # torn line: not malformed yet

    (d / "config.toml").write_text("[run]\ngpu_hourly_usd = 2.5\nnproc_per_node = 8\nnnodes = 2\n")
    assert "Cost: $80.00 = 32.00 GPU-hours (16 GPUs × 2.00 h of stages running) × $2.50/GPU-hour " \
           "(run.gpu_hourly_usd in the run's config)" in build_report(d)
    state["system"]["gpus"] = [{"name": "Mystery GPU", "memory_bytes": 1}]
    (d / "state.json").write_text(json.dumps(state))
    (d / "config.toml").write_text("[run]\ngpu_hourly_usd = -1.0\n")
    assert "Cost: unknown (no price for Mystery GPU; set run.gpu_hourly_usd)" in build_report(d)


def test_gpu_names_match_whole_words():
    from nanochat.system import gpu_spec
    assert gpu_hourly_rate("NVIDIA H200") == 3.80 and gpu_hourly_rate("NVIDIA A100-SXM4-80GB") == 1.80
    assert gpu_hourly_rate("NVIDIA A10G") == 0.75 and gpu_hourly_rate("Mystery GPU") is None
    # "L40" is not an "L4", "GH200" not an "H200", and the longest name wins
    assert gpu_spec("NVIDIA L40")[:2] == ("L40", 181e12) and gpu_spec("NVIDIA L4")[:2] == ("L4", 121e12)
    assert gpu_spec("NVIDIA L40S")[0] == "L40S" and gpu_spec("NVIDIA GH200 480GB")[0] == "GH200"
    assert gpu_spec("NVIDIA H100 PCIe")[1] == 756e12 and gpu_spec("NVIDIA H100 80GB HBM3")[1] == 989e12


def test_report_without_state_or_system_snapshot(tmp_path):
    """A directory with only events (e.g. a stage run by hand) still gets a report."""
    d = tmp_path / "manual"
    write_events(d, "base_train", [{"kind": "start", "ts": 1.0}, {"kind": "log", "ts": 2.0, "message": "derived",
                                    "num_params": 999}], junk="garbage line\n")
    rep = build_report(d)
    assert "this is the machine of the report" in rep and "Parameters: 999" in rep
    assert "1 malformed event line(s) skipped" in rep
    assert re.search(r"## base_train\n\nStatus: \*\*run\*\* · time 1s", rep)


def test_error_of_an_earlier_attempt_is_not_reported_after_a_successful_resume(tmp_path):
    import time as _time
    from nanochat.events import EventWriter
    from nanochat.report import build_report
    ev = EventWriter(tmp_path, "base_eval")
    ev.start()
    try:
        raise RuntimeError("bundle missing")
    except RuntimeError as e:
        ev.error(e)
    ev.close()
    _time.sleep(0.01)
    ev = EventWriter(tmp_path, "base_eval")
    ev.start()
    ev.eval(task="val", metric="bpb", value=0.5, phase="base")
    ev.end(status="ok")
    ev.close()
    text = build_report(tmp_path)
    assert "2 attempts (resumed)" in text and "bundle missing" not in text
    # while the failed attempt is the latest, it is reported
    (tmp_path / "base_eval" / "events.jsonl").write_text(
        (tmp_path / "base_eval" / "events.jsonl").read_text().splitlines(keepends=True)[0]
        + (tmp_path / "base_eval" / "events.jsonl").read_text().splitlines(keepends=True)[1])
    assert "RuntimeError: bundle missing" in build_report(tmp_path)


def test_summary_table_takes_chat_evals_that_also_write_centered(tmp_path):
    from nanochat.events import EventWriter
    from nanochat.report import build_report
    base = EventWriter(tmp_path, "base_eval")
    base.start()
    base.eval(task="arc_easy", metric="acc", value=0.40, phase="base", centered=0.2)
    base.eval(task="arc_easy", metric="centered", value=0.20, phase="base")
    base.eval(task="CORE", metric="core", value=0.11, phase="base")
    base.end()
    base.close()
    chat = EventWriter(tmp_path, "chat_eval_sft")
    chat.start()
    chat.eval(task="ARC-Easy", metric="acc", value=0.5, phase="sft", centered=1 / 3)
    chat.eval(task="ARC-Easy", metric="centered", value=1 / 3, phase="sft")
    chat.eval(task="ChatCORE", metric="chatcore", value=1 / 3, phase="sft")
    chat.end()
    chat.close()
    text = build_report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| ARC-Easy |"))
    assert row.split("|")[1:5] == [" ARC-Easy ", " - ", " - ", " 0.5000 "]  # SFT acc; the CORE task is not ARC-Easy BASE
    core = next(line for line in text.splitlines() if line.startswith("| CORE |"))
    assert core.split("|")[2].strip() == "0.1100"


def test_aggregates_say_complete_or_partial_with_the_missing_tasks(tmp_path):
    from nanochat.events import EventWriter
    base = EventWriter(tmp_path, "base_eval")
    base.start()
    base.eval(task="copa", metric="acc", value=0.6, phase="base", source="core_icl/local_data/copa.jsonl", cropped=2)
    base.eval(task="copa", metric="centered", value=0.2, phase="base")
    base.eval(task="CORE", metric="core", value=0.2, phase="base", partial=True, missing=["coqa", "squad"], n=20)
    base.eval(task="val", metric="bpb", value=1.1, phase="base", tokens=1000, tokens_requested=4096, partial=True)
    base.eval(task="train", metric="bpb", value=1.2, phase="base", tokens=4096, tokens_requested=4096, partial=False)
    base.emit("log", message="HumanEval skipped: no local copy", skipped=True)
    base.end()
    base.close()
    for phase, partial in (("mid", False), ("sft", True)):
        chat = EventWriter(tmp_path, f"chat_eval_{phase}")
        chat.start()
        chat.eval(task="SpellingBee", metric="acc", value=0.75, phase=phase)
        chat.eval(task="HumanEval", metric="acc", value=0.1, phase=phase, isolation="reduced" if partial else "full")
        chat.eval(task="HumanEval", metric="centered", value=0.1, phase=phase)
        chat.eval(task="ChatCORE", metric="chatcore", value=0.5, phase=phase, partial=partial, n=6 - partial,
                  missing=["HumanEval"] if partial else [])
        chat.end()
        chat.close()
    rep = build_report(tmp_path)
    cells = summary_cells(rep)
    assert list(cells) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
    assert cells["CORE"] == ["0.2000 (partial)", "-", "-", "-"]
    assert cells["ChatCORE"] == ["-", "0.5000", "0.5000 (partial)", "-"]
    assert cells["SpellingBee"] == ["-", "0.7500", "0.7500", "-"]
    assert "- CORE BASE: partial: 20 of 22 tasks, missing coqa, squad" in rep
    assert "- ChatCORE MID: complete (6 of 6 tasks)" in rep and "- ChatCORE SFT: partial: 5 of 6 tasks, missing HumanEval" in rep
    core = section(rep, "base_eval")
    assert "| copa | 0.6000 | 0.2000 | core_icl/local_data/copa.jsonl; 2 example(s) cropped to the model's context |" in core
    assert "| val | bpb | 1.1000 | partial: 1,000 of the 4,096 tokens asked (the split ran out) |" in core
    assert "| train | bpb | 1.2000 | complete (4,096 tokens) |" in core and "- Skipped: HumanEval skipped: no local" in core
    # a HumanEval that ran model code with reduced isolation says so; a fully isolated one says nothing
    assert "REDUCED sandbox isolation" in section(rep, "chat_eval_sft")
    assert "REDUCED sandbox isolation" not in section(rep, "chat_eval_mid")


def test_an_eval_without_a_phase_is_no_phase_score(tmp_path):
    write_events(tmp_path, "chat_eval_sft", [{"kind": "start", "ts": 1.0},
                                             {"kind": "eval", "ts": 2.0, "task": "MMLU", "metric": "acc", "value": 0.3}])
    assert all(v == "-" for row in summary_cells(build_report(tmp_path)).values() for v in row)
