"""Chat training stages on CPU with a real (tiny) tokenizer and a random-init tiny GPT as the base:
loss masks, packing, SFT learning a made-up task, RL raising a toy reward, resume, SIGTERM, torchrun."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from chat_toys import lookup_conversations
from conftest import run_stage, stage_env
from nanochat.checkpoint import ckpt_dir, latest_step, list_steps, load_checkpoint, save_checkpoint
from nanochat.events import read_events

MODEL = dict(sequence_len=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")


@pytest.fixture
def chat_run(tiny_run):
    """tiny_run plus a random-init base checkpoint (step 0) for the chat stages to start from."""
    run_dir, base = tiny_run
    from nanochat.tokenizer import Tokenizer
    from nanochat.gpt import build_model
    vocab = Tokenizer.load(run_dir / "tokenizer").get_vocab_size()
    torch.manual_seed(0)
    model = build_model(dict(MODEL, vocab_size=vocab), "cpu")
    save_checkpoint(ckpt_dir(run_dir, "base"), 0, model.state_dict(), None,
                    dict(model_config=dict(MODEL, vocab_size=vocab), total_batch_size=1024))
    return run_dir, base


def events_of(run_dir, stage):
    events, bad = read_events(run_dir / stage / "events.jsonl")
    assert bad == 0
    return events


def since_last_start(events):
    return events[max(i for i, e in enumerate(events) if e["kind"] == "start"):]


def steps(events, key="loss"):
    return {e["step"]: e[key] for e in events if e["kind"] == "step"}


def sets(**kv):
    return [a for k, v in kv.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


# ----------------------------------------------------------------------------- rendering and batching

def supervised_text(conversation) -> str:
    """What the model must learn to write: assistant text and calculator calls, and each turn's end."""
    out = []
    for m in conversation["messages"]:
        if m["role"] != "assistant":
            continue
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            if p["type"] == "text":
                out.append(p["text"])
            elif p["type"] == "python":
                out.append(f"<|python_start|>{p['text']}<|python_end|>")
        out.append("<|assistant_end|>")
    return "".join(out)


def test_rendered_mixture_supervises_only_assistant_and_tool_calls(tiny_tokenizer_dir, tmp_path):
    from nanochat.tasks.mixture import build_mixture
    from nanochat.tokenizer import Tokenizer
    from stages.chat_sft import collate
    tok = Tokenizer.load(tiny_tokenizer_dir)
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "5"}]},
        {"role": "user", "content": "and 4+4?"}, {"role": "assistant", "content": "8"}]}) + "\n")
    mix = build_mixture(f"demo:60|identity|spelling_bee:10|customjson:{path}*2", split="train", seed=5)
    kinds = set()
    for i in range(0, len(mix), 3):
        conv = mix[i]
        x, y = collate(tok, [conv], 1024, "cpu")
        targets = y[0][y[0] >= 0].tolist()
        assert tok.decode(targets) == supervised_text(conv)
        # inputs are the rendering shifted by one: BOS first, and every target is the next input
        ids, _ = tok.render_conversation(conv)
        assert x[0].tolist() == ids[:-1] and x[0, 0] == tok.get_bos_token_id()
        kinds.add("tool" if "<|python_start|>" in supervised_text(conv) else "text")
    assert kinds == {"tool", "text"}
    # a batch pads to its longest row; padding is never a target
    x, y = collate(tok, [mix[0], mix[1], mix[2]], 1024, "cpu")
    lens = [len(tok.render_conversation(mix[i])[0]) - 1 for i in range(3)]
    assert x.shape[1] == max(lens)
    for r, n in enumerate(lens):
        assert (y[r, n:] == -1).all()


def check_rows(packer, tok, rendered, batches) -> int:
    """Rows hold whole conversations, then BOS padding whose targets are -1; returns the padded positions."""
    bos, T, padded = tok.get_bos_token_id(), packer.T, 0
    for _ in range(batches):
        x, y = next(packer)
        assert x.shape == y.shape == (packer.B, T)
        assert (x[:, 0] == bos).all()  # every row starts a conversation
        real = y != -1
        assert (x[:, 1:][real[:, :-1]] == y[:, :-1][real[:, :-1]]).all()
        for r in range(packer.B):
            n = int(real[r].sum()) + 1  # tokens of conversation in the row; the rest is masked BOS padding
            assert real[r, :n - 1].all() and (x[r, n:] == bos).all()
            padded += T + 1 - n
            row = x[r].tolist() + [y[r, -1].item()]
            starts = [i for i in range(n) if row[i] == bos] + [n]
            for a, b in zip(starts, starts[1:]):  # each conversation is whole: never cropped to fill a row
                assert tuple(row[a:b]) in rendered
    return padded


