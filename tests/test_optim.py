"""Muon and AdamW: maths, state_dict round trip, and 2-process (gloo) sharded steps vs 1 process.

This file doubles as the torchrun worker for the distributed test:
    python -m torch.distributed.run --nproc_per_node=2 tests/test_optim.py OUT_DIR
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.optim import AdamW, Muon, _adamw_foreach, _adamw_update, normalize_variance, orthogonalize  # noqa: E402

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 16, 512, 3  # wte/lm_head big enough to be sharded, value embeds not
from test_gpt import one_thread  # noqa: E402,F401  (autouse fixture: tiny models run on one thread)


def tiny_setup():
    """Same model, optimizers and data in every process (seeded)."""
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                    window_pattern="SL")
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # at init the blocks are identities and some gradients are pure rounding noise,
        for p in model.parameters():  # which Adam (eps 1e-10) turns into full steps: start from a generic point
            p.add_(torch.randn_like(p) * 0.02)
    optimizers = model.setup_optimizers(weight_decay=0.1)
    # Adam with eps 1e-10 maps a gradient g ~ 1e-10 (some elements of this tiny model have one) to
    # g / (|g| + eps), whose slope ~1e9 blows a reduction-order rounding difference (1e-12) up to 1e-3 of
    # a step: the comparison below is about sharding, so give Adam an eps far above rounding level
    for group in optimizers[0].param_groups:
        group["eps"] = 1e-4
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=gen)
    return model, optimizers, data


def train_step(model, optimizers, batch):
    loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.item()


def snapshot(model, optimizers) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]}, buf)
    return buf.getvalue()


def restore(blob: bytes):
    state = torch.load(io.BytesIO(blob), weights_only=True)
    model, optimizers, data = tiny_setup()
    model.load_state_dict(state["model"])
    for opt, sd in zip(optimizers, state["optim"]):
        opt.load_state_dict(sd)
    return model, optimizers, data


# ----------------------------------------------------------------------------- single process

def test_orthogonalize_pushes_singular_values_to_one():
    torch.manual_seed(0)
    tall = torch.randn(3, 48, 24) * torch.logspace(-1, 0, 24)  # columns of very different scale
    for G in (tall, tall.mT.contiguous()):  # and wide, rows of very different scale
        X = orthogonalize(G)
        assert X.shape == G.shape
        s, s0 = torch.linalg.svdvals(X), torch.linalg.svdvals(G)
        assert s.min() > 0.6 and s.max() < 1.25, s
        assert (s0.max(-1).values / s0.min(-1).values > 20).all()  # it really was ill-conditioned
        # Frobenius norm is that of a semi-orthogonal matrix, and X points along U V^T
        assert torch.allclose(X.norm(dim=(-2, -1)), torch.full((3,), 24 ** 0.5), rtol=1e-4)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        cos = (X * (U @ Vh)).sum((-2, -1)) / X.norm(dim=(-2, -1)) / 24 ** 0.5
        assert (cos > 0.95).all(), cos


def test_normalize_variance_evens_rows_and_keeps_the_norm():
    torch.manual_seed(0)
    U = torch.randn(2, 16, 8) * torch.linspace(0.2, 3, 16)[:, None]  # tall: rows of very different scale
    second = [torch.zeros(16, 1), torch.zeros(16, 1)]
    out = normalize_variance(U, second, beta2=0.9)
    assert torch.allclose(out.norm(dim=(-2, -1)), U.norm(dim=(-2, -1)), rtol=1e-5)
    rows = out.norm(dim=-1)
    assert torch.allclose(rows, rows[:, :1].expand_as(rows), rtol=1e-4)  # every row now equally loud
    assert torch.allclose(second[0], 0.1 * U[0].square().mean(-1, keepdim=True))  # the buffer was updated
    wide = [torch.zeros(1, 16)]
    normalize_variance(U[:1].mT, wide, beta2=0.9)  # wide matrices keep one number per column
    assert torch.allclose(wide[0], 0.1 * U[0].mT.square().mean(-2, keepdim=True))


def test_muon_step_is_nesterov_momentum_orthogonalized_normalized_and_cautiously_decayed():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.05, momentum=0.9, weight_decay=0.1, beta2=0.9)
    g1, g2 = torch.randn(32, 16), torch.randn(32, 16)
    buf, second = torch.zeros(32, 16), [torch.zeros(32, 1)]
    expected = p0.clone()
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        nesterov = 0.1 * g + 0.9 * buf
        u = normalize_variance(orthogonalize(nesterov[None]), second, 0.9)[0]
        decay = 0.1 * expected * ((u * expected) >= 0)  # only where the step already shrinks the weight
        expected = expected - 0.05 * (32 / 16) ** 0.5 * (u + decay)
    assert torch.allclose(p.detach(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_adamw_matches_torch_adamw_and_fallback_matches_fused():
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(40, 8))
    ours = torch.nn.Parameter(ref.detach().clone())
    opt_ref = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = AdamW([ours], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(40, 8)
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    assert torch.allclose(ref, ours, atol=1e-6)
    # the plain foreach fallback (devices without the fused kernel) computes the same update
    ps = [torch.randn(10, 3) for _ in range(2)]
    args = lambda: ([p.clone() for p in ps], [torch.ones(10, 3)] * 2, [torch.zeros(10, 3) for _ in ps],  # noqa: E731
                    [torch.zeros(10, 3) for _ in ps], [torch.zeros(()) for _ in ps])
    a, b = args(), args()
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)
    for _ in range(3):
        _adamw_update(*a, **kw)
        _adamw_foreach(*b, **kw)
    for x, y in zip(a[0], b[0]):
        assert torch.allclose(x, y, atol=1e-6)


def test_state_dict_round_trip_gives_bit_identical_next_step():
    model, optimizers, data = tiny_setup()
    for step in range(STEPS - 1):
        train_step(model, optimizers, data[step])
    blob = snapshot(model, optimizers)
    loss_a = train_step(model, optimizers, data[STEPS - 1])
    resumed, resumed_opts, _ = restore(blob)
    loss_b = train_step(resumed, resumed_opts, data[STEPS - 1])
    assert loss_a == loss_b
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(grp["initial_lr"] for o in resumed_opts for grp in o.param_groups)


# ----------------------------------------------------------------------------- two processes (gloo)

def dist_worker(out_dir: Path):
    """Each rank trains on its half of every global batch; rank 0 writes the final weights."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    rows = GLOBAL_BATCH // ws
    model, optimizers, data = tiny_setup()
    blob = None
    for step in range(STEPS):
        if step == STEPS - 1:
            blob = snapshot(model, optimizers)  # this rank's optimizer shard, as a checkpoint would hold
        train_step(model, optimizers, data[step, rank * rows:(rank + 1) * rows])
    # resume from the per-rank snapshot and redo the last step: must match exactly
    resumed, resumed_opts, _ = restore(blob)
    train_step(resumed, resumed_opts, data[STEPS - 1, rank * rows:(rank + 1) * rows])
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    adamw, muon = optimizers
    info = {
        "resume_identical": same,
        "wte_exp_avg_rows": adamw.state[model.wte.weight]["exp_avg"].shape[0],
        "muon_owned": len(muon.state),
        "muon_total": sum(len(g["params"]) for g in muon.param_groups),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        torch.save(model.state_dict(), out_dir / "model.pt")
    dist.destroy_process_group()


def test_two_process_sharded_step_matches_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the workers too, not just the launcher
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-5000:]
    model, optimizers, data = tiny_setup()
    for step in range(STEPS):
        train_step(model, optimizers, data[step])
    dist_state = torch.load(tmp_path / "model.pt", weights_only=True)
    moved = 0.0
    for (name, ours), theirs in zip(model.state_dict().items(), dist_state.values()):
        assert torch.allclose(ours, theirs, atol=2e-5, rtol=1e-4), (name, (ours - theirs).abs().max())
        moved = max(moved, (ours - tiny_setup()[0].state_dict()[name]).abs().max().item())
    assert moved > 1e-3  # the comparison is not between two untrained models
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(i["resume_identical"] for i in infos)
    assert all(i["wte_exp_avg_rows"] == VOCAB // 2 for i in infos)  # AdamW state is sharded
    assert sum(i["muon_owned"] for i in infos) == infos[0]["muon_total"]  # each matrix owned by one rank
    assert all(0 < i["muon_owned"] < i["muon_total"] for i in infos)


if __name__ == "__main__":
    dist_worker(Path(sys.argv[1]))
