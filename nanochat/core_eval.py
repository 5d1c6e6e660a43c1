"""CORE: the DCLM in-context-learning suite that scores a base model with one number.

A task is a jsonl file of examples of one of three kinds. Nothing is generated; every example is
scored from the logits of one batched forward pass:

- multiple_choice  {"query", "choices", "gold"}: the query is shared, the choices are the endings.
  The prediction is the choice whose tokens have the lowest mean loss.
- schema           {"context_options", "continuation", "gold"}: the ending is shared, the contexts
  differ. The prediction is the context under which the continuation has the lowest mean loss.
- language_modeling {"context", "continuation"}: correct when greedy (argmax) prediction, teacher
  forced, reproduces every token of the continuation.

Prompts. One example renders as `query + delim + choice` (MC), `context_option + delim + continuation`
(schema) or `context + delim + continuation` (LM), `delim` being the task's continuation_delimiter
(default " "). With k shots, k other examples of the same task are drawn with
`random.Random(1234 + index)` (never the example itself), rendered with their gold answer, and put
in front, each followed by a blank line ("\n\n"). Every sequence starts with BOS. Sequences longer
than the model's context are cut from the left, so the scored end always survives.

Which tokens are scored. MC: the tokens after the longest common prefix of the choices' sequences.
Schema: the longest common suffix (the continuation). LM: the tokens after the longest common prefix
of the prompt without and with the continuation (robust to a delimiter space merging into the first
word). Ties go to the earliest choice, so a model with no preference always picks choice 0.

Accuracy is centred against the task's random baseline rb (percent, from the bundle's
eval_meta_data.csv): centred = (acc - 0.01*rb) / (1 - 0.01*rb). CORE is the mean centred accuracy
over the 22 CORE tasks. A task missing from the bundle is named in `missing` and the result is
flagged `partial`; it is never silently dropped.

Bundle layout (the public DCLM bundle, or llm-foundry's `local_data/` tree):
    <bundle>/core.yaml | mmlu_and_lowvar.yaml   icl_tasks: label, dataset_uri, num_fewshot, icl_task_type,
                                                continuation_delimiter
    <bundle>/eval_meta_data.csv                 random baselines ("Eval Task", "Random baseline")
    <bundle>/[eval_data/]<dataset_uri>          the jsonl files
HellaSwag may instead come as the 6-lines-per-example text file `hellaswag_val_full.txt.bz2`
(in the bundle, in `<bundle>/hellaswag/` or in a sibling `hellaswag/`), converted on load.
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
FEWSHOT_SEED = 1234   # few-shot draw for example i uses Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337    # --max-per-task takes the first N of a shuffle with this seed


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


def load_bundle(bundle_dir: str | Path) -> tuple[list[TaskSpec], list[str], dict]:
    """Read the task list and random baselines. Returns (specs of the CORE tasks found, labels of the
    CORE tasks missing, info {"task_file", "baselines_file"})."""
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
                              baselines[label], path))
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

def fewshot_indices(n: int, index: int, k: int) -> list[int]:
    """k distinct example indices out of n, never `index`, the same on every run and every rank."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + index).sample(range(n - 1), k)
    return [j + (j >= index) for j in picks]  # skip over the example itself


def render_example(item: dict, task_type: str, delim: str) -> list[str]:
    """Texts to score: one per choice (MC), one per context option (schema), or for LM
    [prompt without continuation, prompt with continuation]."""
    if task_type == "multiple_choice":
        return [item["query"] + delim + c for c in item["choices"]]
    if task_type == "schema":
        return [c + delim + item["continuation"] for c in item["context_options"]]
    return [item["context"] + delim, item["context"] + delim + item["continuation"]]


def render_gold(item: dict, task_type: str, delim: str) -> str:
    """An example as a solved demonstration (for few-shot prefixes)."""
    texts = render_example(item, task_type, delim)
    return texts[-1] if task_type == "language_modeling" else texts[item["gold"]]


def build_prompts(data: list[dict], index: int, spec: TaskSpec) -> list[str]:
    shots = [data[j] for j in fewshot_indices(len(data), index, spec.num_fewshot)]
    prefix = "".join(render_gold(s, spec.task_type, spec.delimiter) + "\n\n" for s in shots)
    return [prefix + t for t in render_example(data[index], spec.task_type, spec.delimiter)]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


# ----------------------------------------------------------------------------- scoring

def model_max_len(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "sequence_len", None)


@torch.no_grad()
def score_example(model, tokenizer, data: list[dict], index: int, spec: TaskSpec, device,
                  max_len: int | None = None) -> bool:
    """Is the model right on data[index]? One forward pass over all the example's sequences."""
    bos = tokenizer.get_bos_token_id()
    seqs = tokenizer.encode(build_prompts(data, index, spec), prepend=bos)
    if spec.task_type == "multiple_choice":
        start = min(_common_prefix(seqs), min(len(s) for s in seqs) - 1)  # score >= 1 token each
        spans = [(start, len(s)) for s in seqs]
    elif spec.task_type == "schema":
        suffix = min(_common_suffix(seqs), min(len(s) for s in seqs) - 1)
        spans = [(len(s) - suffix, len(s)) for s in seqs]
    else:
        without, with_ = seqs
        seqs = [with_]
        spans = [(min(_common_prefix([without, with_]), len(with_) - 1), len(with_))]
    if max_len:  # cut from the left; the scored span stays (unless it alone is longer than the context)
        cut = [max(0, len(s) - max_len) for s in seqs]
        seqs = [s[c:] for s, c in zip(seqs, cut)]
        spans = [(max(1, a - c), b - c) for (a, b), c in zip(spans, cut)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), bos, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()  # padding sits after every scored position, so causality keeps it inert
    if spec.task_type == "language_modeling":
        a, b = spans[0]
        return bool((logits[0, a - 1:b - 1].argmax(-1) == ids[0, a:b]).all())
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    # float64 means: a model with no preference gives bit-identical means, so the tie rule holds
    means = torch.stack([losses[i, a - 1:b - 1].double().mean() for i, (a, b) in enumerate(spans)])
    return int(means.argmin()) == data[index]["gold"]


