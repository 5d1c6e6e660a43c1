"""GPT model: shapes, loss, the fused chunked loss, KV-cache decode vs full forward, init, counting."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.cpu_kernels import SoftcapCrossEntropy
from nanochat.gpt import GPT, SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig, KVCache, _sliding_mask, attention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy shared machine thread barriers cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    base = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SL")
    base.update(kw)
    return GPTConfig(**base)


def make_model(seed=0, perturb=0.0, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    model.init_weights()
    if perturb:  # zero-initialised projections make every block the identity: perturb so layers matter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return model


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        tiny_config(n_kv_head=3)
    with pytest.raises(ValueError, match="window_pattern"):
        tiny_config(window_pattern="SXL")


def test_window_sizes_tile_pattern_and_last_layer_is_full():
    cfg = tiny_config(n_layer=6, window_pattern="SSL", sequence_len=64)
    assert cfg.window_sizes() == [16, 16, None, 16, 16, None]  # a quarter of the context
    cfg = tiny_config(n_layer=3, window_pattern="S", sequence_len=66)
    assert cfg.window_sizes() == [17, 17, None]  # rounded up
    # from 512 tokens up, a quarter rounded up to the 128-token tile
    assert tiny_config(n_layer=4, window_pattern="SSSL", sequence_len=2048).window_sizes() == [512] * 3 + [None]
    assert tiny_config(n_layer=2, window_pattern="S", sequence_len=1000).window_sizes() == [256, None]


def test_forward_backward_shapes_and_finite_loss():
    model = make_model()
    B, T = 2, 32
    idx = torch.randint(0, 97, (B, T))
    logits = model(idx)
    assert logits.shape == (B, T, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap  # soft cap holds
    loss = model(idx, idx.roll(-1, 1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(97)) < 0.5  # near-uniform predictions at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    per_token = model(idx, idx.roll(-1, 1), loss_reduction="none")
    assert per_token.shape == (B, T)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, idx, loss_reduction="avg")


@pytest.mark.parametrize("reduction,cap", [("mean", 3.0), ("sum", 3.0), ("mean", 50.0)])
def test_chunked_loss_matches_plain_cross_entropy(reduction, cap):
    # cap 3: the tanh is far from linear; cap 50: the exp() shift that keeps large caps from overflowing
    torch.manual_seed(1)
    N, C, V = 50, 16, 40
    h = (torch.randn(N, C, dtype=torch.float64) * (1 if cap < 10 else 20)).requires_grad_()
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, V, (N,))
    tgt[::7] = -1  # ignored positions
    loss = SoftcapCrossEntropy.apply(h, w, tgt, cap, reduction, 8)  # 7 chunks, last one partial
    gh, gw = torch.autograd.grad(loss * 1.7, (h, w))
    logits = cap * torch.tanh(h @ w.t() / cap)
    ref = F.cross_entropy(logits, tgt, ignore_index=-1, reduction=reduction)
    rh, rw = torch.autograd.grad(ref * 1.7, (h, w))
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(gh, rh, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)


def test_model_chunked_and_plain_loss_paths_agree():
    model = make_model(perturb=0.05)
    idx = torch.randint(0, 97, (2, 32))
    tgt = idx.roll(-1, 1)
    tgt[:, :5] = -1
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        model.chunked_loss, model.loss_chunk_rows = chunked, 24
        loss = model(idx, tgt)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_loss_falls_on_tiny_repeated_corpus():
    model = make_model(seed=3, window_pattern="L")
    optimizers = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.3, matrix_lr=0.03, scalar_lr=0.1)
    corpus = torch.tensor(([5, 17, 42, 8, 91, 3, 3, 60] * 20)[:66])
    x, y = corpus[:-1][None, :32].repeat(2, 1), corpus[1:][None, :32].repeat(2, 1)
    losses = []
    for _ in range(40):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.5, losses


def _decode_in_pieces(model, idx, pieces, cache_len):
    B = idx.size(0)
    cfg = model.config
    cache = KVCache(B, cfg.n_kv_head, cache_len, cfg.head_dim, cfg.n_layer)
    outs, pos = [], 0
    for n in pieces:
        outs.append(model(idx[:, pos:pos + n], kv_cache=cache))
        pos += n
        assert cache.get_pos() == pos
    return torch.cat(outs, 1)


@pytest.mark.parametrize("n_kv_head,pattern", [(2, "SL"), (4, "S"), (1, "L")])
def test_cached_decode_matches_full_forward(n_kv_head, pattern):
    # sequence_len 16 -> S layers see 8 tokens; decode 40 tokens so windows slide well past the start
    model = make_model(perturb=0.1, n_kv_head=n_kv_head, window_pattern=pattern, sequence_len=16).eval()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(idx)
        stepwise = _decode_in_pieces(model, idx, [5] + [1] * 10 + [12] + [1] * 13, cache_len=48)
        chunks = _decode_in_pieces(model, idx, [3, 9, 1, 20, 7], cache_len=40)
    assert torch.allclose(full, stepwise, atol=1e-4), (full - stepwise).abs().max()
    assert torch.allclose(full, chunks, atol=1e-4), (full - chunks).abs().max()


def masked_reference(q, k, v, window):
    """Attention written out: scores, the causal/window mask, softmax, values (GQA by repeating kv heads)."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.mT) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~_sliding_mask(q.size(2), k.size(2), window, q.device), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("window,Tq,Tk", [(None, 12, 12), (3, 12, 12), (6, 1, 12), (3, 4, 12), (None, 4, 12)])
