"""`nanochat chat`: talk to a trained model in the terminal.

    nanochat chat                                  # the newest run, its most trained stage
    nanochat chat --run 20260101-120000-demo --stage sft
    nanochat chat --ckpt ~/.cache/nanochat/runs/X/checkpoints/sft/step_000500
    nanochat chat -p "Why is the sky blue?"        # one answer on stdout, then exit

Interactive: Enter sends, Esc then Enter (or Alt+Enter) starts a new line, Ctrl-D quits; input history
is kept in <base>/chat_history. Tool calls show up as [python] / [output] lines. Commands: /help.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nanochat.common import atomic_write, die, get_base_dir, strip_controls

STAGES = ("rl", "sft", "mid", "base")  # most trained first: the default is the first one that has a checkpoint
HELP = """commands:
  /temperature T   sampling temperature (0 = greedy)        /topk K   top-k sampling (0 or off = none)
  /clear           forget the conversation                  /save [PATH]  write it as JSON
  /help            this text                                /quit     leave (or Ctrl-D)"""
ANSI = {"python": "\x1b[36m", "output": "\x1b[32m", "error": "\x1b[31m", "notice": "\x1b[33m", "dim": "\x1b[2m",
        "reset": "\x1b[0m"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanochat chat", description="talk to a trained model")
    p.add_argument("--run", help="run id, unique prefix, path, or 'latest' (default: the newest run)")
    p.add_argument("--stage", choices=STAGES, help="which checkpoints to load (default: the most trained one)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--ckpt", help="a checkpoint directory (checkpoints/<phase> or .../step_XXXXXX) instead of --run")
    p.add_argument("-p", "--prompt", help="answer this one prompt on stdout and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per reply)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    a = p.parse_args(argv)
    if a.temperature < 0:
        p.error(f"--temperature {a.temperature} must be >= 0")
    if a.top_k < 0:
        p.error(f"--top-k {a.top_k} must be >= 0 (0 = no top-k)")
    if a.max_tokens < 1:
        p.error(f"--max-tokens {a.max_tokens} must be >= 1")
    if a.ckpt and (a.run or a.stage):
        p.error("--ckpt names the checkpoint itself; don't combine it with --run or --stage")
    return a


def locate(a) -> tuple[Path, str, int | None]:
    """-> (directory for load_model, phase, step) from --ckpt or --run/--stage/--step."""
    from nanochat.checkpoint import latest_step
    if a.ckpt:
        path = Path(a.ckpt).expanduser()
        if path.name.startswith("step_") and path.is_dir():
            return path.parent, path.parent.name, int(path.name.split("_")[1])
        if path.is_dir() and latest_step(path) is not None:
            return path, path.name, a.step
        die(f"--ckpt {a.ckpt}: not a checkpoint directory (expected checkpoints/<phase> or .../step_XXXXXX)")
    from nanochat.supervisor import SupervisorError, resolve_run
    try:
        run_dir = resolve_run(a.run)
    except SupervisorError as e:
        if not (a.run and Path(a.run).is_dir()):  # a bare run directory without state.json is fine too
            die(str(e))
        run_dir = Path(a.run)
    have = [s for s in STAGES if latest_step(run_dir / "checkpoints" / s) is not None]
    stage = a.stage or (have[0] if have else None)
    if not have:
        die(f"run {run_dir.name} has no checkpoints yet; train it first (nanochat run / nanochat resume)")
    if stage not in have:
        die(f"run {run_dir.name} has no {stage} checkpoints; it has: {', '.join(have)}")
    return run_dir, stage, a.step


def load_engine(a):
    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine
    directory, phase, step = locate(a)
    try:
        model, tokenizer, meta = load_model(directory, phase, step=step, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        die(f"could not load the {phase} checkpoint from {directory}: {e}")
    return Engine(model, tokenizer), f"{phase} step {meta.get('step', step)} from {directory}"


class Reply:
    """Collects a streamed reply into the assistant message the tokenizer renders on the next turn."""

    def __init__(self):
        self.parts = []

    def add(self, kind, text):
        if kind == "text" and self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"type": kind, "text": text})

    def message(self):
        if all(p["type"] == "text" for p in self.parts):
            return {"role": "assistant", "content": "".join(p["text"] for p in self.parts)}
        return {"role": "assistant", "content": self.parts}


def respond(engine, conversation, settings, out, side, color: bool) -> dict:
    """Stream one reply: text to `out`, tool calls and notices to `side`. Returns the assistant message.
    What the model (or its tool) wrote is shown without terminal control sequences: a reply cannot recolour,
    retitle or clear the user's terminal. The conversation keeps the text as generated."""
    def paint(kind, text):
        text = strip_controls(text)
        return f"{ANSI[kind]}{text}{ANSI['reset']}" if color else text

    reply = Reply()
    done = None
    for ev in engine.stream_chat(conversation, max_tokens=settings["max_tokens"], temperature=settings["temperature"],
                                 top_k=settings["top_k"] or None, seed=settings["seed"]):
        kind = ev["type"]
        if kind == "text":
            reply.add("text", ev["text"])
            out.write(strip_controls(ev["text"]))
            out.flush()
        elif kind == "tool_call":
            reply.add("python", ev["code"])
            side.write("\n" + paint("python", f"[python] {ev['code']}") + "\n")
        elif kind == "tool_result":
            reply.add("python_output", ev["output"])
            tag = "[output, reduced isolation]" if ev.get("isolation") == "reduced" else "[output]"
            side.write(paint("output" if ev["status"] == "ok" else "error", f"{tag} {ev['output']}") + "\n")
        elif kind == "notice":
            side.write(paint("notice", f"[notice] {ev['text']}") + "\n")
        elif kind == "done":
            done = ev
        side.flush()
    out.write("\n")
    out.flush()
    if done and done["reason"] != "stop":
        side.write(paint("dim", f"[stopped: {done['reason'].replace('_', ' ')} after {done['tokens']} tokens]") + "\n")
    return reply.message()


