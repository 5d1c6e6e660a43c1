"""CORE scoring with stand-in models whose answers are known, prompt construction, bundle reading and
download, HellaSwag conversion, and multi-process (torchrun gloo) == single-process."""
from __future__ import annotations

import bz2
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import core_eval as ce

REPO = Path(__file__).resolve().parents[1]
from conftest import SHARED_DATA as SHARED  # noqa: E402


# ----------------------------------------------------------------------------- stand-ins

class ByteTok:
    """Bytes are tokens 0..255, BOS is 256: enough of the Tokenizer contract for CORE."""
    bos = 256

    def get_bos_token_id(self):
        return self.bos

    def get_vocab_size(self):
        return 257

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Oracle(torch.nn.Module):
    """Peeks at the next input token: near-certain of it when prefer(text of the sequence), else a
    uniform distribution. So it 'chooses' exactly the sequences `prefer` accepts."""

    def __init__(self, prefer, tok=ByteTok()):
        super().__init__()
        self.prefer, self.tok = prefer, tok

    def forward(self, ids):
        B, T = ids.shape
        out = torch.zeros(B, T, self.tok.get_vocab_size())
        for b in range(B):
            row = ids[b].tolist()
            n = len(row)
            while n > 1 and row[n - 1] == self.tok.bos:  # right padding
                n -= 1
            if self.prefer(self.tok.decode(row[:n])):
                out[b, torch.arange(n - 1), torch.tensor(row[1:n])] = 30.0
        return out


def ending_model(items, delim, pick):
    """Prefers the full sequence of choice pick(item) of whichever item the text ends with."""
    ends = set()
    for it in items:
        if "choices" in it:
            ends.add(it["query"] + delim + it["choices"][pick(it)])
        else:
            ends.add(it["context_options"][pick(it)] + delim + it["continuation"])
    return Oracle(lambda text: any(text.endswith(e) for e in ends))


UNIFORM = Oracle(lambda text: False)
ALWAYS = Oracle(lambda text: True)  # for LM: greedy reproduces any text


class TinyLM(torch.nn.Module):
    """A random bigram model: real, deterministic, opinionated logits for the multi-process check."""

    def __init__(self, vocab: int = 257):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 16, generator=g))
        self.head = torch.nn.Parameter(torch.randn(16, vocab, generator=g))

    def forward(self, ids):
        return torch.tanh(self.emb[ids]) @ self.head


# ----------------------------------------------------------------------------- a made-up bundle

ANIMALS = ["otter", "heron", "lynx", "badger", "walrus", "gecko", "falcon", "bison", "marten", "ibis", "koala", "tapir"]


def make_items():
    mc = [{"query": f"Which animal is called {a}?", "choices": [f"the {b}" for b in
           (ANIMALS[(i + k) % 12] for k in range(4))], "gold": [0, 2, 1, 3, 0, 1][i % 6]}
          for i, a in enumerate(ANIMALS)]
    # gold must point at the real answer: rotate so that choices[gold] is "the <a>"
    for it, a in zip(mc, ANIMALS):
        others = [c for c in it["choices"] if c != f"the {a}"]
        it["choices"] = others[:it["gold"]] + [f"the {a}"] + others[it["gold"]:]
    schema = [{"context_options": [f"The {a} chased the {b}, so the {a}", f"The {a} chased the {b}, so the {b}"],
               "continuation": f"ran {'fast' if i % 2 else 'away'}.", "gold": i % 3 % 2}
              for i, (a, b) in enumerate(zip(ANIMALS, ANIMALS[1:]))]
    lm = [{"context": f"The {a} is number", "continuation": f"{i + 1}"} for i, a in enumerate(ANIMALS)]
    return mc, schema, lm


TASKS = [  # (label, type, shots, delimiter, file, baseline)
    ("copa", "multiple_choice", 0, None, "commonsense_reasoning/copa.jsonl", 50),
    ("arc_easy", "multiple_choice", 3, "\nAnswer: ", "world_knowledge/arc_easy.jsonl", 25),
    ("winograd", "schema", 2, None, "language_understanding/winograd_wsc.jsonl", 50),
    ("lambada_openai", "language_modeling", 0, None, "language_understanding/lambada_openai.jsonl", 0),
    ("bigbench_operators", "language_modeling", 2, None, "symbolic_problem_solving/bigbench_operators.jsonl", 0),
]


