"""`nanochat serve`: a web chat and an OpenAI-compatible API for a trained model.

    nanochat serve                                   # newest run, most trained stage, http://127.0.0.1:8000
    nanochat serve --run R --stage sft --port 8080 --gpus 8 --api-key SECRET

Routes: `/` the chat page (nanochat/chat.html, one offline file), `POST /v1/chat/completions` (OpenAI's
chat API, streamed as server-sent events ending in `data: [DONE]`, or not), `GET /v1/models`, `/health`,
`/stats`. One worker (a model copy and a batching Scheduler, nanochat/batching.py) per GPU; a request
goes to the least loaded worker, and concurrent requests on a worker share its decode steps.

Abuse limits (from the seed's web chat): at most 500 messages, 8,000 characters per message, 32,000 in
all; temperature 0-2, top_k 0-200 (0 = off), max_tokens 1-4,096, n 1-8, 4 stop strings. Anything outside
them or malformed gets a 4xx with one line saying what is wrong. Events go to <run_dir>/serve/events.jsonl
(docs/events.md); <run_dir>/serve/server.json says where a running server listens. Docs: docs/serve.md.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import random
import socket
import sys
import time
import uuid
from pathlib import Path

MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8_000, 32_000
TEMPERATURE, TOP_K, TOP_P, MAX_TOKENS, N = (0.0, 2.0), (0, 200), (0.0, 1.0), (1, 4096), (1, 8)
MAX_STOP, MAX_BODY_BYTES, MAX_QUEUED = 4, 1 << 20, 256
DEFAULTS = {"temperature": 0.6, "top_k": 50, "top_p": None, "max_tokens": 512}  # as `nanochat chat`
PAGE = Path(__file__).with_name("chat.html")
log = logging.getLogger("nanochat.serve")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


# ----------------------------------------------------------------------------- request validation

def _number(body, name, lo, hi, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", param=name)
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise BadRequest(f"{name}={v} is out of range: allowed {'(' if lo_open else '['}{lo:g}, {hi:g}]", param=name)
    return v


def _content(i: int, m: dict) -> str | list:
    """A message's content as the tokenizer takes it: a str, or for the assistant a list of
    text/python/python_output parts (how the chat page sends back earlier tool calls)."""
    role, c = m["role"], m.get("content")
    if isinstance(c, str):
        return c
    if not isinstance(c, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in c):
        raise BadRequest(f"messages[{i}].content must be a string or a list of {{type, text}} parts", param="messages")
    allowed = ("text", "python", "python_output") if role == "assistant" else ("text",)
    for p in c:
        if p.get("type") not in allowed:
            raise BadRequest(f"messages[{i}].content has a part of type {p.get('type')!r}; allowed for {role}: "
                             f"{', '.join(allowed)}", param="messages")
    if role != "assistant" or all(p["type"] == "text" for p in c):
        return "".join(p["text"] for p in c)
    return [{"type": p["type"], "text": p["text"]} for p in c]


def parse_request(raw: bytes) -> dict:
    """The body of POST /v1/chat/completions -> validated settings, or BadRequest naming what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body has {len(raw):,} bytes; at most {MAX_BODY_BYTES:,} allowed", 413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", param="messages")
    if len(msgs) > MAX_MESSAGES:
        raise BadRequest(f"{len(msgs)} messages; at most {MAX_MESSAGES} allowed", param="messages")
    messages, total = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            raise BadRequest(f"messages[{i}].role is {json.dumps(role)}; allowed: system, user, assistant",
                             param="messages")
        content = _content(i, m)
        chars = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
        if chars > MAX_MESSAGE_CHARS:
            raise BadRequest(f"messages[{i}] has {chars:,} characters; at most {MAX_MESSAGE_CHARS:,} per message",
                             param="messages")
        total += chars
        messages.append({"role": m["role"], "content": content})
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"the messages have {total:,} characters in all; at most {MAX_TOTAL_CHARS:,} allowed",
                         param="messages")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's (the reply is the assistant's next turn)",
                         param="messages")
    if "model" in body and not isinstance(body["model"], str):
        raise BadRequest("model must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP
                                 and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", param="seed")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    max_tokens = _number(body, "max_completion_tokens", *MAX_TOKENS, integer=True)
    max_tokens = _number(body, "max_tokens", *MAX_TOKENS, integer=True) or max_tokens
    top_k = _number(body, "top_k", *TOP_K, integer=True)
    temperature = _number(body, "temperature", *TEMPERATURE)
    top_p = _number(body, "top_p", *TOP_P, lo_open=True)
    return {
        "messages": messages, "stream": stream, "stop": stop or [], "n": _number(body, "n", *N, integer=True) or 1,
        "seed": seed, "include_usage": bool(options.get("include_usage")),
        "temperature": DEFAULTS["temperature"] if temperature is None else float(temperature),
        "top_k": DEFAULTS["top_k"] if top_k is None else (top_k or None),
        "top_p": None if top_p is None or top_p >= 1 else float(top_p),
        "max_tokens": max_tokens or DEFAULTS["max_tokens"],
    }


class StopFilter:
    """Cuts a streamed text at the first stop string, holding back a tail that may be a stop's start."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.hit = stops, "", False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[:min(found)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ----------------------------------------------------------------------------- the server

class Server:
    """The workers, counters and event log behind the routes."""

    def __init__(self, schedulers, model_name: str, run_dir: Path | None = None, api_key: str | None = None,
                 log_messages: bool = False):
        from nanochat.events import EventWriter
        self.workers, self.model_name, self.api_key, self.log_messages = schedulers, model_name, api_key, log_messages
        self.run_dir = run_dir
        self.events = EventWriter(run_dir, "serve")
        self.started = time.time()
        self.counts = {"requests": 0, "ok": 0, "rejected": 0, "failed": 0, "in_flight": 0,
                       "prompt_tokens": 0, "completion_tokens": 0}

    # -- bookkeeping: everything below runs on the event loop's thread, so plain dicts are enough
    def served(self, status: int, fields: dict, messages=None):
        c = self.counts
        c["ok" if status == 200 else "rejected" if status < 500 else "failed"] += 1
        c["prompt_tokens"] += fields.get("prompt_tokens", 0)
        c["completion_tokens"] += fields.get("completion_tokens", 0)
        line = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("POST /v1/chat/completions %d %s%s", status, line,
                 f" messages={json.dumps(messages, ensure_ascii=False)}" if messages is not None else "")
        self.events.emit("log", message="request", status=status, **fields)

    def stats(self) -> dict:
        workers = []
        for w in self.workers:
            s = w.stats
            workers.append({"device": str(w.device), "active": len(w.rows), "queued": len(w.inbox),
                            "rows": s["rows"], "tokens": s["tokens"], "steps": s["steps"], "errors": s["errors"],
                            "mean_batch": round(s["row_steps"] / s["steps"], 2) if s["steps"] else None})
        return {"model": self.model_name, "uptime_s": round(time.time() - self.started, 1), **self.counts,
                "workers": workers}

    def least_loaded(self):
        return min(self.workers, key=lambda w: w.load())

    def close(self):
        self.events.end(**{k: v for k, v in self.counts.items() if k != "in_flight"})
        self.events.close()
        for w in self.workers:
            w.close()


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def create_app(server: Server, on_stop=None):
    """The FastAPI app; `on_stop()` runs at shutdown (uvicorn re-raises SIGTERM after it, so a `finally`
    around uvicorn's run would never run)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        yield
        if on_stop is not None:
            on_stop()

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    def fail(message, status=400, param=None):
        return JSONResponse(error_body(message, status, param), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404/405 in the same one-line shape as everything else
        return fail(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        log.exception("unexpected error on %s", request.url.path)
        server.events.emit("error", exc_type=type(exc).__name__, message=str(exc)[:500], path=request.url.path)
        return fail(f"internal error: {type(exc).__name__}: {exc}"[:300], 500)

    def authorized(request) -> bool:
        if not server.api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {server.api_key}".encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.time()
        open_paths = ("/", "/health", "/favicon.ico")
        if request.url.path not in open_paths and not authorized(request):
            response = fail("missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401)
        else:
            response = await call_next(request)
        if request.url.path != "/v1/chat/completions" or response.status_code == 401:
            log.info("%s %s %d %.3fs", request.method, request.url.path, response.status_code, time.time() - t0)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        alive = all(w.thread.is_alive() for w in server.workers)
        return JSONResponse({"status": "ok" if alive else "degraded", "model": server.model_name,
                             "workers": len(server.workers)}, status_code=200 if alive else 503)

    @app.get("/stats")
    async def stats():
        return server.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": int(server.started), "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.time()
        server.counts["requests"] += 1
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise BadRequest(f"the request body is over {MAX_BODY_BYTES:,} bytes", 413)
            req = parse_request(await request.body())
            worker = server.least_loaded()
            if sum(w.load() for w in server.workers) >= MAX_QUEUED:
                raise BadRequest(f"the server is busy ({MAX_QUEUED} requests in progress); retry shortly", 429)
            reserve = min(req["max_tokens"], worker.context // 4)
            try:
                ids, notice = worker.engine.fit_conversation({"messages": req["messages"]}, reserve)
            except ValueError as e:
                raise BadRequest(str(e).splitlines()[0], param="messages") from None
        except BadRequest as e:
            server.served(e.status, {"reason": str(e)})
            return fail(str(e), e.status, e.param)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seed = req["seed"] if req["seed"] is not None else random.getrandbits(62)
        rows = []
        try:
            for i in range(req["n"]):
                emit = (lambda i: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))(i)
                rows.append(worker.submit(ids, emit, max_tokens=req["max_tokens"], temperature=req["temperature"],
                                          top_k=req["top_k"], top_p=req["top_p"], seed=(seed + i) % (1 << 63)))
        except ValueError as e:  # what the engine refuses to generate from (e.g. no room left in the context)
            for r in rows:
                worker.cancel(r)
            server.served(400, {"reason": str(e)})
            return fail(str(e).splitlines()[0], 400, "messages")
        reply = Reply(server, worker, rows, queue, req, len(ids), notice, t0)
        if req["stream"]:
            return StreamingResponse(reply.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body, status = await reply.whole()
        return JSONResponse(body, status_code=status)

    return app


class Reply:
    """One request's choices, read from the worker's events: as a whole response or as SSE chunks."""

    def __init__(self, server, worker, rows, queue, req, prompt_tokens, notice, t0):
        self.server, self.worker, self.rows, self.queue, self.req = server, worker, rows, queue, req
        self.prompt_tokens, self.notice, self.t0 = prompt_tokens, notice, t0
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        n = len(rows)
        self.filters = [StopFilter(req["stop"]) for _ in range(n)]
        self.texts, self.parts = [""] * n, [[] for _ in range(n)]
        self.finish, self.tokens, self.error = [None] * n, [0] * n, None
        self.first_token = None
        server.counts["in_flight"] += 1

    async def events(self):
        """(index, kind, payload) as the rows produce them; ends when every choice has finished."""
        while None in self.finish:
            i, ev = await self.queue.get()
            if self.finish[i] is not None:
                continue  # events after a stop string cut the choice short
            if self.first_token is None:
                self.first_token = time.time()
            kind = ev["type"]
            if kind == "text":
                text = self.filters[i].push(ev["text"])
                if self.filters[i].hit:
                    self.worker.cancel(self.rows[i])
                    self.finish[i] = "stop"
                if text:
                    yield i, "text", text
                if self.finish[i]:
                    yield i, "finish", "stop"
            elif kind in ("tool_call", "tool_result"):
                tail = self.filters[i].flush()
                if tail:
                    yield i, "text", tail
                part = {"type": "python", "text": ev["code"]} if kind == "tool_call" else \
                    {"type": "python_output", "text": ev["output"], "status": ev["status"]}
                yield i, "part", part
            elif kind == "done":
                tail = self.filters[i].flush()
                if tail:
                    yield i, "text", tail
                self.tokens[i] = ev["tokens"]
                self.finish[i] = "stop" if ev["reason"] in ("stop", "cancelled") else "length"
                yield i, "finish", self.finish[i]
            elif kind == "error":
                self.error = ev["message"]
                self.finish[i] = "error"
                yield i, "error", ev["message"]

    def _record(self, i, kind, payload):
        if kind == "text":
            self.texts[i] += payload
            if self.parts[i] and self.parts[i][-1]["type"] == "text":
                self.parts[i][-1]["text"] += payload
            else:
                self.parts[i].append({"type": "text", "text": payload})
        elif kind == "part":
            self.parts[i].append(payload)

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def _served(self, status: int, stream: bool):
        s = self.server
        s.counts["in_flight"] -= 1
        fields = {"stream": stream, "n": len(self.rows), "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": sum(self.tokens), "finish": ",".join(f or "cancelled" for f in self.finish),
                  "ttft_s": round(self.first_token - self.t0, 3) if self.first_token else None,
                  "elapsed_s": round(time.time() - self.t0, 3)}
        if self.error:
            fields["error"] = self.error[:300]
            s.events.emit("error", exc_type="WorkerError", message=self.error[:500])
        s.served(status, fields, self.req["messages"] if s.log_messages else None)

    def _cancel_all(self):
        for r in self.rows:
            self.worker.cancel(r)

    async def whole(self) -> tuple[dict, int]:
        try:
            async for i, kind, payload in self.events():
                self._record(i, kind, payload)
        except asyncio.CancelledError:
            self._cancel_all()
            raise
        if self.error:
            self._served(500, stream=False)
            return error_body(f"the model worker failed: {self.error}"[:300], 500), 500
        choices = []
        for i in range(len(self.rows)):
            message = {"role": "assistant", "content": self.texts[i]}
            if any(p["type"] != "text" for p in self.parts[i]):
                message["parts"] = self.parts[i]  # nanochat's extension: the calculator calls and their output
            choices.append({"index": i, "message": message, "finish_reason": self.finish[i], "logprobs": None})
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.server.model_name,
                "choices": choices, "usage": self.usage()}
        if self.notice:
            body["notice"] = self.notice
        self._served(200, stream=False)
        return body, 200

    def _chunk(self, choices: list, **extra) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.model_name, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self):
        status = 200
        try:
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                               for i in range(len(self.rows))], **({"notice": self.notice} if self.notice else {}))
            async for i, kind, payload in self.events():
                self._record(i, kind, payload)
                if kind == "text":
                    yield self._chunk([{"index": i, "delta": {"content": payload}, "finish_reason": None}])
                elif kind == "part":
                    yield self._chunk([{"index": i, "delta": {"parts": [payload]}, "finish_reason": None}])
                elif kind == "finish":
                    last = None not in self.finish and not self.req["include_usage"]
                    yield self._chunk([{"index": i, "delta": {}, "finish_reason": payload}],
                                      **({"usage": self.usage()} if last else {}))
                elif kind == "error":
                    status = 500
                    yield f"data: {json.dumps(error_body(f'the model worker failed: {payload}'[:300], 500))}\n\n"
            if self.req["include_usage"]:
                yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away: free its rows
            self._cancel_all()
            raise
        finally:
            self._served(status, stream=True)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    from nanochat.chat_cli import STAGES
    p = argparse.ArgumentParser(prog="nanochat serve", description="web chat + OpenAI-compatible API for a model")
    p.add_argument("--run", help="run id, unique prefix, path, or 'latest' (default: the newest run)")
    p.add_argument("--stage", choices=STAGES, help="which checkpoints to serve (default: the most trained one)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--ckpt", help="a checkpoint directory (checkpoints/<phase> or .../step_XXXXXX) instead of --run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--gpus", type=int, default=1, help="one model copy and worker per GPU (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--max-batch", type=int, default=16, help="most chats decoded together per worker (default 16)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $NANOCHAT_API_KEY, else none)")
    p.add_argument("--log-messages", action="store_true", help="also log the messages of each request")
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error(f"--port {a.port} must be in 0..65535")
    if a.gpus < 1:
        p.error(f"--gpus {a.gpus} must be >= 1")
    if not 1 <= a.max_batch <= 256:
        p.error(f"--max-batch {a.max_batch} must be in 1..256")
    if a.ckpt and (a.run or a.stage):
        p.error("--ckpt names the checkpoint itself; don't combine it with --run or --stage")
    return a


def load_workers(a):
    """-> (schedulers, model name, run dir): one model copy per device."""
    import torch
    from nanochat.batching import Scheduler
    from nanochat.chat_cli import locate
    from nanochat.checkpoint import load_model
    from nanochat.common import autodetect_device_type, die
    directory, phase, step = locate(a)
    device = a.device or autodetect_device_type()
    if a.gpus > 1:
        have = torch.cuda.device_count() if device == "cuda" else 0
        if have < a.gpus:
            die(f"--gpus {a.gpus} needs {a.gpus} CUDA devices; found {have} (device {device})")
        devices = [f"cuda:{i}" for i in range(a.gpus)]
    else:
        devices = [device]
    workers = []
    for i, d in enumerate(devices):
        try:
            model, tokenizer, meta = load_model(directory, phase, step=step, device=d)
        except (FileNotFoundError, ValueError) as e:
            die(f"could not load the {phase} checkpoint from {directory}: {e}")
        workers.append(Scheduler(model, tokenizer, max_batch=a.max_batch, name=f"worker{i}"))
    directory = Path(directory)
    run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else directory
    return workers, f"nanochat-{run_dir.name}-{phase}-step{meta.get('step', step)}", run_dir


def main(argv: list[str]) -> int:
    import uvicorn
    from nanochat.common import atomic_write, die
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))
        sock.listen(128)  # early clients wait in the backlog instead of being refused
    except OSError as e:
        die(f"cannot listen on {a.host}:{a.port}: {e.strerror} (pick another with --port, 0 = any free one)")
    workers, name, run_dir = load_workers(a)
    port = sock.getsockname()[1]
    url = f"http://{'[' + a.host + ']' if ':' in a.host else a.host}:{port}"
    server = Server(workers, name, run_dir, api_key=a.api_key, log_messages=a.log_messages)
    info = {"url": url, "pid": os.getpid(), "host": a.host, "port": port, "model": name, "started": server.started,
            "workers": [str(w.device) for w in workers], "api_key": bool(a.api_key)}
    server.events.start(argv=list(argv), device=info["workers"][0], url=url, model=name, workers=len(workers))
    server.events.config({"serve": {k: v for k, v in vars(a).items() if k != "api_key"}})
    where = run_dir / "serve" / "server.json"
    atomic_write(where, json.dumps(info, indent=1))  # replaced whole, never half-written
    print(f"nanochat serve: {name}\n  chat page  {url}/\n  API        {url}/v1  (OpenAI chat completions)"
          + ("\n  API key required (Authorization: Bearer ...)" if a.api_key else ""), flush=True)

    def stop():
        try:
            if json.loads(where.read_text()).get("pid") == os.getpid():  # not a newer server's
                where.unlink()
        except (OSError, ValueError):
            pass
        server.close()

    app = create_app(server, on_stop=stop)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