def test_every_attention_path_equals_the_masked_reference(window, Tq, Tk):
    """Training/prefill (Tq = Tk), one decode step and a chunk on top of a KV cache (Tq < Tk), GQA.
    FlexAttention has no backward on CPU: its gradients are checked on the GPU by bench/gpu.py."""
    gen = torch.Generator().manual_seed(Tq * 100 + Tk + (window or 0))
    q = torch.randn(2, 4, Tq, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, Tk, 16, generator=gen, dtype=torch.float64, requires_grad=True)  # 2 kv heads
    v = torch.randn(2, 2, Tk, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 4, Tq, 16, generator=gen, dtype=torch.float64)
    want = masked_reference(q, k, v, window)
    grads_want = torch.autograd.grad(want, (q, k, v), dy)
    for impl in ("auto", "sdpa"):
        got = attention(q, k, v, window, impl=impl)
        assert torch.allclose(got, want, atol=1e-10), impl
        for a, b in zip(torch.autograd.grad(got, (q, k, v), dy), grads_want):
            assert torch.allclose(a, b, atol=1e-10), impl
    assert torch.allclose(attention(q.detach(), k.detach(), v.detach(), window, impl="flex"), want, atol=1e-10)


def test_flex_block_mask_is_the_sliding_mask():
    from nanochat.gpt import _block_mask
    for Tq, Tk, window in [(300, 300, 128), (5, 300, 100), (300, 300, None)]:
        bm = _block_mask(Tq, Tk, window, "cpu")
        qi, ki = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
        assert torch.equal(bm.mask_mod(0, 0, qi, ki), _sliding_mask(Tq, Tk, window, torch.device("cpu")))
        full_blocks = (Tk + 127) // 128
        if window is not None and Tq == Tk:  # block-sparse: the last query block skips the first key block
            assert bm.to_dense()[0, 0, -1].sum() < full_blocks


def test_attention_rejects_an_unknown_impl():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="allowed: auto, sdpa, flex"):
        attention(q, q, q, None, impl="fa9")


def test_sliding_window_really_limits_attention():
    from nanochat.gpt import attention
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    y = attention(q, k, v, window=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :6], v2[:, :, :6] = 0.0, 0.0  # position 9 sees only 6..9 with a window of 4
    y2 = attention(q, k2, v2, window=4)
    assert torch.allclose(y[:, :, 9], y2[:, :, 9])
    assert not torch.allclose(y[:, :, 8], y2[:, :, 8])  # position 8 sees 5..8, and 5 changed
    full = attention(q, k2, v2, window=None)
    assert not torch.allclose(y2[:, :, 9], full[:, :, 9])  # without the window, 9 would see the change
    assert make_model(n_layer=2, window_pattern="S", sequence_len=8).windows == [2, None]