def make_bundle(root: Path, eval_data_layout=False) -> Path:
    """A bundle with 5 of the 22 CORE tasks, in the llm-foundry layout (or the public one)."""
    mc, schema, lm = make_items()
    data = {"multiple_choice": mc, "schema": schema, "language_modeling": lm}
    yaml_lines = ["icl_tasks:"]
    for label, typ, shots, delim, rel, _ in TASKS:
        uri = rel if eval_data_layout else f"local_data/{rel}"
        yaml_lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {typ}"]
        if delim:
            yaml_lines.append(f"  continuation_delimiter: {json.dumps(delim)}")
        path = root / ("eval_data" if eval_data_layout else "local_data") / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(it) + "\n" for it in data[typ]))
    root.mkdir(parents=True, exist_ok=True)
    (root / ("core.yaml" if eval_data_layout else "mmlu_and_lowvar.yaml")).write_text("\n".join(yaml_lines) + "\n")
    rows = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    rows += [f"{label},x,y,{shots},12,{rb},,\"made up, for tests\"" for label, _, shots, _, _, rb in TASKS]
    (root / "eval_meta_data.csv").write_text("\n".join(rows) + "\n")
    return root


def right(model, data, spec, **kw) -> list[bool]:
    """Per-example correctness (evaluate_task also says which examples were cropped)."""
    return [ok for ok, _ in ce.evaluate_task(model, ByteTok(), data, spec, **kw)]


def spec_of(label, bundle):
    specs, _, _ = ce.load_bundle(bundle)
    return next(s for s in specs if s.label == label)


# ----------------------------------------------------------------------------- scoring

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def test_bundle_reading_reports_missing_tasks(bundle):
    specs, missing, info = ce.load_bundle(bundle)
    assert [s.label for s in specs] == [t for t in ce.CORE_TASKS if t in {t[0] for t in TASKS}]
    assert set(missing) == set(ce.CORE_TASKS) - {t[0] for t in TASKS} and len(missing) == 17
    assert info == {"task_file": "mmlu_and_lowvar.yaml", "baselines_file": "eval_meta_data.csv"}
    arc = spec_of("arc_easy", bundle)
    assert (arc.num_fewshot, arc.delimiter, arc.random_baseline) == (3, "\nAnswer: ", 25.0)
    assert spec_of("copa", bundle).delimiter == " "  # the default


@pytest.mark.parametrize("label", ["copa", "arc_easy", "winograd"])
def test_choice_tasks_score_exactly(bundle, label):
    spec = spec_of(label, bundle)
    data = ce.load_task_data(spec)
    frac_gold0 = sum(it["gold"] == 0 for it in data) / len(data)
    assert 0 < frac_gold0 < 1  # so that the three models below disagree
    for model, expected in [(ending_model(data, spec.delimiter, lambda it: it["gold"]), 1.0),
                            (ending_model(data, spec.delimiter, lambda it: 0), frac_gold0),
                            (ending_model(data, spec.delimiter, lambda it: 1), sum(it["gold"] == 1 for it in data) / len(data)),
                            (UNIFORM, frac_gold0)]:  # no preference: ties go to the first choice
        outcomes = right(model, data, spec)
        assert len(outcomes) == len(data)
        assert sum(outcomes) / len(outcomes) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("label", ["lambada_openai", "bigbench_operators"])
def test_lm_tasks_score_exactly(bundle, label):
    spec = spec_of(label, bundle)
    data = ce.load_task_data(spec)
    assert all(right(ALWAYS, data, spec))
    assert not any(right(UNIFORM, data, spec))
    # right only when the text ends with an odd number: exact per-example agreement
    odd = Oracle(lambda t: t[-1] in "13579" and t.endswith(tuple(it["continuation"] for it in data)))
    assert right(odd, data, spec) == [int(it["continuation"]) % 2 == 1 for it in data]