def subset_indices(n: int, max_per_task: int | None) -> list[int]:
    """All indices, or the first max_per_task of a fixed shuffle (a representative sample)."""
    if max_per_task is None or max_per_task < 0 or max_per_task >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(SUBSET_SEED).shuffle(order)
    return order[:max_per_task]


def distributed_outcomes(n: int, score, device="cpu", batch_size: int = 1) -> list[bool]:
    """Outcomes of positions 0..n-1, where `score(positions) -> list[bool]`. Under torchrun each rank
    scores every world_size-th position (in chunks of batch_size) and the outcomes are summed across
    ranks, so every rank returns the same full list, equal to a single-process run."""
    import torch.distributed as dist
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    mine = list(range(rank, n, world))
    out = torch.zeros(n, dtype=torch.float32, device=device)
    for k in range(0, len(mine), batch_size):
        chunk = mine[k:k + batch_size]
        out[chunk] = torch.tensor([float(v) for v in score(chunk)], device=device)
    if world > 1:
        dist.all_reduce(out)
    return [bool(v) for v in out.tolist()]


@torch.no_grad()
def evaluate_task(model, tokenizer, data: list[dict], spec: TaskSpec, device="cpu",
                  max_per_task: int | None = None, max_len: int | None = None) -> list[bool]:
    """Per-example outcomes, in subset order, split across ranks under torchrun."""
    idx = subset_indices(len(data), max_per_task)
    return distributed_outcomes(len(idx), lambda chunk: [
        score_example(model, tokenizer, data, idx[j], spec, device, max_len) for j in chunk], device)


def centered(acc: float, random_baseline: float) -> float:
    rb = 0.01 * random_baseline
    return (acc - rb) / (1.0 - rb)


def evaluate_core(model, tokenizer, bundle_dir: str | Path, device="cpu", max_per_task: int | None = None,
                  tasks: list[str] | None = None, on_task=None, stop=None) -> dict:
    """Run every CORE task found in the bundle. Returns
    {"tasks": {label: {acc, centered, n, type, shots, random_baseline}}, "core", "partial", "missing",
     "task_file", "baselines_file"}; `on_task(label, result)` is called after each task (for events).
    `stop()` is asked before each task (on every rank); once it says yes the rest is left out and the
    result is partial."""
    specs, missing, info = load_bundle(bundle_dir)
    if tasks:
        unknown = sorted(set(tasks) - set(CORE_TASKS))
        if unknown:
            raise BundleError(f"unknown CORE task(s) {', '.join(unknown)}; allowed: {', '.join(CORE_TASKS)}")
        specs = [s for s in specs if s.label in tasks]
        missing = [m for m in missing if m in tasks]
    max_len = model_max_len(model)
    results = {}
    for spec in specs:
        if stop is not None and stop():
            break
        t0 = time.time()
        data = load_task_data(spec)
        outcomes = evaluate_task(model, tokenizer, data, spec, device, max_per_task, max_len)
        acc = sum(outcomes) / max(1, len(outcomes))
        results[spec.label] = {"acc": acc, "centered": centered(acc, spec.random_baseline), "n": len(outcomes),
                               "type": spec.task_type, "shots": spec.num_fewshot,
                               "random_baseline": spec.random_baseline, "seconds": round(time.time() - t0, 3)}
        if on_task:
            on_task(spec.label, results[spec.label])
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    wanted = len(set(tasks)) if tasks else len(CORE_TASKS)
    return {"tasks": results, "core": core, "partial": len(results) < wanted, "missing": missing, **info}


def format_table(result: dict) -> str:
    """The per-task table printed by base_eval."""
    lines = [f"{'task':<34}{'type':<6}{'shots':>5}{'n':>7}{'acc':>9}{'centred':>9}"]
    short = {"multiple_choice": "MC", "schema": "schema", "language_modeling": "LM"}
    for label, r in result["tasks"].items():
        lines.append(f"{label:<34}{short[r['type']]:<6}{r['shots']:>5}{r['n']:>7}{r['acc']:>9.4f}{r['centered']:>9.4f}")
    for label in result["missing"]:
        lines.append(f"{label:<34}{'-':<6}{'':>5}{'':>7}{'missing':>9}")
    n = len(result["tasks"])
    flag = f"  (partial: {n} of {n + len(result['missing'])} tasks; missing {', '.join(result['missing'])})" \
        if result["partial"] else ""
    lines.append(f"{'CORE':<34}{'':<6}{'':>5}{'':>7}{'':>9}{result['core']:>9.4f}{flag}")
    return "\n".join(lines)