def command(line: str, conversation: dict, settings: dict) -> str:
    """Run one /command; returns what to print."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    if name == "help":
        return HELP
    if name == "clear":
        conversation["messages"].clear()
        return "conversation cleared"
    if name == "temperature":
        try:
            t = float(arg)
            if t < 0:
                raise ValueError
        except ValueError:
            return f"/temperature needs a number >= 0 (got {arg!r}); now {settings['temperature']}"
        settings["temperature"] = t
        return f"temperature = {t}"
    if name == "topk":
        if arg.lower() in ("off", "none", "0"):
            settings["top_k"] = None
            return "top-k off"
        if not arg.isdigit():
            return f"/topk needs a whole number >= 1, or off (got {arg!r}); now {settings['top_k'] or 'off'}"
        settings["top_k"] = int(arg)
        return f"top-k = {int(arg)}"
    if name == "save":
        path = Path(arg).expanduser() if arg else get_base_dir() / "chats" / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
        atomic_write(path, json.dumps(conversation, indent=2, ensure_ascii=False) + "\n")
        return f"saved {len(conversation['messages'])} messages to {path}"
    return f"unknown command /{name}; commands: /temperature /topk /clear /save /help /quit"


def interactive(engine, what: str, settings: dict) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")  # Alt+Enter / Esc Enter: a new line instead of sending
    def _(event):
        event.current_buffer.insert_text("\n")

    session = PromptSession(history=FileHistory(str(get_base_dir() / "chat_history")), key_bindings=keys,
                            multiline=False, prompt_continuation="... ")
    print(f"nanochat chat: {what}\ntype a message; /help for commands, Ctrl-D to quit")
    conversation = {"messages": []}
    color = sys.stdout.isatty()
    while True:
        try:
            line = session.prompt("you> ")
        except KeyboardInterrupt:
            continue  # Ctrl-C clears the line
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.startswith("/"):
            print(command(line, conversation, settings))
            continue
        conversation["messages"].append({"role": "user", "content": line})
        sys.stdout.write("nanochat> ")
        try:
            conversation["messages"].append(respond(engine, conversation, settings, sys.stdout, sys.stdout, color))
        except KeyboardInterrupt:
            conversation["messages"].pop()  # an interrupted reply is not part of the conversation
            print("\n[interrupted]")


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    engine, what = load_engine(a)
    settings = {"temperature": a.temperature, "top_k": a.top_k or None, "max_tokens": a.max_tokens, "seed": a.seed}
    if a.prompt is not None:
        conversation = {"messages": [{"role": "user", "content": a.prompt}]}
        respond(engine, conversation, settings, sys.stdout, sys.stderr, color=False)
        return 0
    return interactive(engine, what, settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