def test_conversation_packer_rows_and_resume(tiny_tokenizer_dir):
    from nanochat.tasks.mixture import build_mixture
    from nanochat.tokenizer import Tokenizer
    from nanochat.dataloader import ConversationPacker
    tok = Tokenizer.load(tiny_tokenizer_dir)
    mix = build_mixture("demo:50|identity", split="train")
    rendered = {tuple(tok.render_conversation(mix[i], max_tokens=97)[0]) for i in range(1, len(mix), 2)}
    # one waiting conversation at a time: padding is certain
    assert check_rows(ConversationPacker(tok, mix, B=3, T=96, rank=1, world_size=2, buffer_size=1), tok, rendered, 4)
    packer = ConversationPacker(tok, mix, B=3, T=96, rank=1, world_size=2)
    check_rows(packer, tok, rendered, 4)
    state = json.loads(json.dumps(packer.state_dict()))
    resumed = ConversationPacker(tok, mix, B=3, T=96, rank=1, world_size=2, state=state)
    for _ in range(5):
        a, b = next(packer), next(resumed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # rank 1 of 2 reads only odd examples: a conversation's start appears in some row of its rank
    first = tok.render_conversation(mix[1], max_tokens=97)[0]
    rows = ConversationPacker(tok, mix, B=8, T=96, rank=1, world_size=2)
    x, _ = next(rows)
    assert any(x[r, :len(first)].tolist() == first[:96] for r in range(8))


# ----------------------------------------------------------------------------- the stages learn

def test_mid_train_learns_the_chat_format(chat_run):
    run_dir, base = chat_run
    run_stage("stages.mid_train", run_dir, *sets(mid_train__num_iterations=30, mid_train__eval_every=15,
                                                  mid_train__max_seq_len=128, mid_train__device_batch_size=4,
                                                  mid_train__eval_tokens=2048), base_dir=base)
    events = events_of(run_dir, "mid_train")
    loss = steps(events)
    assert sorted(loss) == list(range(1, 31))
    assert sum(loss[s] for s in range(28, 31)) < sum(loss[s] for s in range(1, 4)) - 3 * 1.0
    bpb = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in bpb] == [15, 30] and all(e["phase"] == "mid" for e in bpb)
    assert bpb[1]["value"] < bpb[0]["value"]
    end = events[-1]
    assert end["status"] == "ok" and end["steps_done"] == 30 and end["source"] == "base"
    _, _, meta = load_checkpoint(ckpt_dir(run_dir, "mid"))
    assert meta["step"] == 30 and meta["model_config"]["n_layer"] == MODEL["n_layer"]


def test_sft_learns_a_made_up_lookup_task(chat_run, tmp_path):
    """16 made-up names, each with a colour: from no better than chance to (near) perfect recall."""
    run_dir, base = chat_run
    data = tmp_path / "lookup.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in lookup_conversations()))
    run_stage("stages.chat_sft", run_dir, *sets(
        chat_sft__mixture=f"'customjson:{data}*4'", chat_sft__eval_tasks=f"'customjson:{data}'",
        chat_sft__num_iterations=120, chat_sft__eval_every=120, chat_sft__eval_examples=16,
        chat_sft__device_batch_size=8, chat_sft__examples_per_step=16, chat_sft__lr_frac=1.0,
        chat_sft__eval_max_tokens=8), base_dir=base)
    events = events_of(run_dir, "chat_sft")
    acc = [e for e in events if e["kind"] == "eval" and e["metric"] == "acc"]
    assert [e["step"] for e in acc] == [0, 120] and acc[0]["n"] == 16
    assert acc[0]["value"] <= 0.25, acc  # at most chance-level (8 colours) before
    assert acc[1]["value"] >= 0.9, acc
    end = events[-1]
    assert end["source"] == "base"  # no mid checkpoint: SFT falls back to base
    assert end["evals"]["customjson"] == acc[1]["value"] and end["final_loss"] < 0.2


