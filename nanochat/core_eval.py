"""CORE: the DCLM in-context-learning suite that scores a base model with one number, computed the way
karpathy/nanochat computes it (nanochat/core_eval.py and scripts/base_eval.py there), so the numbers compare.

A task is a jsonl file of examples of one of three kinds. Nothing is generated; every example is
scored from the logits of one batched forward pass:

- multiple_choice  {"query", "choices", "gold"}: the query is shared, the choices are the endings.
  The prediction is the choice whose tokens have the lowest mean loss.
- schema           {"context_options", "continuation", "gold"}: the ending is shared, the contexts
  differ. The prediction is the context under which the continuation has the lowest mean loss.
- language_modeling {"context", "continuation"}: correct when greedy (argmax) prediction, teacher
  forced, reproduces every scored token.

Order and shots. Each task is shuffled with `random.Random(1337)` (always: a full run and a
`--max-per-task N` run agree on position j), then cut to its first N items. The k shots of position j
are `random.Random(1234 + j).sample` of the other positions of that (cut) list.

Prompts. Shots are rendered solved, each followed by a blank line ("\n\n"), then the example:
`query + delim + choice` (MC), `context_option + delim + continuation` (schema), and for LM
`context.strip() + delim` without and with the continuation, the one without stripped again.
`delim` is the task's continuation_delimiter (default " "). Every sequence starts with BOS.

Which tokens are scored. MC: the tokens after the longest common prefix of the choices' sequences.
Schema: the longest common suffix (the continuation). LM: the tokens after the (stripped) prompt
without the continuation, so a delimiter space that is a token of its own must be predicted too.
Ties go to the earliest choice. Nothing is cut unless a sequence is longer than the model can forward
(`model_max_len`); such examples are cut from the left, counted (`cropped`) and flagged.

Accuracy is centred against the task's random baseline rb (percent, from the bundle's
eval_meta_data.csv): centred = (acc - 0.01*rb) / (1 - 0.01*rb). CORE is the mean centred accuracy
over the 22 CORE tasks. A task missing from the bundle is named in `missing` and the result is
flagged `partial`; it is never silently dropped. Each task's result names its data file (`source`).

Bundle layout (the public DCLM bundle, or llm-foundry's `local_data/` tree):
    <bundle>/core.yaml | mmlu_and_lowvar.yaml   icl_tasks: label, dataset_uri, num_fewshot, icl_task_type,
                                                continuation_delimiter
    <bundle>/eval_meta_data.csv                 random baselines ("Eval Task", "Random baseline")
    <bundle>/[eval_data/]<dataset_uri>          the jsonl files
The bundle's own HellaSwag jsonl is used whenever it is there. Only when it is absent is HellaSwag read
from the 6-lines-per-example text file `hellaswag_val_full.txt.bz2` (in the bundle, in `<bundle>/hellaswag/`
or a sibling `hellaswag/`); that copy differs in case ("... on a roof. he" where the bundle has "He"), so
its `source` says it is a substitute.
"""
from __future__ import annotations

import bz2
import csv
import json
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_FILES = ("core.yaml", "mmlu_and_lowvar.yaml")  # the first one found is the task list
BASELINES_FILE = "eval_meta_data.csv"  # the public bundle's; DCLM's eval_meta_data_v1.csv differs on a few tasks
HELLASWAG_TEXT = "hellaswag_val_full.txt.bz2"
CORE_TASKS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337   # every task is shuffled with Random(1337) before anything else
FEWSHOT_SEED = 1234   # the shots of position j are drawn with Random(1234 + j)


class BundleError(ValueError):
    """A bundle that cannot be read; the message is one line naming the file and what was expected."""


@dataclass
class TaskSpec:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent
    path: Path | None       # the jsonl (or hellaswag text) file; None when missing from the bundle
    source: str = ""        # where the data came from, for the report


# ----------------------------------------------------------------------------- bundle: download and read