def test_evaluate_core_accuracy_centering_and_partial(bundle):
    mc, schema, lm = make_items()
    gold = Oracle(lambda t: t.endswith(tuple(
        [it["query"] + d + it["choices"][it["gold"]] for it in mc for d in (" ", "\nAnswer: ")] +
        [it["context_options"][it["gold"]] + " " + it["continuation"] for it in schema] +
        [it["context"] + " " + it["continuation"] for it in lm])))
    seen = []
    res = ce.evaluate_core(gold, ByteTok(), bundle, on_task=lambda label, r: seen.append(label))
    assert seen == list(res["tasks"])
    assert all(r["acc"] == 1.0 and r["centered"] == 1.0 for r in res["tasks"].values())
    assert res["core"] == 1.0 and res["partial"] and len(res["missing"]) == 17

    res = ce.evaluate_core(UNIFORM, ByteTok(), bundle)
    f_mc, f_schema = sum(it["gold"] == 0 for it in mc) / 12, sum(it["gold"] == 0 for it in schema) / 11
    expect = {"copa": (f_mc, (f_mc - 0.5) / 0.5), "arc_easy": (f_mc, (f_mc - 0.25) / 0.75),
              "winograd": (f_schema, (f_schema - 0.5) / 0.5), "lambada_openai": (0.0, 0.0),
              "bigbench_operators": (0.0, 0.0)}
    for label, (acc, cen) in expect.items():
        assert res["tasks"][label]["acc"] == pytest.approx(acc)
        assert res["tasks"][label]["centered"] == pytest.approx(cen)
    assert res["core"] == pytest.approx(sum(c for _, c in expect.values()) / 5)
    table = ce.format_table(res)
    assert "squad" in table and "missing" in table and "partial: 5 of 22" in table

    sub = ce.evaluate_core(UNIFORM, ByteTok(), bundle, tasks=["copa", "squad"], max_per_task=5)
    # CORE over one task is partial: every other CORE task is named missing (squad, absent, among them)
    assert list(sub["tasks"]) == ["copa"] and sub["partial"] and sub["missing"] == [t for t in ce.CORE_TASKS if t != "copa"]
    assert sub["tasks"]["copa"]["n"] == 5
    with pytest.raises(ce.BundleError, match="unknown CORE task.*nope"):
        ce.evaluate_core(UNIFORM, ByteTok(), bundle, tasks=["nope"])


def test_centered():
    assert ce.centered(0.75, 50) == 0.5
    assert ce.centered(0.25, 25) == 0.0
    assert ce.centered(0.4, 0) == 0.4
    assert ce.centered(0.0, 25) == pytest.approx(-1 / 3)


def test_truncation_only_past_the_context_and_counted(bundle):
    spec = spec_of("arc_easy", bundle)  # 3 shots: prompts ~150 bytes
    data = ce.prepare_task(ce.load_task_data(spec))
    gold = ending_model(data, spec.delimiter, lambda it: it["gold"])
    assert ce.evaluate_task(gold, ByteTok(), data, spec, max_len=4096) == [(True, False)] * len(data)
    # cut to 56 (from the left: the question and its answer survive) - and every example says so
    assert ce.evaluate_task(gold, ByteTok(), data, spec, max_len=56) == [(True, True)] * len(data)
    longest = max(len(ByteTok().encode(p, prepend=256)) for j in range(len(data)) for p in ce.build_prompts(data, j, spec))
    outcomes = ce.evaluate_task(gold, ByteTok(), data, spec, max_len=longest - 1)
    assert 1 <= sum(c for _, c in outcomes) < len(data) and all(ok for ok, _ in outcomes)
    res = ce.evaluate_core(gold, ByteTok(), bundle, tasks=["arc_easy"], max_len=longest - 1)
    assert res["tasks"]["arc_easy"]["cropped"] == res["cropped"] == sum(c for _, c in outcomes)
    assert "cropped to the model's context" in ce.format_table(res)


def test_the_model_context_is_what_it_can_forward():
    from nanochat.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    with torch.device("meta"):
        model = GPT(cfg)
    assert ce.model_max_len(model) == 640  # rotary tables for 10x the training context: no cut at 64


def test_task_order_and_shots_for_a_five_item_task():
    items = [{"context": f"q{i}", "continuation": f"a{i}"} for i in range(5)]
    # always shuffled with Random(1337), full run or not; --max-per-task N keeps the first N of that order
    order = [it["context"] for it in ce.prepare_task(items)]
    assert order == ["q1", "q0", "q3", "q2", "q4"]
    assert [it["context"] for it in ce.prepare_task(items, 3)] == ["q1", "q0", "q3"]
    assert ce.prepare_task(items, -1) == ce.prepare_task(items)
    # shots of position j: Random(1234 + j).sample of the other positions, in draw order
    assert [ce.fewshot_indices(5, j, 2) for j in range(5)] == [[4, 1], [4, 3], [4, 3], [1, 4], [0, 1]]
    assert [ce.fewshot_indices(3, j, 2) for j in range(3)] == [[2, 1], [2, 0], [1, 0]]  # of the first 3 only
    assert ce.fewshot_indices(5, 0, 0) == [] and sorted(ce.fewshot_indices(5, 2, 10)) == [0, 1, 3, 4]
    spec = ce.TaskSpec("bigbench_operators", "language_modeling", 2, " ", 0.0, None)
    data = ce.prepare_task(items, 3)  # q1 q0 q3: position 0's shots are positions 2, 1 (q3, q0)
    assert ce.build_prompts(data, 0, spec) == ["q3 a3\n\nq0 a0\n\nq1", "q3 a3\n\nq0 a0\n\nq1 a1"]


