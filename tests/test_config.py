import pytest

from nanochat.config import (PROFILES, ConfigError, check_data_dir, derive_num_iterations, derive_total_batch,
                             dumps_toml, load_config, model_dims)


def test_every_profile_loads_and_differs_by_depth():
    depths = {p: load_config(p)["base_train"]["depth"] for p in PROFILES}
    assert depths["speedrun"] == 20 and depths["d26"] == 26 and depths["d32"] == 32
    assert depths["demo"] < depths["cpu"] < depths["speedrun"]
    assert load_config("demo")["run"]["device"] == "cpu"


def test_override_applies_on_top_of_profile():
    cfg = load_config("speedrun", ["base_train.depth=12", "run.device=cpu", "base_train.warmdown_ratio=0.5"])
    assert cfg["base_train"]["depth"] == 12
    assert cfg["run"]["device"] == "cpu"  # a bare word is a string
    assert cfg["run"]["nproc_per_node"] == 8  # untouched profile value stays


@pytest.mark.parametrize("override, message", [
    ("base_train.dpeth=3", "unknown config key 'base_train.dpeth' in --set base_train.dpeth=3; did you mean 'base_train.depth'?"),
    ("base_trian.depth=3", "unknown config section 'base_trian' in --set base_trian.depth=3; did you mean 'base_train'?"),
    ("base_train.depth=0", "base_train.depth = 0 is out of range; allowed: 1 to 64"),
    ("base_train.depth=2.5", "base_train.depth must be an integer, got 2.5"),
    ("base_train.depth=deep", "base_train.depth must be an integer, got 'deep'"),
    ("run.device=tpu", "run.device = 'tpu' is not allowed; choose one of: auto, cuda, cpu, mps"),
    ("base_train.num_iterations=-5", "base_train.num_iterations = -5 is not allowed; use a positive value or -1 to derive it"),
    ("depth=3", "override key 'depth' must be section.key (e.g. base_train.depth)"),
    ("base_train.depth", "override 'base_train.depth' must look like section.key=value (e.g. base_train.depth=12)"),
    ("base_train.window_pattern=SXL", "base_train.window_pattern = 'SXL': use only the letters S and L"),
    ("run.nnodes=2", "run.nnodes > 1 needs run.rdzv_endpoint (host:port of the rendezvous node)"),
])
def test_config_errors_name_the_problem(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert str(e.value) == message


def test_unknown_profile_names_nearest():
    with pytest.raises(ConfigError, match="unknown profile 'speedrn'; did you mean 'speedrun'"):
        load_config("speedrn")


def test_float_key_accepts_int_and_minus_one_means_derive():
    cfg = load_config("demo", ["base_train.warmdown_ratio=1", "base_train.num_iterations=-1"])
    assert cfg["base_train"]["warmdown_ratio"] == 1.0 and isinstance(cfg["base_train"]["warmdown_ratio"], float)
    assert cfg["base_train"]["num_iterations"] == -1


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["base_train.depth=3", "run.stages=['tok_train', 'base_train']"])
    cfg.save(tmp_path / "config.toml")
    again = load_config(path=tmp_path / "config.toml")
    assert again.to_dict() == cfg.to_dict()
    assert again.profile == "demo"
    # overrides still apply on top of a saved run config
    assert load_config(path=tmp_path / "config.toml", overrides=["base_train.depth=5"])["base_train"]["depth"] == 5


def test_toml_writer_escapes_strings(tmp_path):
    import tomllib
    text = dumps_toml({"s": {"a": 'quote " and \\ and\nnewline', "b": [1, 2], "c": True, "d": 1.5}})
    assert tomllib.loads(text) == {"s": {"a": 'quote " and \\ and\nnewline', "b": [1, 2], "c": True, "d": 1.5}}


def test_missing_data_dir_names_the_command(tmp_path):
    cfg = load_config("demo", [f"data.dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"missing or empty; fill it with: python -m nanochat.demo_corpus --dir "):
        check_data_dir(cfg)
    cfg = load_config("speedrun", [f"data.dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"fill it with: python -m nanochat.dataset -n 240 --dir "):
        check_data_dir(cfg)
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "a.txt").write_text("x")
    assert check_data_dir(cfg) == tmp_path / "nowhere"


def test_base_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    cfg = load_config("demo")
    with pytest.raises(ConfigError, match=str(tmp_path / "base" / "demo_data")):
        check_data_dir(cfg)


def test_depth_is_the_one_dial():
    d12, d20 = model_dims(12), model_dims(20)
    assert d20 == {"n_layer": 20, "n_embd": 1280, "n_head": 10, "n_kv_head": 10}
    assert d12["n_embd"] == 768 and d12["n_head"] == 6
    # the batch grows with the model and is a power of two; d20-size gets the reference 2^19
    assert derive_total_batch(560e6, 2048) == 2 ** 19
    small, big = derive_total_batch(20e6, 512), derive_total_batch(2e9, 2048)
    assert small < 2 ** 19 < big and all(b & (b - 1) == 0 for b in (small, big))
    # horizon: tokens = ratio * params
    assert derive_num_iterations(560_000_000, 2 ** 19, 20) == round(20 * 560_000_000 / 2 ** 19)
