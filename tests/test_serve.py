"""`nanochat serve` against a live server on a tiny checkpoint: the OpenAI client, limits, concurrency,
events, restarts. The model is a real GPT scripted to answer every chat with a calculator call
(6*7) and then "Yes 42" (tests/serve_toys.py), so replies are known exactly at temperature 0."""
import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from nanochat.events import read_events
from serve_toys import calculator_script, save_run, scripted_gpt, start_server, stop_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_tokenizer_dir)
    model = scripted_gpt(calculator_script(tok), vocab=tok.get_vocab_size(), seq_len=256)
    run_dir = save_run(tmp_path_factory.mktemp("serve") / "run", model, tiny_tokenizer_dir)
    proc, url = start_server(run_dir, "--api-key", "sekrit", "--max-batch", "8")
    yield run_dir, url, proc
    stop_server(proc)


def client(url, key="sekrit"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(url, body, key="sekrit", raw=None):
    """-> (status, parsed JSON) of POST /v1/chat/completions, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


HI = [{"role": "user", "content": "What is six times seven?"}]


def test_openai_client_gets_a_reply_streamed_and_not(served):
    _, url, _ = served
    c = client(url)
    assert [m.id for m in c.models.list().data][0].startswith("nanochat-run-sft-step1")
    r = c.chat.completions.create(model="nanochat", messages=HI, temperature=0, max_tokens=64)
    assert r.choices[0].message.content == "Yes 42"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts = r.choices[0].message.model_extra["parts"]  # the calculator call, as nanochat's extension
    assert parts[:2] == [{"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42", "status": "ok"}]

    chunks = list(c.chat.completions.create(model="nanochat", messages=HI, temperature=0, max_tokens=64, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Yes 42"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2  # really streamed


def test_sse_wire_format_ends_with_done(served):
    _, url, _ = served
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Bearer sekrit"},
        data=json.dumps({"messages": HI, "stream": True, "temperature": 0, "max_tokens": 3}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.read().decode().split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 3


def test_sampling_options_n_seed_stop_max_tokens(served):
    _, url, _ = served
    c = client(url)
    r = c.chat.completions.create(model="x", messages=HI, temperature=0, stop=[" 4"], max_tokens=64)
    assert r.choices[0].message.content == "Yes" and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="x", messages=HI, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    kw = dict(model="x", messages=HI, temperature=2.0, top_p=0.99, max_tokens=12, n=3, seed=7)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]  # same seed
    assert len({repr(ch.message) for ch in a.choices}) == 3  # seed, seed+1, seed+2: different samples
    status, body = post(url, {"messages": HI, "temperature": 0, "top_k": 0, "max_tokens": 64})  # top_k 0 = off
    assert status == 200 and body["choices"][0]["message"]["content"] == "Yes 42"


@pytest.mark.parametrize("body, status, says", [
    (None, 400, "not valid JSON"),
    ([], 400, "JSON object"),
    ({}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "allowed: system, user, assistant"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "alternate"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "at most 8,000 per message"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "x" * 7000}] * 2
     + [{"role": "user", "content": "x" * 5000}]}, 400, "at most 32,000 allowed"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 250
     + [{"role": "user", "content": "x"}]}, 400, "at most 500 allowed"),
    ({"messages": HI, "temperature": 2.5}, 400, "temperature=2.5 is out of range: allowed [0, 2]"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature must be a number"),
    ({"messages": HI, "top_k": 201}, 400, "top_k=201 is out of range"),
    ({"messages": HI, "top_p": 0}, 400, "top_p=0 is out of range"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens=0 is out of range: allowed [1, 4096]"),
    ({"messages": HI, "max_tokens": 4097}, 400, "max_tokens=4097"),
    ({"messages": HI, "n": 9}, 400, "n=9"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be"),
    ({"messages": HI, "seed": "x"}, 400, "seed must be an integer"),
    ({"messages": HI, "stream": "yes"}, 400, "stream must be true or false"),
])
def test_malformed_and_over_limit_requests_get_4xx_with_the_reason(served, body, status, says):
    _, url, proc = served
    got, err = post(url, body, raw=b"{not json" if body is None else None)
    assert got == status and says in err["error"]["message"], err
    assert "\n" not in err["error"]["message"]
    assert proc.poll() is None


def test_auth_body_size_and_unknown_routes(served):
    _, url, _ = served
    status, err = post(url, {"messages": HI}, key="wrong")
    assert status == 401 and "API key" in err["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").chat.completions.create(model="x", messages=HI)
    status, err = post(url, None, raw=b" " * ((1 << 20) + 1))
    assert status == 413 and "bytes" in err["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v2/nothing", timeout=10)
    assert e.value.code in (401, 404)
    with urllib.request.urlopen(url + "/health", timeout=10) as r:  # open without the key
        assert json.loads(r.read())["status"] == "ok"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(url).chat.completions.create(model="x", messages=HI, temperature=3)


def test_sixteen_concurrent_clients_all_get_complete_replies(served):
    _, url, _ = served
    replies, errors = {}, []

    def one(i):
        try:
            c = client(url)
            if i % 2:
                stream = c.chat.completions.create(model="x", messages=HI, temperature=0, max_tokens=64, stream=True)
                replies[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            else:
                replies[i] = c.chat.completions.create(model="x", messages=HI, temperature=0,
                                                       max_tokens=64).choices[0].message.content
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    before = json.loads(urllib.request.urlopen(urllib.request.Request(
        url + "/stats", headers={"Authorization": "Bearer sekrit"}), timeout=10).read())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and sorted(replies) == list(range(16))
    assert set(replies.values()) == {"Yes 42"}
    stats = json.loads(urllib.request.urlopen(urllib.request.Request(
        url + "/stats", headers={"Authorization": "Bearer sekrit"}), timeout=10).read())
    assert stats["ok"] - before["ok"] == 16 and stats["in_flight"] == 0
    w = stats["workers"][0]
    assert w["mean_batch"] > 1 and w["active"] == 0, stats  # they really shared decode steps


def test_events_log_requests_without_message_bodies(served):
    run_dir, url, _ = served
    post(url, {"messages": [{"role": "user", "content": "my secret question"}], "temperature": 0})
    time.sleep(0.2)
    evs, bad = read_events(run_dir / "serve" / "events.jsonl")
    assert bad == 0 and evs[0]["kind"] == "start" and evs[0]["url"] == url
    reqs = [e for e in evs if e["kind"] == "log" and e["message"] == "request"]
    assert {e["status"] for e in reqs} >= {200, 400, 413}
    assert all("prompt_tokens" in e for e in reqs if e["status"] == 200)
    assert "my secret question" not in (run_dir / "serve" / "events.jsonl").read_text()
    info = json.loads((run_dir / "serve" / "server.json").read_text())
    assert info["url"] == url and info["api_key"] is True and "sekrit" not in json.dumps(info)


@pytest.mark.slow
def test_restart_keeps_nothing_half_written(tmp_path, tiny_tokenizer_dir):
    """Killed (SIGKILL) mid-stream, then started again: the events file holds only whole lines, server.json
    is the new server's, and the new server answers; a SIGTERM'd server finishes with an `end` event and
    removes its server.json; --log-messages puts the messages in the log."""
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_tokenizer_dir)
    model = scripted_gpt(calculator_script(tok), vocab=tok.get_vocab_size(), seq_len=256)
    run_dir = save_run(tmp_path / "run", model, tiny_tokenizer_dir)
    proc, url = start_server(run_dir)
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"messages": HI, "stream": True, "temperature": 1.0,
                                                              "max_tokens": 200}).encode())
    r = urllib.request.urlopen(req, timeout=60)
    assert r.readline().startswith(b"data: ")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    r.close()
    proc2, url2 = start_server(run_dir, "--log-messages")
    try:
        assert json.loads((run_dir / "serve" / "server.json").read_text())["pid"] == proc2.pid
        status, body = post(url2, {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0})
        assert status == 200 and body["choices"][0]["message"]["content"] == "Yes 42"
    finally:
        log = stop_server(proc2)
    assert proc2.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert "hello there" in log  # --log-messages
    text = (run_dir / "serve" / "events.jsonl").read_text()
    assert text.endswith("\n")
    evs, bad = read_events(run_dir / "serve" / "events.jsonl")
    assert bad == 0
    assert [e["kind"] for e in evs].count("start") == 2 and evs[-1]["kind"] == "end" and evs[-1]["ok"] == 1
    assert not (run_dir / "serve" / "server.json").exists()
    assert not list((run_dir / "serve").glob(".*tmp*"))


def test_command_line_errors_are_one_line(served, tmp_path):
    import subprocess
    import sys
    run_dir, url, _ = served
    assert url.startswith("http://127.0.0.1:")  # binds this machine only unless --host says otherwise
    for args, says in ((["--gpus", "2", "--device", "cpu"], "--gpus 2 needs 2 CUDA devices"),
                       (["--port", "70000"], "--port 70000 must be in 0..65535"),
                       (["--stage", "rl"], "has no rl checkpoints")):
        p = subprocess.run([sys.executable, "-m", "nanochat.cli", "serve", "--run", str(run_dir), "--port", "0", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and says in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
