"""Chat model evaluation: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, and ChatCORE.

    python -m stages.chat_eval --run-dir DIR -i sft [-a "ARC-Easy|GSM8K"] [--max-problems 100]
    torchrun --nproc_per_node=8 -m stages.chat_eval --run-dir DIR -i mid

Defaults come from the [chat_eval] config section; the flags override them. A task whose data is
neither on disk nor downloadable is reported by name and left out (ChatCORE is then `partial`, with
every task of the six that did not run named in `missing`).
Events: per task an `eval` with metric "acc" and one with "centered" (phase = the -i source), then
task "ChatCORE" metric "chatcore".
"""
from __future__ import annotations

import time


from nanochat import chat_eval
from nanochat.checkpoint import PHASES, ckpt_dir, latest_step, load_model
from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.stage import StageContext, stage_main
from nanochat.tasks.common import TaskDataError



def add_args(p):
    p.add_argument("-i", "--source", default="sft", choices=PHASES, help="which checkpoint phase to evaluate")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-a", "--tasks", default=None, help=f"'|'-separated tasks or 'all' ({'|'.join(chat_eval.ALL_TASKS)})")
    p.add_argument("--max-problems", type=int, default=None, help="problems per task (-1 = all)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="0 = no top-k")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None, help="completions per problem (pass@k)")
    p.add_argument("--batch-size", type=int, default=8, help="problems per forward pass (categorical tasks)")


def setting(ctx, name):
    """A flag if given, else the config value."""
    value = getattr(ctx.args, name)
    return ctx.cfg["chat_eval"][name] if value is None else value


def main(ctx: StageContext) -> dict:
    args, ev, device = ctx.args, ctx.events, ctx.dist.device
    phase = args.source
    try:
        names = chat_eval.parse_tasks(setting(ctx, "tasks"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    temperature, top_k = setting(ctx, "temperature"), setting(ctx, "top_k")
    num_samples, max_new = setting(ctx, "num_samples"), setting(ctx, "max_new_tokens")
    max_problems = setting(ctx, "max_problems")
    for key, v, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new, 1), ("top_k", top_k, 0)):
        if v < low:
            raise ConfigError(f"chat_eval {key}={v} is not allowed; it must be >= {low}")
    if temperature < 0:
        raise ConfigError(f"chat_eval temperature={temperature} is not allowed; it must be >= 0 (0 = greedy)")
    if latest_step(ckpt_dir(ctx.run_dir, phase)) is None:
        raise ConfigError(f"no {phase} checkpoint in {ckpt_dir(ctx.run_dir, phase)}; train it first")

    tasks, missing = {}, []
    for name in names:  # load everything first: a missing source is reported before any compute
        try:
            tasks[name] = chat_eval.load_task(name)
        except TaskDataError as e:
            print0(f"{name}: skipped: {e}")
            ev.emit("log", message=f"{name} skipped: {e}", task=name, skipped=True)
            missing.append(name)
    if not tasks:
        raise ConfigError(f"no chat eval task could be loaded ({', '.join(missing)}); see the messages above")

    model, tokenizer, meta = load_model(ctx.run_dir, phase, step=args.step, device=device)
    step = meta.get("step")

    def on_task(name, r):
        print0(f"{name:<14} acc {r['acc']:.4f}  centred {r['centered']:+.4f}  (n={r['n']}, {r['seconds']:.1f}s)")
        extra = {"source": r["source"]} if r.get("source") else {}
        if name == "HumanEval":  # the tests ran model-written code: say how isolated it was
            from nanochat.sandbox import isolation
            extra["isolation"] = isolation()
        ev.eval(task=name, metric="acc", value=r["acc"], centered=r["centered"], n=r["n"], step=step, phase=phase,
                **extra)
        ev.eval(task=name, metric="centered", value=r["centered"], n=r["n"], step=step, phase=phase)

    t0 = time.time()
    res = chat_eval.run_chat_eval(model, tokenizer, list(tasks), device=device, max_problems=max_problems,
                                  batch_size=args.batch_size, on_task=on_task, tasks=tasks, stop=ctx.should_stop,
                                  num_samples=num_samples, max_new_tokens=max_new, temperature=temperature,
                                  top_k=top_k or None)
    print0(chat_eval.format_table(res))
    ev.eval(task="ChatCORE", metric="chatcore", value=res["chatcore"], step=step, phase=phase,
            partial=res["partial"], missing=res["missing"], n=len(res["tasks"]))
    return {"chatcore": res["chatcore"], "partial": res["partial"], "missing": res["missing"], "phase": phase,
            "checkpoint_step": step, "accuracy": {k: v["acc"] for k, v in res["tasks"].items()},
            "max_problems": max_problems, "eval_seconds": round(time.time() - t0, 2)}


if __name__ == "__main__":
    stage_main("chat_eval", main, add_args)
