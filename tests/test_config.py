import pytest

import math
import tomllib

from nanochat.config import PROFILES, ConfigError, check_data_dir, config_path, dumps_toml, load_config


def test_every_profile_loads_and_differs_by_depth():
    assert list(PROFILES) == list(tomllib.loads(config_path().read_text())["profiles"])  # read from the TOML
    depths = {p: load_config(p)["base_train"]["depth"] for p in PROFILES}
    assert depths["speedrun"] == 24 and depths["d26"] == 26 and depths["d32"] == 32
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
    assert cfg.inputs["base_train"]["num_iterations"] == -1  # what was asked for (and what save writes)
    bt = cfg["base_train"]  # what stages read: the horizon from the ratio, in whole batches
    assert bt["num_iterations"] == round(bt["target_param_data_ratio"] * 655_424 / bt["total_batch_size"])


@pytest.mark.parametrize("override, message", [
    ("base_train.matrix_lr=nan", "base_train.matrix_lr = nan is not allowed; it must be a finite number"),
    ("base_train.embedding_lr=inf", "base_train.embedding_lr = inf is not allowed; it must be a finite number"),
    ("base_train.scalar_lr=-inf", "base_train.scalar_lr = -inf is not allowed; it must be a finite number"),
    ("base_train.matrix_lr=-0.1", "base_train.matrix_lr = -0.1 is out of range; allowed: 0 to no limit"),
    ("chat_rl.num_epochs=-2", "chat_rl.num_epochs = -2 is out of range; allowed: 1 to no limit"),
    ("chat_rl.top_k=-3", "chat_rl.top_k = -3 is out of range; allowed: 0 to no limit"),
    ("run.seed=-1", "run.seed = -1 is out of range; allowed: 0 to no limit"),
    ("base_train.eval_every=-7", "base_train.eval_every = -7 is not allowed; use a positive value or -1 to derive it"),
    ("data.source=c4", "data.source = 'c4' is not allowed; choose one of: climbmix, fineweb, demo, local"),
    ("data.num_shards=5000", "data.num_shards = 5000 is more than fineweb has; allowed: 1 to 1822"),
])
def test_new_rules_reject_non_finite_and_out_of_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("speedrun", ["data.source=fineweb", override] if "num_shards" in override else [override])
    assert str(e.value) == message


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe[run]\n", "is not valid UTF-8"),
    (b"[run\n", "is not valid TOML"),
    (b"run = 3\n", "'run' in "),
    (b"[run]\nnproc_per_node = 'eight'\n", "run.nproc_per_node must be an integer, got 'eight'"),
    (b"[run]\nstages = [1, 2]\n", "run.stages entry 1 must be a stage module name"),
    (b"meta = 5\n", "[meta] in "),
    (b"[meta]\nprofile = 3\n", "[meta] in "),
    (b"[base_train]\nmatrix_lr = nan\n", "base_train.matrix_lr = nan is not allowed"),
])
def test_malformed_saved_config_is_one_config_error(tmp_path, content, message):
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(path=path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_saved_config_is_a_config_error(tmp_path):
    (tmp_path / "config.toml").mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path=tmp_path / "config.toml")


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
    with pytest.raises(ConfigError, match=r"fill it with: python -m nanochat.dataset --source climbmix -n 170 --dir "):
        check_data_dir(cfg)
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "a.txt").write_text("x")
    assert check_data_dir(cfg) == tmp_path / "nowhere"


def test_base_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    cfg = load_config("demo")
    with pytest.raises(ConfigError, match=str(tmp_path / "base" / "demo_data")):
        check_data_dir(cfg)


def test_saved_config_holds_inputs_so_derivation_is_not_applied_twice(tmp_path):
    cfg = load_config("speedrun")
    cfg.save(tmp_path / "config.toml")
    saved = tomllib.loads((tmp_path / "config.toml").read_text())
    assert saved["base_train"]["total_batch_size"] == -1 and saved["base_train"]["matrix_lr"] == 0.02
    again = load_config(path=tmp_path / "config.toml")
    assert again["base_train"] == cfg["base_train"]  # the same LRs: scaled once, from the inputs
    assert math.isclose(cfg["base_train"]["matrix_lr"], 0.02 * math.sqrt(cfg["base_train"]["total_batch_size"] / 2 ** 19))


def test_demo_profile_states_only_what_makes_it_a_demo():
    demo = tomllib.loads(config_path().read_text())["profiles"]["demo"]
    assert sum(len(v) for v in demo.values()) <= 40  # it was 46 before derive scaled small depths
    cfg = load_config("demo")
    bt, mid = cfg["base_train"], cfg["mid_train"]
    # what the demo used to state by hand now follows from depth 2 and its 300 x 2048-token budget
    assert (bt["max_seq_len"], bt["device_batch_size"], bt["eval_every"], bt["save_every"], bt["sample_every"],
            bt["eval_tokens"]) == (256, 8, 100, 100, 100, 16384)
    assert (mid["max_seq_len"], mid["device_batch_size"], mid["total_batch_size"]) == (256, 8, 2048)
    assert cfg["base_eval"]["bpb_tokens"] == 16384
    assert bt["matrix_lr"] == 0.03 and bt["weight_decay"] == 0.0  # hparam_scaling off: as stated


def test_cadence_zero_means_only_at_the_end():
    bt = load_config("demo", ["base_train.eval_every=0", "base_train.save_every=0"])["base_train"]
    assert bt["eval_every"] == bt["save_every"] == bt["num_iterations"] == 300
