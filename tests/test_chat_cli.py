"""`nanochat chat`: one-shot answers on stdout, checkpoint selection and errors, the interactive loop."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, stage_env
from nanochat import chat_cli


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_tokenizer_dir):
    """A run directory with the tiny tokenizer and random-init base and sft checkpoints."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    run = tmp_path_factory.mktemp("runs") / "20260101-000000-demo"
    shutil.copytree(tiny_tokenizer_dir, run / "tokenizer")
    vocab = Tokenizer.load(run / "tokenizer").get_vocab_size()
    cfg = GPTConfig(sequence_len=96, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    for phase, seed in (("base", 0), ("sft", 1)):
        torch.manual_seed(seed)
        model = GPT(cfg)
        model.init_weights()
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)  # peaked enough that greedy output differs between models
        meta = {"model_config": dataclasses.asdict(cfg), "step": 3, "tokenizer_dir": str(run / "tokenizer")}
        save_checkpoint(run / "checkpoints" / phase, 3, model.state_dict(), None, meta)
    return run


def chat(*args, base_dir):
    return subprocess.run([sys.executable, "-m", "nanochat.chat_cli", *args], cwd=REPO, env=stage_env(base_dir),
                          capture_output=True, text=True, timeout=120)


def expected_reply(run, phase, prompt, max_tokens):
    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine
    model, tok, _ = load_model(run, phase, device="cpu")
    events = Engine(model, tok).stream_chat({"messages": [{"role": "user", "content": prompt}]},
                                            max_tokens=max_tokens, temperature=0.0)
    from nanochat.common import strip_controls
    return strip_controls("".join(e["text"] for e in events if e["type"] == "text"))  # the CLI shows it stripped


def test_prompt_answers_on_stdout(chat_run, tmp_path):
    p = chat("--run", str(chat_run), "-p", "Hello there", "-t", "0", "--max-tokens", "12", base_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    want = expected_reply(chat_run, "sft", "Hello there", 12)  # sft is the most trained stage present
    assert want.strip()
    assert p.stdout == want + "\n"
    # the base stage and a checkpoint path select other weights
    p2 = chat("--run", str(chat_run), "--stage", "base", "-p", "Hello there", "-t", "0", "--max-tokens", "12",
              base_dir=tmp_path)
    assert p2.stdout == expected_reply(chat_run, "base", "Hello there", 12) + "\n"
    assert p2.stdout != p.stdout
    p3 = chat("--ckpt", str(chat_run / "checkpoints" / "base" / "step_000003"), "-p", "Hello there", "-t", "0",
              "--max-tokens", "12", base_dir=tmp_path)
    assert p3.stdout == p2.stdout


def test_same_seed_same_sampled_answer(chat_run, tmp_path):
    args = ("--run", str(chat_run), "-p", "Tell me", "-t", "1.0", "--max-tokens", "10", "--seed", "5")
    a, b = chat(*args, base_dir=tmp_path), chat(*args, base_dir=tmp_path)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_clear_errors(chat_run, tmp_path):
    p = chat("--run", str(chat_run), "--stage", "rl", "-p", "x", base_dir=tmp_path)
    assert p.returncode == 2 and "no rl checkpoints; it has: sft, base" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = chat("--ckpt", str(tmp_path), "-p", "x", base_dir=tmp_path)
    assert p.returncode == 2 and "not a checkpoint directory" in p.stderr
    p = chat("--run", "nope", "-p", "x", base_dir=tmp_path)
    assert p.returncode == 2 and "no runs" in p.stderr
    p = chat("--run", str(chat_run), "--temperature", "-1", "-p", "x", base_dir=tmp_path)
    assert p.returncode == 2 and "--temperature -1.0 must be >= 0" in p.stderr


def test_commands(tmp_path):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    settings = {"temperature": 0.6, "top_k": 50}
    assert chat_cli.command("/temperature 0.2", conv, settings) == "temperature = 0.2" and settings["temperature"] == 0.2
    assert "needs a number" in chat_cli.command("/temperature hot", conv, settings) and settings["temperature"] == 0.2
    assert chat_cli.command("/topk 5", conv, settings) == "top-k = 5" and settings["top_k"] == 5
    assert chat_cli.command("/topk off", conv, settings) == "top-k off" and settings["top_k"] is None
    assert "whole number" in chat_cli.command("/topk -3", conv, settings)
    out = chat_cli.command(f"/save {tmp_path / 'c.json'}", conv, settings)
    assert "saved 2 messages" in out and json.loads((tmp_path / "c.json").read_text()) == conv
    assert "/temperature" in chat_cli.command("/help", conv, settings)
    assert "unknown command /bogus" in chat_cli.command("/bogus", conv, settings)
    assert chat_cli.command("/clear", conv, settings) == "conversation cleared" and conv["messages"] == []


def test_interactive_session(chat_run, tmp_path, monkeypatch, capsys):
    """Drive the prompt_toolkit loop through a pipe: two turns, a command, a save, Ctrl-D."""
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    saved = tmp_path / "conv.json"
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(f"Hello\r/temperature 0\rline one\x1b\rline two\r/save {saved}\r\x04")
        rc = chat_cli.main(["--run", str(chat_run), "--max-tokens", "6"])
    assert rc == 0
    conv = json.loads(saved.read_text())
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][2]["content"] == "line one\nline two"  # Esc Enter made a new line
    out = capsys.readouterr().out
    assert "temperature = 0.0" in out and "nanochat> " in out
    assert (tmp_path / "chat_history").read_text().count("Hello") == 1


class HostileEngine:
    """Streams what a model could write: colours, a clear-screen, a window title, a hyperlink, a bell."""
    def stream_chat(self, conversation, **kw):
        yield {"type": "text", "text": "hi \x1b[2J\x1b[31mred\x1b[0m"}
        yield {"type": "text", "text": "\x1b]0;pwned\x07 bell\x07 cr\r \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ [/]"}
        yield {"type": "tool_call", "code": "print('\x1b[5mblink')"}
        yield {"type": "tool_result", "output": "\x1b[?1049hgone", "status": "ok"}
        yield {"type": "notice", "text": "note\x9b31m"}
        yield {"type": "done", "reason": "stop", "tokens": 5}


def test_model_output_cannot_drive_the_terminal():
    out, side = io.StringIO(), io.StringIO()
    settings = {"max_tokens": 8, "temperature": 0.0, "top_k": None, "seed": 0}
    msg = chat_cli.respond(HostileEngine(), {"messages": []}, settings, out, side, color=True)
    assert out.getvalue() == "hi red bell cr link [/]\n"
    shown = side.getvalue()
    assert "print('blink')" in shown and "[output] gone" in shown and "[notice] note31m" in shown
    # only our own colour codes reach the terminal
    assert set(re.findall(r"\x1b\[[0-9;?]*[A-Za-z]", shown)) <= set(chat_cli.ANSI.values())
    assert "\x07" not in shown + out.getvalue() and "\x1b]" not in shown
    # the conversation keeps the reply as the model wrote it
    assert msg["content"][0]["text"].startswith("hi \x1b[2J")
