"""stages.tok_train and stages.tok_eval end to end on a tiny corpus: files, events, errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_stage, stage_env  # noqa: E402

from nanochat.config import load_config
from nanochat.events import read_events
from nanochat.tokenizer import Tokenizer


def make_run(tmp_path, data_dir, *overrides) -> tuple[Path, Path]:
    run_dir, base = tmp_path / "run", tmp_path / "base"
    base.mkdir()
    load_config("demo", [f"data.dir={data_dir}", *overrides]).save(run_dir / "config.toml")
    return run_dir, base


def test_tok_train_then_tok_eval(tmp_path, tiny_corpus):
    run_dir, base = make_run(tmp_path, tiny_corpus, "tokenizer.vocab_size=400", "tokenizer.doc_cap=200")
    run_stage("stages.tok_train", run_dir, base_dir=base)
    tok = Tokenizer.load(run_dir / "tokenizer")
    assert tok.get_vocab_size() <= 400
    events, bad = read_events(run_dir / "tok_train" / "events.jsonl")
    assert not bad and [e["kind"] for e in events][:2] == ["start", "config"] and events[-1]["kind"] == "end"
    phases = [e.get("phase") for e in events if e["kind"] == "log"]
    assert "read" in phases and "count" in phases and "done" in phases
    end = events[-1]
    assert end["status"] == "ok" and end["vocab_size"] == tok.get_vocab_size() and end["merges"] == len(tok.merges)
    assert end["capped_docs"] > 0 and end["train_chars"] > 0 and end["replaced_utf8"] == 0

    run_stage("stages.tok_eval", run_dir, base_dir=base)
    events, _ = read_events(run_dir / "tok_eval" / "events.jsonl")
    evals = {e["text"]: e for e in events if e["kind"] == "eval"}
    assert set(evals) == {"prose", "code", "math", "multilingual", "train", "val"}
    for e in evals.values():
        assert e["task"] == "compression" and e["metric"] == "bytes_per_token"
        assert e["value"] == round(e["bytes"] / e["tokens"], 4) and e["value"] >= 1.0
    assert evals["train"]["value"] > evals["multilingual"]["value"]  # trained on it: compresses best
    assert events[-1]["bytes_per_token_val"] == evals["val"]["value"]


def test_invalid_utf8_in_files_is_replaced_and_counted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(b"caf\xc3\xa9 ok\n\nbad \xff\xfe bytes\n\ntrunc \xe4\xb8\n\n" * 50)
    (data / "b.txt").write_bytes(b"validation \xff")
    run_dir, base = make_run(tmp_path, data, "tokenizer.vocab_size=300")
    run_stage("stages.tok_train", run_dir, base_dir=base)
    events, _ = read_events(run_dir / "tok_train" / "events.jsonl")
    assert events[-1]["replacement_chars"] == 3 * 50
    assert any("U+FFFD" in e.get("message", "") for e in events)
    tok = Tokenizer.load(run_dir / "tokenizer")
    assert tok.decode(tok.encode("bad \ufffd\ufffd")) == "bad \ufffd\ufffd"


def test_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n\n  \n")
    (empty / "b.txt").write_text("\n")
    run_dir, base = make_run(tmp_path, empty)
    p = run_stage("stages.tok_train", run_dir, base_dir=base, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "nanochat: error: the tokenizer training corpus is empty: the text iterator yielded no characters")
    p = run_stage("stages.tok_eval", run_dir, base_dir=base, check=False)
    assert p.returncode == 2 and "no tokenizer at" in p.stderr and "tok_train" in p.stderr.splitlines()[-1]


def test_sigterm_stops_training_without_saving(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    words = [f"w{i:05d}" for i in range(20_000)]
    (data / "a.txt").write_text("\n\n".join(" ".join(words[i:i + 50]) for i in range(0, 20_000, 50)) * 200)  # 28 MB
    (data / "b.txt").write_text("validation")
    run_dir, base = make_run(tmp_path, data, "tokenizer.max_chars=100000000")
    proc = subprocess.Popen([sys.executable, "-m", "stages.tok_train", "--run-dir", str(run_dir)],
                            env=stage_env(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the first progress line (8 MB of 28 MB read), then ask it to stop
        if "characters read" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    events, _ = read_events(run_dir / "tok_train" / "events.jsonl")
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "stopped"
    assert not (run_dir / "tokenizer" / "tokenizer.json").exists()