class MergeTok(ByteTok):
    """ByteTok, except that " 4" is one token (300): the delimiter space merges into the answer."""

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = super().encode(text, prepend, append)
        out = []
        for i in ids:
            if out and out[-1] == ord(" ") and i == ord("4"):
                out[-1] = 300
            else:
                out.append(i)
        return out


def test_lm_scored_span_starts_at_the_stripped_context():
    spec = ce.TaskSpec("bigbench_operators", "language_modeling", 0, " ", 0.0, None)
    item = [{"context": "2+2= ", "continuation": "4"}]  # trailing space in the data, stripped as the reference does
    assert ce.build_prompts(item, 0, spec) == ["2+2=", "2+2= 4"]
    # the delimiter is a token of its own: the model must predict " " and then "4"
    seqs = ByteTok().encode(ce.build_prompts(item, 0, spec), prepend=256)
    assert ce.scored_spans(seqs, spec.task_type) == ([[256, 50, 43, 50, 61, 32, 52]], [(5, 7)])
    # merged into the answer (" 4"): one scored token
    seqs = MergeTok().encode(ce.build_prompts(item, 0, spec), prepend=256)
    assert ce.scored_spans(seqs, spec.task_type) == ([[256, 50, 43, 50, 61, 300]], [(5, 6)])
    # a model right about "4" but not about the space before it is wrong
    knows_4 = Oracle(lambda t: False)
    knows_4.forward = lambda ids: torch.nn.functional.one_hot(torch.full(ids.shape, 52), 257).float()
    assert ce.score_example(knows_4, ByteTok(), item, 0, spec, "cpu") == (False, False)
    assert ce.score_example(ALWAYS, ByteTok(), item, 0, spec, "cpu") == (True, False)


# ----------------------------------------------------------------------------- data files

def test_hellaswag_text_conversion(tmp_path):
    text = "Cats: a cat sits. it\n2\njumps.\nsleeps.\npurrs.\nflies.\nDogs: a dog runs. it\n0\nbarks.\nmeows.\nsings.\nswims.\n"
    p = tmp_path / ce.HELLASWAG_TEXT
    p.write_bytes(bz2.compress(text.encode()))
    assert ce.load_hellaswag_text(p) == [
        {"query": "Cats: a cat sits. it", "choices": ["jumps.", "sleeps.", "purrs.", "flies."], "gold": 2},
        {"query": "Dogs: a dog runs. it", "choices": ["barks.", "meows.", "sings.", "swims."], "gold": 0}]
    p.write_bytes(bz2.compress(b"a\n1\nb\nc\n"))
    with pytest.raises(ce.BundleError, match="multiple of 6"):
        ce.load_hellaswag_text(p)


def test_hellaswag_text_is_found_next_to_the_bundle(tmp_path):
    root = make_bundle(tmp_path / "core_icl")
    yaml = root / "mmlu_and_lowvar.yaml"
    yaml.write_text(yaml.read_text() + "- label: hellaswag\n  dataset_uri: local_data/language_understanding/"
                    "hellaswag.jsonl\n  num_fewshot: [10]\n  icl_task_type: multiple_choice\n")
    with open(root / "eval_meta_data.csv", "a") as f:
        f.write("hellaswag,x,y,10,2,25,,\n")
    assert "hellaswag" in ce.load_bundle(root)[1]
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / ce.HELLASWAG_TEXT).write_bytes(bz2.compress(b"q\n1\na\nb\nc\nd\n"))
    specs, missing, _ = ce.load_bundle(root)
    hs = next(s for s in specs if s.label == "hellaswag")
    assert "hellaswag" not in missing and ce.load_task_data(hs) == [{"query": "q", "choices": list("abcd"), "gold": 1}]


def test_bad_bundles_give_one_line_errors(tmp_path):
    with pytest.raises(ce.BundleError, match="not a CORE eval bundle"):
        ce.load_bundle(tmp_path)
    (tmp_path / "core.yaml").write_text("icl_tasks: []\n")
    with pytest.raises(ce.BundleError, match="eval_meta_data.csv"):
        ce.load_bundle(tmp_path)
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\n")
    (tmp_path / "core.yaml").write_text("tasks: 3\n")
    with pytest.raises(ce.BundleError, match="icl_tasks"):
        ce.load_bundle(tmp_path)
    (tmp_path / "core.yaml").write_text("icl_tasks: []\n")
    assert ce.load_bundle(tmp_path)[1] == list(ce.CORE_TASKS)