def test_rl_raises_a_toy_reward(chat_run):
    run_dir, base = chat_run
    run_stage("stages.chat_rl", run_dir, *sets(
        chat_rl__task="tests.chat_toys:LetterA", chat_rl__num_iterations=30, chat_rl__examples_per_step=4,
        chat_rl__num_samples=8, chat_rl__max_new_tokens=12, chat_rl__lr_frac=1.0, chat_rl__eval_every=30,
        chat_rl__eval_examples=4, chat_rl__eval_samples=2, chat_rl__save_every=-1), base_dir=base)
    events = events_of(run_dir, "chat_rl")
    reward = steps(events, "reward")
    assert sorted(reward) == list(range(1, 31))
    first, last = sum(reward[s] for s in range(1, 6)) / 5, sum(reward[s] for s in range(26, 31)) / 5
    assert last > first + 0.15, (first, last)
    evals = [e for e in events if e["kind"] == "eval"]
    assert {e["metric"] for e in evals} == {"pass@1", "pass@2"} and all(e["phase"] == "rl" for e in evals)
    end = events[-1]
    assert end["reward_last"] > end["reward_first"] and end["steps_done"] == 30


# ----------------------------------------------------------------------------- resume, stop, torchrun

STAGE_ARGS = {
    "mid_train": sets(mid_train__max_seq_len=128, mid_train__device_batch_size=4, mid_train__eval_every=-1,
                      mid_train__eval_tokens=512, mid_train__num_iterations=4, mid_train__save_every=2),
    "chat_sft": sets(chat_sft__num_iterations=4, chat_sft__save_every=2, chat_sft__eval_every=-1,
                     chat_sft__eval_tasks="''", chat_sft__eval_examples=8, chat_sft__examples_per_step=8,
                     chat_sft__device_batch_size=4),
    "chat_rl": sets(chat_rl__task="tests.chat_toys:LetterA", chat_rl__num_iterations=4, chat_rl__save_every=2,
                    chat_rl__eval_every=-1, chat_rl__examples_per_step=2, chat_rl__num_samples=4,
                    chat_rl__max_new_tokens=8, chat_rl__eval_examples=2, chat_rl__eval_samples=1),
}
PHASE = {"mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mid_train", "chat_sft", "chat_rl"])
def test_resume_retraces_the_uninterrupted_run(chat_run, tmp_path, stage):
    run_dir, base = chat_run
    ref = tmp_path / "ref"
    shutil.copytree(run_dir, ref)
    run_stage(f"stages.{stage}", ref, *STAGE_ARGS[stage], base_dir=base)
    reference = events_of(ref, stage)
    # the same run, "crashed" after its step-2 checkpoint: copy it and remove what came later
    shutil.copytree(ref, run_dir, dirs_exist_ok=True)
    ck = ckpt_dir(run_dir, PHASE[stage])
    assert list_steps(ck) == [2, 4]
    shutil.rmtree(ck / "step_000004")
    run_stage(f"stages.{stage}", run_dir, *STAGE_ARGS[stage], "--resume", base_dir=base)
    after = since_last_start(events_of(run_dir, stage))
    key = "reward" if stage == "chat_rl" else "loss"
    resumed, full = steps(after, key), steps(reference, key)
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4, abs=1e-6), (stage, s)
    assert after[-1]["steps_done"] == 4 and latest_step(ck) == 4


