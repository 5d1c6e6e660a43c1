"""fp8 training switch (nanochat/fp8.py) and the fp16 refusal, on CPU: the module swap, what stays
the same (parameters, state dict, the optimizers' tensors), the bf16 swap-back for evaluation, and
the one-line errors. The fp8 matmuls themselves need an H100-class GPU (bench/gpu.py runs a step)."""
import pytest
import torch

from nanochat.config import ConfigError
from nanochat.fp8 import bf16_linears, fp8_eligible, fp8_unavailable
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import check_train_dtype


def small_model(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                          window_pattern="L"), **kw)
    model.init_weights()
    return model


def test_fp8_is_refused_off_cuda_with_one_line():
    why = fp8_unavailable(torch.device("cpu"))
    assert why and "\n" not in why and "base_train.fp8" in why and "H100" in why


def test_eligible_linears_are_the_big_multiple_of_16_ones():
    assert fp8_eligible(torch.nn.Linear(128, 512))
    assert not fp8_eligible(torch.nn.Linear(64, 512))   # too small to gain
    assert not fp8_eligible(torch.nn.Linear(136, 512))  # not a multiple of 16
    assert not fp8_eligible(torch.nn.Embedding(10, 128))


def test_convert_swaps_block_linears_and_keeps_parameters():
    pytest.importorskip("torchao.float8")
    from nanochat.fp8 import convert_to_fp8
    model = small_model()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    n = convert_to_fp8(model)
    # per block: c_q, c_k, c_v, c_proj (128x128), c_fc, mlp.c_proj (128x512); lm_head (128 -> 256);
    # not the 12-channel value-embedding gate or the 24-channel smear gate
    assert n == 2 * 6 + 1
    assert type(model.blocks[0].attn.c_q).__name__ == "Float8Linear"
    assert type(model.blocks[1].attn.ve_gate).__name__ == "Linear"
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    assert all(p is params[name] for name, p in model.named_parameters())  # optimizers keep their tensors
    with bf16_linears(model):
        assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())
        assert model.blocks[0].attn.c_q.weight is params["blocks.0.attn.c_q.weight"]
        x = torch.randint(0, 256, (1, 8))
        assert torch.isfinite(model(x, x)).all()  # evaluation runs on the plain linears
    assert type(model.blocks[0].attn.c_q).__name__ == "Float8Linear"  # and the fp8 ones come back


def test_fp16_training_is_refused():
    with pytest.raises(ConfigError, match="fp16 training is refused: it needs a GradScaler"):
        check_train_dtype(small_model(compute_dtype=torch.float16), torch.device("cpu"))
    check_train_dtype(small_model(compute_dtype=torch.float32), torch.device("cpu"))  # fp32 is fine