def test_kv_cache_prefill_copies_one_row_into_many():
    model = make_model(perturb=0.1).eval()
    cfg = model.config
    prompt = torch.randint(0, 97, (1, 9))
    cont = torch.randint(0, 97, (3, 4))  # three different continuations of the same prompt
    with torch.no_grad():
        one = KVCache(1, cfg.n_kv_head, 20, cfg.head_dim, cfg.n_layer)
        model(prompt, kv_cache=one)
        many = KVCache(3, cfg.n_kv_head, 20, cfg.head_dim, cfg.n_layer)
        many.prefill(one)
        assert many.get_pos() == 9
        got = torch.cat([model(cont[:, i:i + 1], kv_cache=many) for i in range(4)], 1)
        want = model(torch.cat([prompt.repeat(3, 1), cont], 1))[:, 9:]
    assert torch.allclose(got, want, atol=1e-4)
    many.reset()
    assert many.get_pos() == 0
    with pytest.raises(ValueError, match="batch-1"):
        one.prefill(many)
    small = KVCache(1, cfg.n_kv_head, 10, cfg.head_dim, cfg.n_layer)
    with torch.no_grad(), pytest.raises(ValueError, match="KVCache is full"):
        model(torch.randint(0, 97, (1, 11)), kv_cache=small)


def test_meta_device_init_then_init_weights():
    torch.manual_seed(5)
    with torch.device("meta"):
        meta = GPT(tiny_config())
    assert meta.wte.weight.is_meta
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.init_weights()
    torch.manual_seed(5)
    ref = GPT(tiny_config())
    torch.manual_seed(5)
    ref.init_weights()
    for (name, a), b in zip(meta.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(meta.cos, ref.cos) and torch.equal(meta.sin, ref.sin)  # rotary buffers rebuilt
    idx = torch.randint(0, 97, (1, 16))
    assert torch.allclose(meta(idx), ref(idx))
    assert "cos" not in meta.state_dict()  # derived, never checkpointed


def test_param_groups_counts_and_optimizer_groups():
    model = make_model(n_layer=4)
    cfg = model.config
    C, kv, V = cfg.n_embd, cfg.n_kv_head * cfg.head_dim, cfg.vocab_size
    g = model.num_params_by_group()
    assert g["wte"] == V * C and g["lm_head"] == V * C
    assert g["value_embeds"] == 2 * V * kv  # layers 1 and 3 (every other layer, last included)
    assert g["matrices"] == cfg.n_layer * (2 * C * C + 2 * C * kv + 8 * C * C) + 2 * VE_GATE_CHANNELS * cfg.n_kv_head  # + gates
    assert g["scalars"] == 2 * cfg.n_layer + SMEAR_CHANNELS + 2  # lambdas, smear gate, smear and backout lambdas
    assert g["total"] == sum(p.numel() for p in model.parameters())
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5)
    names = [grp["name"] for grp in adamw.param_groups]
    assert names == ["lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear_backout"]
    scale = (C / 768) ** -0.5
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.004 * scale)
    assert adamw.param_groups[1]["lr"] == pytest.approx(0.2 * scale)
    assert adamw.param_groups[2]["lr"] == pytest.approx(0.1 * scale)  # value embeddings: half
    assert adamw.param_groups[3]["lr"] == pytest.approx(0.005) and adamw.param_groups[4]["lr"] == 0.5
    assert [grp["betas"] for grp in adamw.param_groups] == [(0.8, 0.96), (0.8, 0.995), (0.8, 0.995), (0.8, 0.95),
                                                            (0.96, 0.95), (0.8, 0.95)]
    assert all(p.ndim == 2 for grp in muon.param_groups for p in grp["params"])
    assert sum(len(grp["params"]) for grp in muon.param_groups) == 6 * cfg.n_layer + 2  # + 2 value-embedding gates
    assert {len({tuple(p.shape) for p in grp["params"]}) for grp in muon.param_groups} == {1}  # one shape each
    for opt in (adamw, muon):
        assert all(grp["initial_lr"] == grp["lr"] for grp in opt.param_groups)


def test_estimate_flops_formula():
    model = make_model(n_layer=4, window_pattern="SSSL", sequence_len=64)
    g = model.num_params_by_group()
    cfg = model.config
    dense = g["total"] - g["wte"] - g["value_embeds"]
    attn = 12 * cfg.n_head * cfg.head_dim * (16 * 3 + 64)  # three S layers (window 16) + the full last one
    assert model.estimate_flops() == 6 * dense + attn


def test_compute_dtype_override_runs_in_bf16():
    model = make_model()
    model.compute_dtype = torch.bfloat16
    idx = torch.randint(0, 97, (2, 16))
    logits = model(idx)
    assert logits.dtype == torch.float32  # fp32 out even when computing in bf16
    assert model.wte.weight.dtype == torch.float32  # masters stay fp32
    ref = make_model()(idx)
    assert (logits - ref).abs().max() < 0.1


def test_chunked_loss_backward_runs_once():
    model = make_model()
    idx = torch.randint(0, 97, (2, 16))
    loss = model(idx, idx)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
