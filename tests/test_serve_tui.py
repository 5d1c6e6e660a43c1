"""The TUI's serve screen: F6 opens it for the current run; s starts `nanochat serve` for the chosen
checkpoint, the screen shows the URL and counts the requests served; x stops the server."""
import json
import time
import urllib.request

import pytest

from fake_run import demo_run
from serve_toys import calculator_script, save_run, scripted_gpt
from test_tui import make_app, text_of, until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_serve_screen_starts_counts_and_stops_a_server(tmp_path, tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    from tui.screens.serve import ServeScreen, server_info
    tok = Tokenizer.load(tiny_tokenizer_dir)
    run = demo_run(tmp_path / "runs")
    save_run(run.dir, scripted_gpt(calculator_script(tok), vocab=tok.get_vocab_size(), seq_len=256),
             tiny_tokenizer_dir, phase="sft")
    app = make_app(tmp_path, open_run=run.dir)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: getattr(app.screen, "run_dir", None) == run.dir, what="dashboard open")
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, ServeScreen), what="serve screen")
        screen = app.screen
        status = screen.query_one("#serve-status")
        await until(pilot, lambda: "not serving" in text_of(status), what="status shown")
        screen.query_one("#serve-port").value = "0"  # any free port
        screen.set_focus(None)
        await pilot.press("s")
        try:
            await until(pilot, lambda: server_info(run.dir) is not None and "chat page" in text_of(status),
                        timeout=180, what="server listening")
            url = server_info(run.dir)["url"]
            assert url in text_of(status) and "sft" in text_of(status)
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 0}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["choices"][0]["message"]["content"] == "Yes 42"
            await until(pilot, lambda: "1 served" in text_of(status), timeout=10, what="request counted")
        finally:
            await pilot.press("x")
            proc = screen.proc
            t = time.monotonic()
            while proc.poll() is None and time.monotonic() - t < 60:
                await pilot.pause(0.2)
        assert proc.poll() is not None and server_info(run.dir) is None
        await until(pilot, lambda: "not serving" in text_of(status), what="shown as stopped")