def test_public_bundle_layout(tmp_path):
    root = make_bundle(tmp_path / "b", eval_data_layout=True)
    specs, missing, info = ce.load_bundle(root)
    assert len(specs) == 5 and info["task_file"] == "core.yaml"


# ----------------------------------------------------------------------------- download

class _Server:
    """A local http server: the first `fail_first` requests get a 503, then the zip."""

    def __init__(self, payload: bytes, fail_first: int = 0):
        state = {"left": fail_first, "hits": 0}

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                state["hits"] += 1
                if state["left"] > 0:
                    state["left"] -= 1
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.state = state
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip_of(root: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, prefix + str(p.relative_to(root)))
    return buf.getvalue()


def test_download_with_retry_and_atomic_unpack(tmp_path):
    src = make_bundle(tmp_path / "src", eval_data_layout=True)
    srv = _Server(_zip_of(src, "eval_bundle/"), fail_first=2)
    try:
        dest = ce.download_bundle(tmp_path / "cache" / "eval_bundle", url=srv.url, retries=3, backoff=0)
        assert srv.state["hits"] == 3
    finally:
        srv.close()
    assert (dest / "core.yaml").is_file() and len(ce.load_bundle(dest)[0]) == 5
    assert [p.name for p in dest.parent.iterdir()] == ["eval_bundle"]  # no temp leftovers


def test_download_gives_up_with_a_clear_error(tmp_path):
    srv = _Server(b"", fail_first=10)
    try:
        with pytest.raises(OSError, match="could not download the CORE eval bundle.*after 2 attempts"):
            ce.download_bundle(tmp_path / "eval_bundle", url=srv.url, retries=2, backoff=0)
    finally:
        srv.close()
    assert not (tmp_path / "eval_bundle").exists() and list(tmp_path.iterdir()) == []
    srv = _Server(b"this is not a zip")
    try:
        with pytest.raises(OSError, match="not a zip"):
            ce.download_bundle(tmp_path / "eval_bundle", url=srv.url, retries=1, backoff=0)
    finally:
        srv.close()


# ----------------------------------------------------------------------------- shared data

needs_shared = pytest.mark.skipif(not (SHARED / "core_icl").is_dir(), reason="../shared/data absent")


@needs_shared
def test_shared_bundle_has_20_of_22_tasks():
    specs, missing, info = ce.load_bundle(SHARED / "core_icl")
    assert sorted(missing) == ["coqa", "squad"] and len(specs) == 20
    assert info["baselines_file"] == "eval_meta_data.csv"
    hs = {s.label: s for s in specs}
    assert hs["hellaswag"].num_fewshot == 10 and hs["hellaswag_zeroshot"].num_fewshot == 0
    data = ce.load_task_data(hs["hellaswag"])
    assert len(data) == 10042 and all(len(d["choices"]) == 4 and 0 <= d["gold"] <= 3 for d in data)
    assert hs["commonsense_qa"].random_baseline == 40.3


@needs_shared
def test_gold_model_on_shared_tasks():
    specs = {s.label: s for s in ce.load_bundle(SHARED / "core_icl")[0]}
    for label in ["copa", "boolq", "winogrande", "bigbench_operators", "arc_challenge"]:
        spec = specs[label]
        data = ce.load_task_data(spec)
        if spec.task_type == "language_modeling":
            model = ALWAYS
        else:
            model = ending_model(data, spec.delimiter, lambda it: it["gold"])
        data = ce.prepare_task(data, 4)
        assert ce.evaluate_task(model, ByteTok(), data, spec, max_len=1 << 20) == [(True, False)] * 4, label
        if spec.task_type == "language_modeling":
            assert not any(right(UNIFORM, data, spec))
        # (no uniform-model check for choices: means of equal losses over different lengths differ in
        # float32's last bit, as in the reference, so "ties go to choice 0" holds only for equal lengths)


# ----------------------------------------------------------------------------- multi-process