def download_bundle(dest: str | Path, url: str = BUNDLE_URL, retries: int = 3, timeout: float = 60.0,
                    backoff: float = 2.0) -> Path:
    """Download and unpack the eval bundle zip into `dest` (atomically: a temp dir renamed into place).

    The zip may hold the files at its top level or inside one folder; either way `dest` ends up as
    the bundle root. Returns `dest`. Raises OSError naming the url after `retries` failed attempts.
    """
    dest = Path(dest).expanduser()
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    last = None
    for attempt in range(1, retries + 1):
        try:
            with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
                zpath = Path(tmp) / "bundle.zip"
                with urllib.request.urlopen(url, timeout=timeout) as r, open(zpath, "wb") as f:
                    shutil.copyfileobj(r, f)
                out = Path(tmp) / "unpacked"
                with zipfile.ZipFile(zpath) as z:
                    z.extractall(out)
                entries = [p for p in out.iterdir() if not p.name.startswith(("__MACOSX", "."))]
                root = entries[0] if len(entries) == 1 and entries[0].is_dir() else out
                if not any((root / t).exists() for t in TASK_FILES):
                    raise zipfile.BadZipFile(f"no {' or '.join(TASK_FILES)} inside")
                if dest.exists():  # another process won the race; theirs is as good as ours
                    return dest
                root.rename(dest)
                return dest
        except (OSError, zipfile.BadZipFile) as e:
            last = e
            if attempt < retries:
                time.sleep(backoff * attempt)
    raise OSError(f"could not download the CORE eval bundle from {url} after {retries} attempts: {last}")


def _resolve_data(bundle: Path, uri: str, label: str) -> Path | None:
    """The data file of one task: `dataset_uri` relative to the bundle, to eval_data/, with or without
    llm-foundry's `local_data/` prefix; HellaSwag may be the bz2 text file instead."""
    rel = uri[len("local_data/"):] if uri.startswith("local_data/") else uri
    for cand in (bundle / uri, bundle / "local_data" / rel, bundle / "eval_data" / rel, bundle / "eval_data" / uri):
        if cand.is_file():
            return cand
    if label.startswith("hellaswag"):
        for cand in (bundle / HELLASWAG_TEXT, bundle / "hellaswag" / HELLASWAG_TEXT,
                     bundle.parent / "hellaswag" / HELLASWAG_TEXT):
            if cand.is_file():
                return cand
    return None


def describe_source(bundle: Path, path: Path) -> str:
    """The data file relative to the bundle's parent; the HellaSwag text copy is marked a substitute."""
    try:
        rel = str(path.resolve().relative_to(bundle.resolve().parent))
    except ValueError:
        rel = str(path)
    return rel + (" (substitute for the bundle's hellaswag.jsonl; lower-case sentence starts)"
                  if path.name == HELLASWAG_TEXT else "")