def test_sigterm_checkpoints_and_stops(chat_run):
    run_dir, base = chat_run
    args = sets(chat_sft__num_iterations=500, chat_sft__eval_every=-1, chat_sft__eval_tasks="''",
                chat_sft__eval_examples=8, chat_sft__examples_per_step=4, chat_sft__device_batch_size=4)
    proc = subprocess.Popen([sys.executable, "-m", "stages.chat_sft", "--run-dir", str(run_dir), *args],
                            env=stage_env(base), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = run_dir / "chat_sft" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and '"kind":"step"' in path.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    events = events_of(run_dir, "chat_sft")
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "stopped"
    assert latest_step(ckpt_dir(run_dir, "sft")) == max(steps(events)) < 500


@pytest.mark.slow
def test_two_process_sft_matches_one_process(chat_run, tmp_path):
    """gloo, 2 ranks x 2 rows x 2 accumulation steps = 1 rank x 2 rows x 4: the same 8 conversations per
    step, and token-level normalisation over the whole step makes the losses agree."""
    run1, base = chat_run
    run2 = tmp_path / "run2"
    shutil.copytree(run1, run2)
    args = sets(chat_sft__num_iterations=5, chat_sft__eval_every=5, chat_sft__eval_tasks="demo_math",
                chat_sft__eval_examples=4, chat_sft__eval_max_tokens=8, chat_sft__examples_per_step=8,
                chat_sft__device_batch_size=2)
    run_stage("stages.chat_sft", run1, *args, base_dir=base)
    run_stage("stages.chat_sft", run2, *args, base_dir=base, nproc=2)
    e1, e2 = events_of(run1, "chat_sft"), events_of(run2, "chat_sft")
    assert e2[0]["world_size"] == 2
    l1, l2 = steps(e1), steps(e2)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4, 5]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=2e-3), s
    v1 = [e["value"] for e in e1 if e["kind"] == "eval" and e["task"] == "val"]
    v2 = [e["value"] for e in e2 if e["kind"] == "eval" and e["task"] == "val"]
    assert v2 == pytest.approx(v1, rel=2e-3)
    n = [e["n"] for e in e2 if e["kind"] == "eval" and e["task"] == "demo_math"]
    assert n == [4, 4]  # the quick eval's problems were split over the ranks and summed back
    _, _, meta = load_checkpoint(ckpt_dir(run2, "sft"))
    assert meta["world_size"] == 2 and len(meta["loader_state"]) == 2


# ----------------------------------------------------------------------------- errors

def test_missing_checkpoint_and_bad_mixture_are_one_line_errors(chat_run):
    run_dir, base = chat_run
    p = run_stage("stages.mid_train", run_dir, *sets(mid_train__mixture="'demo|smoltlk'"), base_dir=base, check=False)
    assert p.returncode == 2 and "did you mean 'smoltalk'" in p.stderr and "Traceback" not in p.stderr
    p = run_stage("stages.chat_sft", run_dir, *sets(chat_sft__mixture="'customjson:/nonexistent.jsonl'"),
                  base_dir=base, check=False)
    assert p.returncode == 2 and "/nonexistent.jsonl" in p.stderr and "Traceback" not in p.stderr
    shutil.rmtree(ckpt_dir(run_dir, "base"))
    p = run_stage("stages.chat_sft", run_dir, base_dir=base, check=False)
    assert p.returncode == 2
    assert "no mid or base checkpoint" in p.stderr and "python -m stages.mid_train" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_two_process_rl_samples_what_one_process_samples(chat_run, tmp_path):
    """The sampling seed of a question depends on its place in the step, not on the rank that samples
    it: 1 and 2 processes draw the same answers, so the first step's reward agrees exactly."""
    run1, base = chat_run
    run2 = tmp_path / "run2"
    shutil.copytree(run1, run2)
    args = sets(chat_rl__task="tests.chat_toys:LetterA", chat_rl__num_iterations=3, chat_rl__examples_per_step=4,
                chat_rl__num_samples=4, chat_rl__max_new_tokens=8, chat_rl__eval_every=3, chat_rl__eval_examples=4,
                chat_rl__eval_samples=2, chat_rl__lr_frac=1.0)
    run_stage("stages.chat_rl", run1, *args, base_dir=base)
    run_stage("stages.chat_rl", run2, *args, base_dir=base, nproc=2)
    e1, e2 = events_of(run1, "chat_rl"), events_of(run2, "chat_rl")
    assert e2[0]["world_size"] == 2 and e2[-1]["status"] == "ok" and e2[-1]["steps_done"] == 3
    r1, r2 = steps(e1, "reward"), steps(e2, "reward")
    assert r2[1] == pytest.approx(r1[1], abs=1e-9)
    assert steps(e2)[1] == pytest.approx(steps(e1)[1], rel=1e-3, abs=1e-6)
    p1 = [e["value"] for e in e1 if e["kind"] == "eval"]
    p2 = [e["value"] for e in e2 if e["kind"] == "eval"]
    assert p2[:2] == pytest.approx(p1[:2])  # pass@k before training: same samples, split over ranks
