"""Chat with a checkpoint of the run. The Engine runs in a worker thread and posts each item it streams;
text goes to a Markdown stream, which coalesces whatever arrives while the widget is still rendering, so
typing never waits on generation. Tool calls render as collapsible blocks (code + result). Everything the
model or a tool wrote is shown as text (Markdown for the reply), never as Textual markup."""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Collapsible, Footer, Header, Input, Label, Markdown, Select, Static
from textual.worker import Worker, get_current_worker

from nanochat.common import atomic_write, strip_controls

from ..dialogs import PickScreen
from ..services import list_checkpoints

STOP_REASONS = {"max_tokens": "max tokens", "context": "context full", "stopped": "stopped"}  # the engine's and ours


def conversation_to_markdown(conv: dict, title: str = "") -> str:
    out = [f"# {title or 'nanochat conversation'}", ""]
    for m in conv["messages"]:
        out.append(f"## {m['role']}")
        out.append("")
        content = m["content"]
        if isinstance(content, str):
            out += [content, ""]
            continue
        for part in content:
            if part["type"] == "text":
                out += [part["text"], ""]
            elif part["type"] == "python":
                out += ["```python", part["text"].rstrip(), "```", ""]
            else:
                out += ["```text", part["text"].rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def parse_settings(temp_text: str, topk_text: str) -> tuple[float, int | None]:
    """Temperature in [0, 2], top-k a positive integer or empty for none; one-line errors otherwise."""
    try:
        temp = float(temp_text or "0.6")
    except ValueError:
        raise ValueError(f"temperature {temp_text!r} is not a number; use 0 to 2 (0 = greedy)") from None
    if not 0 <= temp <= 2:
        raise ValueError(f"temperature {temp} is out of range; use 0 to 2 (0 = greedy)")
    if not topk_text.strip():
        return temp, None
    try:
        k = int(topk_text)
    except ValueError:
        raise ValueError(f"top-k {topk_text!r} is not an integer; use a positive integer or leave it empty") from None
    if k < 1:
        raise ValueError(f"top-k {k} must be at least 1 (leave it empty for no top-k)")
    return temp, k


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(strip_controls(text), markup=False)


class Notice(Static):
    def __init__(self, text: str):
        super().__init__(strip_controls(text), markup=False, classes="notice")


class StreamItem(Message):
    """One item of the engine's stream, from the generation worker."""
    def __init__(self, item: dict, worker: Worker):
        super().__init__()
        self.item, self.worker = item, worker


class AssistantMessage(Vertical):
    """One assistant turn: Markdown text segments interleaved with tool-call blocks."""

    def __init__(self):
        super().__init__()
        self.parts: list[dict] = []
        self._md: Markdown | None = None
        self._stream = None
        self._tool: Collapsible | None = None

    async def add_text(self, text: str):
        if self._md is None:
            self._md = Markdown("")
            await self.mount(self._md)
            self._stream = Markdown.get_stream(self._md)
            self.parts.append({"type": "text", "text": ""})
        self.parts[-1]["text"] += text
        await self._stream.write(strip_controls(text))

    async def _close_text(self):
        if self._stream is not None:
            await self._stream.stop()
        self._md, self._stream = None, None

    async def add_tool_call(self, code: str):
        await self._close_text()
        code_shown = strip_controls(code)
        first = code_shown.strip().splitlines()[0][:50] if code_shown.strip() else ""
        self._tool = Collapsible(Static(code_shown.rstrip(), classes="tool-code", markup=False),
                                 title=Content(f"python: {first}"), collapsed=False, classes="tool")
        await self.mount(self._tool)
        self.parts.append({"type": "python", "text": code})

    async def add_tool_result(self, output: str, status: str, isolation: str = "full"):
        if self._tool is None:
            await self.add_tool_call("")
        await self._tool.query_one(Collapsible.Contents).mount(
            Static(f"→ {strip_controls(output).rstrip() or '(no output)'}", classes=f"tool-result {status}",
                   markup=False))
        shown = status if isolation != "reduced" else f"{status}, reduced isolation"  # never hide a weaker sandbox
        self._tool.title = Content.from_text(self._tool.title) + Content(f"  → {shown}")
        self._tool = None
        self.parts.append({"type": "python_output", "text": output})

    async def finish(self, reason: str):
        await self._close_text()
        if reason != "stop":
            await self.mount(Notice(f"[{STOP_REASONS.get(reason, reason)}]"))

    def content(self):
        if len(self.parts) == 1 and self.parts[0]["type"] == "text":
            return self.parts[0]["text"]
        return [p for p in self.parts if p["type"] != "text" or p["text"]]


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back", id="chat.back"),
        Binding("ctrl+g", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("ctrl+t", "edit", "Edit previous", id="chat.edit"),
        Binding("ctrl+o", "save", "Save", id="chat.save"),
        Binding("ctrl+l", "load", "Load", id="chat.load"),
        Binding("ctrl+y", "export", "Export .md", id="chat.export"),
        Binding("ctrl+n", "new", "New chat", id="chat.new"),
    ]
    FLUSH_S = 0.05  # the reply's text reaches the screen at most 20 times a second

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.conv: dict = {"messages": []}
        self.backend = None
        self.generating = False
        self._generation: Worker | None = None  # the worker streaming into _current
        self._current: AssistantMessage | None = None
        self._edit_index: int | None = None
        self.tokens_rendered = 0
        self.chat_name: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-bar"):
            yield Select([], id="ckpt", prompt="checkpoint")
            yield Label("temp", classes="lbl")
            yield Input("0.6", id="temperature", classes="num")
            yield Label("top-k", classes="lbl")
            yield Input("50", id="topk", classes="num")
            yield Static("no checkpoint loaded", id="chat-status")
        yield VerticalScroll(id="chat-log")
        yield Input(placeholder="message (enter sends)", id="chat-input")
        yield Footer()

    def on_mount(self):
        self.title = f"nanochat · chat · {self.run_dir.name}"
        ckpts = list_checkpoints(self.run_dir)
        sel = self.query_one("#ckpt", Select)
        sel.set_options([(Text(f"{phase} step {step}"), f"{phase}:{step}") for phase, step in ckpts])
        if ckpts:
            sel.value = f"{ckpts[0][0]}:{ckpts[0][1]}"
        else:
            self._status("this run has no checkpoint yet")
        self.query_one("#chat-input", Input).focus()

    def _status(self, text: str):
        self.query_one("#chat-status", Static).update(Text(text))  # errors quote checkpoints and messages

    # ----------------------------------------------------------------- checkpoint
    @on(Select.Changed, "#ckpt")
    def _ckpt_changed(self, e: Select.Changed):
        if e.value is Select.BLANK or e.value is None:
            return
        phase, step = e.value.split(":")
        self._status(f"loading {phase} step {step}…")
        self.backend = None
        self._load(phase, int(step))

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load(self, phase: str, step: int):
        backend = self.app.services.chat()
        try:
            backend.load(self.run_dir, phase, step)
        except Exception as err:
            self.app.call_from_thread(self._status, f"load failed: {err}")
            self.app.call_from_thread(self.notify, f"could not load {phase} step {step}: {err}", severity="error")
            return
        if not get_current_worker().is_cancelled:  # another checkpoint was picked meanwhile
            self.app.call_from_thread(self._loaded, backend, f"{phase} step {step}")

    def _loaded(self, backend, label):
        self.backend = backend
        self._status(f"ready: {label}")

    # ----------------------------------------------------------------- sending
    @on(Input.Submitted, "#chat-input")
    async def _send(self, e: Input.Submitted):
        text = e.value.strip()
        if not text:
            return
        if self.generating:
            self.notify("still generating: ctrl+g stops it", severity="warning")
            return
        if self.backend is None:
            self.notify("pick a checkpoint first (it may still be loading)", severity="warning")
            return
        settings = self._settings()
        if settings is None:
            return
        if self._edit_index is not None:  # edit + resend: drop that message and everything after it
            await self._truncate(self._edit_index)
            self._edit_index = None
        e.input.value = ""
        self.conv["messages"].append({"role": "user", "content": text})
        await self.query_one("#chat-log").mount(UserMessage(text))
        await self._generate(settings)

    def _settings(self) -> tuple[float, int | None] | None:
        try:
            return parse_settings(self.query_one("#temperature", Input).value, self.query_one("#topk", Input).value)
        except ValueError as err:
            self.notify(str(err), severity="error")
            return None

    async def _generate(self, settings):
        temp, top_k = settings
        self._current = AssistantMessage()
        log = self.query_one("#chat-log", VerticalScroll)
        await log.mount(self._current)
        log.anchor()  # follow the reply as it grows, until the user scrolls up
        self.generating = True
        self._status("generating… (ctrl+g stops)")
        conv = json.loads(json.dumps(self.conv))  # the worker gets its own copy
        self._generation = self._stream(conv, temp, top_k)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _stream(self, conv: dict, temp: float, top_k: int | None):
        """Post the items as they come, text at most every FLUSH_S (each post is a Markdown update and a
        relayout, ~25 ms at 160x48: one per token capped the chat at ~100 tokens/s); a token waits at most until
        the next one. Stops at the next token once cancelled (ctrl+g, new chat, leaving)."""
        worker = get_current_worker()
        done = {"type": "done", "reason": "stop", "tokens": None}
        text, last = [], 0.0

        def flush():
            if text:
                self.post_message(StreamItem({"type": "text", "text": "".join(text), "tokens": len(text)}, worker))
                text.clear()
        try:
            for item in self.backend.stream(conv, temperature=temp, top_k=top_k):
                if worker.is_cancelled:
                    done["reason"] = "stopped"
                    break
                if item.get("type") == "done":
                    done = item
                    break
                if item.get("type") == "text":
                    text.append(str(item.get("text", "")))
                    if time.monotonic() - last < self.FLUSH_S:
                        continue
                flush()
                last = time.monotonic()
                if item.get("type") != "text":
                    self.post_message(StreamItem(item, worker))
        except Exception as err:
            done["reason"] = f"error: {err}"
        flush()
        self.post_message(StreamItem(done, worker))

    async def on_stream_item(self, msg: StreamItem):
        if msg.worker is not self._generation or self._current is None:
            return  # a stopped generation's tail
        item, reply = msg.item, self._current
        kind = item.get("type")
        if kind == "text":
            self.tokens_rendered += item.get("tokens", 1)
            await reply.add_text(str(item.get("text", "")))
        elif kind == "tool_call":
            await reply.add_tool_call(str(item.get("code", "")))
        elif kind == "tool_result":
            await reply.add_tool_result(str(item.get("output", "")), str(item.get("status", "ok")),
                                        str(item.get("isolation", "full")))
        elif kind == "notice":
            await reply.mount(Notice(str(item.get("text", ""))))
        elif kind == "done":
            reason = str(item.get("reason", "stop"))
            await reply.finish(reason)
            self.conv["messages"].append({"role": "assistant", "content": reply.content()})
            self.generating, self._current, self._generation = False, None, None
            self._status(f"ready · {item.get('tokens') or self.tokens_rendered} tokens"
                         + (" (stopped)" if reason == "stopped" else ""))

    # ----------------------------------------------------------------- actions
    def action_back(self):
        if self._edit_index is not None:
            self._cancel_edit()
            return
        self.app.pop_screen()  # the screen's workers are cancelled with it

    def action_stop(self):
        if self._generation is not None:
            self._generation.cancel()

    async def action_regenerate(self):
        if self.generating or self.backend is None:
            return
        msgs = self.conv["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            self.notify("nothing to regenerate", severity="warning")
            return
        settings = self._settings()
        if settings is None:
            return
        await self._truncate(len(msgs) - 1)
        await self._generate(settings)

    async def _truncate(self, index: int):
        """Keep messages [0, index); widgets are one per message, in order."""
        self.conv["messages"] = self.conv["messages"][:index]
        widgets = list(self.query_one("#chat-log").children)
        for w in widgets[index:]:
            await w.remove()

    def action_edit(self):
        """Put a previous user message back in the input; each press goes one message further back."""
        if self.generating:
            return
        users = [i for i, m in enumerate(self.conv["messages"]) if m["role"] == "user"]
        if not users:
            return
        earlier = [i for i in users if self._edit_index is None or i < self._edit_index]
        idx = earlier[-1] if earlier else users[-1]
        self._cancel_edit()
        self._edit_index = idx
        widget = list(self.query_one("#chat-log").children)[idx]
        widget.add_class("editing")
        inp = self.query_one("#chat-input", Input)
        inp.value = self.conv["messages"][idx]["content"]
        inp.focus()
        self._status("editing: enter resends from here, escape cancels")

    def _cancel_edit(self):
        for w in self.query(".editing"):
            w.remove_class("editing")
        if self._edit_index is not None:
            self._edit_index = None
            self.query_one("#chat-input", Input).value = ""
            self._status("ready")

    def _chats_dir(self) -> Path:
        return self.run_dir / "chats"

    def action_save(self) -> Path | None:
        if not self.conv["messages"]:
            self.notify("nothing to save", severity="warning")
            return None
        if self.chat_name is None:
            self.chat_name = datetime.fromtimestamp(self.app.services.clock()).strftime("%Y%m%d-%H%M%S")
        path = self._chats_dir() / f"{self.chat_name}.json"
        atomic_write(path, json.dumps(self.conv, indent=1, ensure_ascii=False))
        self.notify(f"saved {path}", timeout=4)
        return path

    def action_export(self) -> Path | None:
        if self.action_save() is None:
            return None
        path = self._chats_dir() / f"{self.chat_name}.md"
        atomic_write(path, conversation_to_markdown(self.conv, f"{self.run_dir.name} · {self.chat_name}"))
        self.notify(f"exported {path}", timeout=4)
        return path

    def action_load(self):
        files = sorted(self._chats_dir().glob("*.json"), reverse=True)
        if not files:
            self.notify(f"no saved conversations in {self._chats_dir()}", severity="warning")
            return

        async def picked(path):
            if path:
                await self.load_conversation(Path(path))
        self.app.push_screen(PickScreen("Load conversation", [(p.stem, str(p)) for p in files]), picked)

    async def load_conversation(self, path: Path):
        try:
            conv = json.loads(path.read_text())
            assert isinstance(conv.get("messages"), list)
        except (OSError, ValueError, AssertionError, AttributeError):
            self.notify(f"{path} is not a saved conversation", severity="error")
            return
        await self.action_new()
        self.conv, self.chat_name = conv, path.stem
        log = self.query_one("#chat-log")
        for m in conv["messages"]:
            if m["role"] == "user":
                await log.mount(UserMessage(m["content"]))
            else:
                am = AssistantMessage()
                await log.mount(am)
                content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                for part in content:
                    if part["type"] == "text":
                        await am.add_text(part["text"])
                    elif part["type"] == "python":
                        await am.add_tool_call(part["text"])
                    else:
                        await am.add_tool_result(part["text"], "ok")
                await am.finish("done")

    async def action_new(self):
        if self._generation is not None:
            self._generation.cancel()
        self.conv, self.chat_name, self._edit_index = {"messages": []}, None, None
        self.generating, self._current, self._generation = False, None, None
        await self.query_one("#chat-log").remove_children()