def load_bundle(bundle_dir: str | Path) -> tuple[list[TaskSpec], list[str], dict]:
    """Read the task list and random baselines. Returns (specs of the CORE tasks found, labels of the
    CORE tasks missing from the bundle, info {"task_file", "baselines_file"})."""
    import yaml
    bundle = Path(bundle_dir).expanduser()
    task_file = next((bundle / t for t in TASK_FILES if (bundle / t).is_file()), None)
    if task_file is None:
        raise BundleError(f"{bundle} is not a CORE eval bundle: it has none of {', '.join(TASK_FILES)}")
    meta_file = bundle / BASELINES_FILE
    if not meta_file.is_file():
        raise BundleError(f"{bundle} has no {BASELINES_FILE} (the random baselines of the tasks)")
    try:
        listed = yaml.safe_load(task_file.read_text(encoding="utf-8"))["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise BundleError(f"{task_file}: expected a yaml mapping with an 'icl_tasks' list ({e})") from None
    with open(meta_file, newline="", encoding="utf-8") as f:
        baselines = {r["Eval Task"]: float(r["Random baseline"]) for r in csv.DictReader(f)}
    by_label = {t["label"]: t for t in listed}
    specs, missing = [], []
    for label in CORE_TASKS:
        t = by_label.get(label)
        path = _resolve_data(bundle, t["dataset_uri"], label) if t else None
        if t is None or path is None or label not in baselines:
            missing.append(label)
            continue
        shots = t.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        if t["icl_task_type"] not in TASK_TYPES:
            raise BundleError(f"{task_file}: task {label} has icl_task_type {t['icl_task_type']!r}; "
                              f"allowed: {', '.join(TASK_TYPES)}")
        specs.append(TaskSpec(label, t["icl_task_type"], int(shots), t.get("continuation_delimiter", " "),
                              baselines[label], path, describe_source(bundle, path)))
    return specs, missing, {"task_file": task_file.name, "baselines_file": meta_file.name}


def load_hellaswag_text(path: str | Path) -> list[dict]:
    """HellaSwag as 6 lines per example (context, gold label, four endings) -> multiple_choice records."""
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise BundleError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    return [{"query": lines[i], "choices": lines[i + 2:i + 6], "gold": int(lines[i + 1])}
            for i in range(0, len(lines), 6)]


def load_task_data(spec: TaskSpec) -> list[dict]:
    if spec.path.name.endswith(".txt.bz2"):
        return load_hellaswag_text(spec.path)
    with open(spec.path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- prompts

def prepare_task(data: list[dict], max_per_task: int | None = None) -> list[dict]:
    """The task as it is scored: shuffled with Random(1337) (always, so a full run and a subset agree on
    position j), then its first max_per_task items. Shots are drawn from this list only."""
    data = list(data)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task is not None and max_per_task > 0 else data


def fewshot_indices(n: int, j: int, k: int) -> list[int]:
    """The k shots of position j: Random(1234 + j).sample of the other positions, in draw order.
    (k is capped at n - 1, where the reference would fail on a task too small for its shots.)"""
    k = min(k, n - 1)
    if k <= 0:
        return []
    return random.Random(FEWSHOT_SEED + j).sample([i for i in range(n) if i != j], k)


def render_shot(item: dict, task_type: str, delim: str) -> str:
    """An example solved, as a demonstration; each is followed by a blank line."""
    if task_type == "multiple_choice":
        return item["query"] + delim + item["choices"][item["gold"]]
    if task_type == "schema":
        return item["context_options"][item["gold"]] + delim + item["continuation"]
    return item["context"].strip() + delim + item["continuation"]


def build_prompts(data: list[dict], j: int, spec: TaskSpec) -> list[str]:
    """Texts to score: one per choice (MC), one per context option (schema), or for LM
    [prompt without the continuation, stripped; prompt with it]."""
    prefix = "".join(render_shot(data[i], spec.task_type, spec.delimiter) + "\n\n"
                     for i in fewshot_indices(len(data), j, spec.num_fewshot))
    item, d = data[j], spec.delimiter
    if spec.task_type == "multiple_choice":
        return [prefix + item["query"] + d + c for c in item["choices"]]
    if spec.task_type == "schema":
        return [prefix + c + d + item["continuation"] for c in item["context_options"]]
    head = prefix + item["context"].strip() + d
    # stripped: the delimiter's trailing space is then not part of the context, so when the tokenizer
    # makes it a token of its own (" 17" -> " ", "17") the model has to predict it too
    return [head.strip(), head + item["continuation"]]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def scored_spans(seqs: list[list[int]], task_type: str) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The sequences to forward and, per sequence, the [start, end) token positions that are scored.
    MC: after the choices' common prefix. Schema: the common suffix. LM: the sequence with the
    continuation, from the end of the one without (at least one token each, so a mean exists)."""
    if task_type == "multiple_choice":
        start = min(_common_prefix(seqs), min(len(s) for s in seqs) - 1)
        return seqs, [(start, len(s)) for s in seqs]
    if task_type == "schema":
        suffix = min(_common_suffix(seqs), min(len(s) for s in seqs) - 1)
        return seqs, [(len(s) - suffix, len(s)) for s in seqs]
    without, with_ = seqs
    return [with_], [(min(len(without), len(with_) - 1), len(with_))]


# ----------------------------------------------------------------------------- scoring

def model_max_len(model) -> int | None:
    """The longest sequence the model can forward: nanochat's GPT has rotary tables for 10x its training
    context, so CORE prompts (up to ~2.5K tokens) are never cut for it."""
    return getattr(model, "rotary_len", None) or getattr(model, "max_seq_len", None)


@torch.no_grad()
def score_example(model, tokenizer, data: list[dict], j: int, spec: TaskSpec, device,
                  max_len: int | None = None) -> tuple[bool, bool]:
    """(is the model right on data[j], was a sequence cut to max_len). One forward pass for all of the
    example's sequences, padded on the right with BOS (after every scored position: inert)."""
    bos = tokenizer.get_bos_token_id()
    seqs, spans = scored_spans(tokenizer.encode(build_prompts(data, j, spec), prepend=bos), spec.task_type)
    cropped = bool(max_len) and max(len(s) for s in seqs) > max_len
    if cropped:  # only past the model's context: cut from the left, the scored end stays
        cut = [max(0, len(s) - max_len) for s in seqs]
        seqs = [s[c:] for s, c in zip(seqs, cut)]
        spans = [(max(1, a - c), b - c) for (a, b), c in zip(spans, cut)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), bos, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()
    if spec.task_type == "language_modeling":  # right when greedy decoding reproduces every scored token
        a, b = spans[0]
        return bool((logits[0, a - 1:b - 1].argmax(-1) == ids[0, a:b]).all()), cropped
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    means = torch.stack([losses[i, a - 1:b - 1].mean() for i, (a, b) in enumerate(spans)])
    return int(means.argmin()) == data[j]["gold"], cropped  # argmin: the first of equal means


def distributed_outcomes(n: int, score, device="cpu", batch_size: int = 1, width: int = 1) -> list:
    """Outcomes of positions 0..n-1, where `score(positions)` gives one value (or a `width`-tuple) per
    position. Under torchrun each rank scores every world_size-th position (in chunks of batch_size)
    and the outcomes are summed across ranks, so every rank returns the same full list, equal to a
    single-process run: bools, or tuples of bools when width > 1."""
    import torch.distributed as dist
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    mine = list(range(rank, n, world))
    out = torch.zeros(n, width, dtype=torch.float32, device=device)
    for k in range(0, len(mine), batch_size):
        chunk = mine[k:k + batch_size]
        vals = [v if isinstance(v, tuple) else (v,) for v in score(chunk)]
        out[chunk] = torch.tensor([[float(x) for x in v] for v in vals], device=device)
    if world > 1:
        dist.all_reduce(out)
    rows = [tuple(bool(x) for x in r) for r in out.tolist()]
    return rows if width > 1 else [r[0] for r in rows]


@torch.no_grad()
def evaluate_task(model, tokenizer, data: list[dict], spec: TaskSpec, device="cpu",
                  max_len: int | None = None) -> list[tuple[bool, bool]]:
    """(correct, cropped) per position of `data` (a prepared task), split across ranks under torchrun."""
    return distributed_outcomes(len(data), lambda chunk: [
        score_example(model, tokenizer, data, j, spec, device, max_len) for j in chunk], device, width=2)


def centered(acc: float, random_baseline: float) -> float:
    rb = 0.01 * random_baseline
    return (acc - rb) / (1.0 - rb)


def evaluate_core(model, tokenizer, bundle_dir: str | Path, device="cpu", max_per_task: int | None = None,
                  tasks: list[str] | None = None, on_task=None, stop=None, max_len: int | None = None) -> dict:
    """Run every CORE task found in the bundle. Returns
    {"tasks": {label: {acc, centered, n, type, shots, random_baseline, cropped, source, seconds}}, "core",
     "partial", "missing", "cropped", "task_file", "baselines_file"}; `on_task(label, result)` is called after
    each task (for events). `stop()` is asked before each task (on every rank); once it says yes the rest
    is left out, named in `missing`, and the result is partial. `max_len` defaults to model_max_len(model)."""
    specs, _, info = load_bundle(bundle_dir)
    if tasks:
        unknown = sorted(set(tasks) - set(CORE_TASKS))
        if unknown:
            raise BundleError(f"unknown CORE task(s) {', '.join(unknown)}; allowed: {', '.join(CORE_TASKS)}")
        specs = [s for s in specs if s.label in tasks]
    max_len = max_len or model_max_len(model)
    results = {}
    for spec in specs:
        if stop is not None and stop():
            break
        t0 = time.time()
        data = prepare_task(load_task_data(spec), max_per_task)
        outcomes = evaluate_task(model, tokenizer, data, spec, device, max_len)
        acc = sum(ok for ok, _ in outcomes) / max(1, len(outcomes))
        results[spec.label] = {"acc": acc, "centered": centered(acc, spec.random_baseline), "n": len(outcomes),
                               "type": spec.task_type, "shots": spec.num_fewshot,
                               "random_baseline": spec.random_baseline, "cropped": sum(c for _, c in outcomes),
                               "source": spec.source, "seconds": round(time.time() - t0, 3)}
        if on_task:
            on_task(spec.label, results[spec.label])
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    missing = [t for t in CORE_TASKS if t not in results]  # not in the bundle, not asked for, or stopped
    return {"tasks": results, "core": core, "partial": bool(missing), "missing": missing,
            "cropped": sum(r["cropped"] for r in results.values()), **info}


def format_table(result: dict) -> str:
    """The per-task table printed by base_eval."""
    lines = [f"{'task':<34}{'type':<6}{'shots':>5}{'n':>7}{'acc':>9}{'centred':>9}  source"]
    short = {"multiple_choice": "MC", "schema": "schema", "language_modeling": "LM"}
    for label, r in result["tasks"].items():
        cut = f" ({r['cropped']} cropped to the model's context)" if r["cropped"] else ""
        lines.append(f"{label:<34}{short[r['type']]:<6}{r['shots']:>5}{r['n']:>7}{r['acc']:>9.4f}"
                     f"{r['centered']:>9.4f}  {r['source']}{cut}")
    for label in result["missing"]:
        lines.append(f"{label:<34}{'-':<6}{'':>5}{'':>7}{'missing':>9}")
    n = len(result["tasks"])
    flag = f"  (partial: {n} of {n + len(result['missing'])} tasks; missing {', '.join(result['missing'])})" \
        if result["partial"] else ""
    lines.append(f"{'CORE':<34}{'':<6}{'':>5}{'':>7}{'':>9}{result['core']:>9.4f}{flag}")
    return "\n".join(lines)