DIST_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from nanochat.common import compute_init, compute_cleanup
from nanochat import core_eval as ce
from test_core_eval import ByteTok, TinyLM
info = compute_init("cpu")
model, tok = TinyLM(), ByteTok()
specs, _, _ = ce.load_bundle({bundle!r})
out = {{s.label: ce.evaluate_task(model, tok, ce.prepare_task(ce.load_task_data(s), 9), s) for s in specs}}
res = ce.evaluate_core(model, tok, {bundle!r}, max_per_task=9)
if info.rank == 0:
    json.dump({{"outcomes": out, "core": res["core"], "acc": {{k: v["acc"] for k, v in res["tasks"].items()}}}},
              open({out!r}, "w"))
compute_cleanup()
"""


def test_torchrun_two_processes_equal_one(tmp_path, bundle):
    results = []
    for n in (1, 2):
        out = tmp_path / f"out{n}.json"
        script = tmp_path / "run_core.py"
        script.write_text(DIST_SCRIPT.format(tests=str(REPO / "tests"), bundle=str(bundle), out=str(out)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    one, two = results
    assert one == two
    # and the bigram model's outcomes are not trivial (some right, some wrong)
    flat = [ok for v in one["outcomes"].values() for ok, _ in v]
    assert any(flat) and not all(flat)


# ----------------------------------------------------------------------------- the stage

def _core_events(run_dir):
    from nanochat.events import read_events
    events, bad = read_events(run_dir / "base_eval" / "events.jsonl")
    assert bad == 0
    return events


@pytest.mark.slow
def test_base_eval_stage(tiny_run, tmp_path):
    from conftest import run_stage
    run_dir, base = tiny_run
    run_stage("stages.base_train", run_dir, "--set", "base_train.num_iterations=6", "--set", "base_train.eval_every=0",
              base_dir=base)
    bundle = make_bundle(tmp_path / "bundle")
    p = run_stage("stages.base_eval", run_dir, "--bundle", str(bundle), "--max-per-task", "5",
                  "--set", "base_eval.bpb_tokens=1024", base_dir=base)
    assert "CORE" in p.stdout and "partial: 5 of 22" in p.stdout and "lambada_openai" in p.stdout
    events = _core_events(run_dir)
    evals = [e for e in events if e["kind"] == "eval"]
    per_task = {(e["task"], e["metric"]): e for e in evals}
    for label, *_ in TASKS:
        acc, cen = per_task[(label, "acc")], per_task[(label, "centered")]
        assert acc["phase"] == "base" and acc["n"] == 5 and acc["step"] == 6
        assert cen["value"] == pytest.approx(ce.centered(acc["value"], acc["random_baseline"]))
    core = per_task[("CORE", "core")]
    assert core["partial"] and "squad" in core["missing"] and len(core["missing"]) == 17
    assert core["value"] == pytest.approx(sum(per_task[(t[0], "centered")]["value"] for t in TASKS) / 5)
    for split in ("train", "val"):  # both splits, as the reference; one pass, so a small split says it ran short
        bpb = per_task[(split, "bpb")]
        assert bpb["value"] > 0 and bpb["phase"] == "base" and bpb["tokens_requested"] == 1024
        assert bpb["tokens"] <= 1024 and bpb["partial"] == (bpb["tokens"] < 1024)
    assert {e["source"] for e in evals if e["metric"] == "acc" and e["task"] != "CORE"} == \
        {f"bundle/local_data/{t[4]}" for t in TASKS}
    assert any(e["kind"] == "sample" for e in events)
    end = events[-1]
    assert end["kind"] == "end" and end["status"] == "ok" and end["core"] == core["value"]

    # two processes: the same numbers
    import shutil
    run2 = tmp_path / "run2"
    shutil.copytree(run_dir, run2, ignore=shutil.ignore_patterns("base_eval"))
    from conftest import stage_env
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "stages.base_eval", "--run-dir", str(run2), "--bundle", str(bundle), "--max-per-task", "5",
                        "--set", "base_eval.bpb_tokens=1024"], env=stage_env(base), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    evals2 = {(e["task"], e["metric"]): e["value"] for e in _core_events(run2) if e["kind"] == "eval"}
    for split in ("train", "val"):
        assert evals2.pop((split, "bpb")) > 0
        per_task.pop((split, "bpb"))
    assert evals2 == {k: e["value"] for k, e in per_task.items()}


def test_base_eval_stage_errors(tiny_run, tmp_path):
    from conftest import run_stage
    run_dir, base = tiny_run
    p = run_stage("stages.base_eval", run_dir, base_dir=base, check=False)
    assert p.returncode != 0 and "no base checkpoint" in p.stderr and "Traceback" not in p.stderr
