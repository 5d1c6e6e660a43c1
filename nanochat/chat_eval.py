"""Chat evals: score a chat model on the tasks of nanochat/tasks, and ChatCORE.

Two ways to answer, by the task's `eval_type`:
- categorical (ARC, MMLU): the conversation is rendered up to <|assistant_start|>; the answer is the
  letter whose token has the highest logit there, among the task's letters only (so a model that
  would rather say something else still gets a fair multiple-choice reading). Batched, no sampling.
  Ties go to the earliest letter.
- generative (GSM8K, HumanEval, SpellingBee): the Engine samples `num_samples` completions (greedy at
  temperature 0, the calculator tool live); the problem counts as solved if any completion passes
  `task.evaluate` (pass@num_samples).

Problem order is the reference's (karpathy/nanochat scripts/chat_eval.py), so `max_problems` N picks
the same problems: the tasks it reads from HuggingFace with `.shuffle(seed=42)` (ARC, MMLU, GSM8K,
HumanEval) are visited in `numpy.random.default_rng(42).permutation(n)` order, SpellingBee in index
order, and the first N are scored. Under torchrun the problems are split across ranks and the
outcomes summed, as in CORE. Prompts are never cut (the model forwards 10x its training context).

ChatCORE is the seed's: the mean centred accuracy over the six tasks, centred against chance: 25% for
the 4-choice tasks, 0 for the generative ones. The seed prints it only when all six ran; here the mean
over the tasks that ran is still given, flagged `partial` with the `missing` tasks named.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from nanochat.core_eval import distributed_outcomes, model_max_len

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
ALL_TASKS = tuple(BASELINES)


def load_task(name: str):
    """The eval split of one chat task, by name."""
    from nanochat.tasks.arc import ARC
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.tasks.humaneval import HumanEval
    from nanochat.tasks.mmlu import MMLU
    from nanochat.tasks.spellingbee import EVAL_SIZE, SpellingBee
    makers = {"ARC-Easy": lambda: ARC("ARC-Easy", "test"), "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
              "MMLU": lambda: MMLU("all", "test"), "GSM8K": lambda: GSM8K(split="test"),
              "HumanEval": lambda: HumanEval(), "SpellingBee": lambda: SpellingBee(size=EVAL_SIZE, split="test")}
    return makers[name]()


def parse_tasks(spec: str) -> list[str]:
    """'ARC-Easy|GSM8K' (or 'all') -> task names; case and '-'/'_' are forgiven, unknown names are not."""
    if spec.strip().lower() in ("", "all"):
        return list(ALL_TASKS)
    by_key = {t.lower().replace("-", "").replace("_", ""): t for t in ALL_TASKS}
    names = []
    for item in (s.strip() for s in spec.replace(",", "|").split("|") if s.strip()):
        key = item.lower().replace("-", "").replace("_", "")
        if key not in by_key:
            raise ValueError(f"unknown chat eval task {item!r}; allowed: {', '.join(ALL_TASKS)} (or 'all')")
        if by_key[key] not in names:
            names.append(by_key[key])
    return names


def problem_order(task, max_problems: int | None = None) -> list[int]:
    """The problems scored, in the reference's order (see the module docstring)."""
    n = len(task)
    order = np.random.default_rng(42).permutation(n).tolist() if task.shuffled else list(range(n))
    return order[:max_problems] if max_problems is not None and max_problems >= 0 else order


def centered(acc: float, baseline: float) -> float:
    return (acc - baseline) / (1.0 - baseline)


# ----------------------------------------------------------------------------- the two scoring loops

def letter_ids(tokenizer, letters: str) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens in this tokenizer; categorical "
                             "evals need each letter to be one token")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def score_categorical(model, tokenizer, task, problems: list[int], device="cpu", max_len: int | None = None) -> list[bool]:
    """One forward pass for a batch of problems; the answer is the best letter at the last position."""
    convs = [task[i] for i in problems]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    if max_len:  # only past what the model can forward; keep the end: the choices and <|assistant_start|>
        prompts = [p[-max_len:] for p in prompts]
    pad = tokenizer.get_bos_token_id()
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    logits = model(ids.to(device))
    out = []
    for i, (conv, p) in enumerate(zip(convs, prompts)):
        choice_ids = letter_ids(tokenizer, conv["letters"])
        scores = logits[i, len(p) - 1, choice_ids]
        out.append(bool(task.evaluate(conv, conv["letters"][int(scores.argmax())])))
    return out


def score_generative(engine, tokenizer, task, problems: list[int], num_samples: int = 1, max_new_tokens: int = 512,
                     temperature: float = 0.0, top_k: int | None = 50, seed: int = 42) -> list[bool]:
    out = []
    for i in problems:
        conv = task[i]
        if hasattr(engine, "fit_conversation"):
            room = max(1, min(max_new_tokens, engine.context // 2))
            prompt, _ = engine.fit_conversation(conv, reserve=room)
        else:
            prompt = tokenizer.render_for_completion(conv)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + i)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        out.append(any(task.evaluate(conv, c) for c in completions))
    return out


def evaluate_chat_task(task, model, tokenizer, engine=None, device="cpu", max_problems: int | None = None,
                       batch_size: int = 8, **gen) -> list[bool]:
    """Outcomes over the selected problems (split across ranks under torchrun)."""
    problems = problem_order(task, max_problems)
    if task.eval_type == "categorical":
        max_len = model_max_len(model)
        return distributed_outcomes(len(problems), lambda chunk: score_categorical(
            model, tokenizer, task, [problems[j] for j in chunk], device, max_len), device, batch_size)
    if engine is None:
        from nanochat.engine import Engine
        engine = Engine(model, tokenizer)
    return distributed_outcomes(len(problems), lambda chunk: score_generative(
        engine, tokenizer, task, [problems[j] for j in chunk], **gen), device)


def run_chat_eval(model, tokenizer, task_names: list[str], engine=None, device="cpu", max_problems=None,
                  batch_size: int = 8, on_task=None, tasks: dict | None = None, stop=None, **gen) -> dict:
    """Evaluate the named tasks. Returns {"tasks": {name: {acc, centered, n, seconds}}, "chatcore", "partial",
    "missing"}.
    `tasks` may supply task objects by name (tests, custom data); the rest are loaded by load_task.
    `stop()` is asked before each task; once it says yes the rest is left out (partial)."""
    results = {}
    for name in task_names:
        if stop is not None and stop():
            break
        t0 = time.time()
        task = (tasks or {}).get(name) or load_task(name)
        outcomes = evaluate_chat_task(task, model, tokenizer, engine, device, max_problems, batch_size, **gen)
        acc = sum(outcomes) / max(1, len(outcomes))
        results[name] = {"acc": acc, "centered": centered(acc, BASELINES[name]), "n": len(outcomes),
                         "seconds": round(time.time() - t0, 3), "source": getattr(task, "source", None)}
        if on_task:
            on_task(name, results[name])
    score = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    missing = [t for t in ALL_TASKS if t not in results]
    return {"tasks": results, "chatcore": score, "partial": bool(missing), "missing": missing}


def format_table(result: dict) -> str:
    lines = [f"{'task':<16}{'n':>7}{'acc':>9}{'centred':>9}"]
    for name, r in result["tasks"].items():
        lines.append(f"{name:<16}{r['n']:>7}{r['acc']:>9.4f}{r['centered']:>9.4f}")
    flag = f"  (partial: missing {', '.join(result['missing'])})" if result["partial"] else ""
    lines.append(f"{'ChatCORE':<16}{'':>7}{'':>9}{result['chatcore']:>9.4f}{flag}")
    return "\n".join(lines)
