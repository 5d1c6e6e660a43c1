"""Chat pane against a real (tiny, random-init) checkpoint: checkpoint API -> load_model -> Engine in a
worker thread -> streamed into the screen."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
from fake_run import demo_run
from test_tui import make_app, until

from tui.services import ChatBackend, list_checkpoints

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def real_ckpt_run(tmp_path, tiny_tokenizer_dir):
    import torch
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    r = demo_run(tmp_path / "runs", steps=5)
    shutil.copytree(tiny_tokenizer_dir, r.dir / "tokenizer")
    vocab = Tokenizer.load(r.dir / "tokenizer").get_vocab_size()
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    model.init_weights()
    save_checkpoint(r.dir / "checkpoints" / "sft", 7, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(cfg), "step": 7, "tokenizer_dir": str(r.dir / "tokenizer")})
    return r


async def test_chat_with_a_real_checkpoint(tmp_path, real_ckpt_run):
    r = real_ckpt_run
    assert list_checkpoints(r.dir) == [("sft", 7)]
    app = make_app(tmp_path, chat=ChatBackend)
    app.open_run, app.open_screen = r.dir, "chat"
    async with app.run_test(size=(100, 30)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.backend is not None, timeout=60, what="real checkpoint loaded")
        assert scr.backend.loaded == (str(r.dir), "sft", 7)
        scr.query_one("#temperature").value = "1.0"
        await pilot.press(*"Hello there", "enter")
        await until(pilot, lambda: len(scr.conv["messages"]) == 2, timeout=60, what="reply finished")
        assert not scr.generating and scr.tokens_rendered > 0
        reply = scr.conv["messages"][1]["content"]
        text = reply if isinstance(reply, str) else "".join(p["text"] for p in reply if p["type"] == "text")
        assert text.strip()  # a random model writes something, streamed through the engine
        assert "ready" in str(scr.query_one("#chat-status").content)
