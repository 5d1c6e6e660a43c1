"""Derivation from depth (nanochat/scaling.py) and `nanochat plan`."""
import json
import math

import pytest
import torch

from nanochat.cli import main
from nanochat.config import ConfigError, check_plan, load_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.scaling import B_REF, count_params, model_config, model_dims, plan, scaling_params


@pytest.mark.parametrize("depth", range(1, 41))
def test_every_depth_plans_and_builds(depth):
    cfg = load_config(None, [f"base_train.depth={depth}"])
    p = plan(cfg)
    m = p["stages"]["base_train"]["model"]
    assert m["n_embd"] % 128 == 0 and m["n_embd"] // m["n_head"] == 128 and m["n_embd"] >= 64 * depth
    with torch.device("meta"):
        model = GPT(GPTConfig(**m))  # builds: heads divide the width exactly
    assert model.num_params_by_group() == p["stages"]["base_train"]["params"]
    b = p["stages"]["base_train"]
    B = b["total_batch_size"]
    assert B & (B - 1) == 0 and B % (b["device_batch_size"] * m["sequence_len"]) == 0
    assert b["grad_accum"] * b["device_batch_size"] * m["sequence_len"] == B


def test_width_rounds_up_to_whole_heads():
    # the odd depths that used to crash (704 channels for 5 heads) or get odd head dims
    assert model_dims(11) == {"n_layer": 11, "n_embd": 768, "n_head": 6, "n_kv_head": 6}
    assert model_dims(3) == {"n_layer": 3, "n_embd": 256, "n_head": 2, "n_kv_head": 2}
    assert model_dims(20)["n_embd"] == 1280 and model_dims(1, head_dim=64)["n_embd"] == 64


def test_batch_horizon_lr_and_weight_decay_follow_the_rules():
    cfg = load_config(None, ["base_train.depth=16"])
    inputs, bt = cfg.inputs["base_train"], cfg["base_train"]
    S = scaling_params(count_params(model_config(bt, 32768))[0])
    S12 = scaling_params(count_params(model_config(bt, 32768, depth=12))[0])
    ratio = inputs["target_param_data_ratio"]
    B = bt["total_batch_size"]
    predicted = B_REF * (S / S12) ** 0.383  # D / D_ref = S / S_12 at one ratio
    assert B & (B - 1) == 0 and predicted / math.sqrt(2) <= B <= predicted * math.sqrt(2)
    assert bt["num_iterations"] == round(ratio * S / B)
    assert math.isclose(bt["matrix_lr"], inputs["matrix_lr"] * math.sqrt(B / B_REF))
    assert math.isclose(bt["embedding_lr"], inputs["embedding_lr"] * math.sqrt(B / B_REF))
    D = ratio * S
    assert math.isclose(bt["weight_decay"], inputs["weight_decay"] * math.sqrt(B / B_REF) * ratio * S12 / D)
    # a run cut short keeps the horizon's weight decay (scaled by the steps run, 300 d4 steps got 23)
    short = load_config(None, ["base_train.depth=16", "base_train.num_iterations=300"])["base_train"]
    assert short["weight_decay"] == bt["weight_decay"] and short["num_iterations"] == 300
    # d12 is the reference: the 2^19 batch, unscaled LRs
    d12 = load_config(None, ["base_train.depth=12"])["base_train"]
    assert d12["total_batch_size"] == B_REF and d12["matrix_lr"] == inputs["matrix_lr"]


def test_plan_speedrun_json_ratio_and_data(capsys):
    assert main(["plan", "--profile", "speedrun", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    b = p["stages"]["base_train"]
    ratio = load_config("speedrun").inputs["base_train"]["target_param_data_ratio"]
    assert b["scaling_params"] == b["params"]["matrices"] + b["params"]["lm_head"]
    # tokens / scaling params is the profile's ratio, up to the last partial batch
    assert abs(b["tokens"] / b["scaling_params"] - ratio) <= b["total_batch_size"] / b["scaling_params"]
    assert p["data"]["covers"] and p["data"]["configured"] >= p["data"]["needed"]
    assert p["data"]["needed"] * p["data"]["tokens_per_shard"] >= b["tokens"]
    c = p["compute"]
    assert c["mfu_source"] == "assumed" and c["gpus"] == 8 and c["base_train_hours"] > 0
    assert math.isclose(c["base_train_hours"] * 3600 * c["peak_flops"] * 8 * c["mfu"], b["total_flops"])
    assert b["total_flops"] == b["flops_per_token"] * b["tokens"]


@pytest.mark.parametrize("profile", ["speedrun", "d26", "d32"])
def test_gpu_profiles_have_the_shards_they_need(profile):
    check_plan(load_config(profile))


def test_plan_table_and_refusal(capsys, tmp_path, monkeypatch):
    assert main(["plan", "--profile", "d26"]) == 0
    out = capsys.readouterr().out
    assert "d26: width 1664, 13 heads of 128" in out and "(assumed)" in out and "covers the horizon" in out
    with pytest.raises(ConfigError) as e:
        check_plan(load_config("speedrun", ["data.num_shards=50"]))
    needed = plan(load_config("speedrun"))["data"]["needed"]
    assert str(e.value).startswith("data.num_shards = 50 (climbmix) cannot cover the ")
    assert str(e.value).endswith(f"set data.num_shards = {needed} or more")
    # `nanochat run` refuses it before creating anything
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as ex:
        main(["run", "--profile", "speedrun", "--set", "data.num_shards=50"])
    assert ex.value.code == 2
    assert capsys.readouterr().err.strip() == f"nanochat: error: {e.value}"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # and the needed count is indeed enough
    check_plan(load_config("speedrun", [f"data.num_shards={needed}"]))


def test_batch_that_cannot_split_over_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match=r"total_batch_size = 1000 is not a multiple of device_batch_size"):
        load_config("demo", ["base_train.total_batch_size=1000"])
    with pytest.raises(ConfigError, match=r"less than one 256-token row per GPU \(4 GPUs\)"):
        load_config("demo", ["run.nproc_per_node=4", "base_train.total_batch_size=512"])
