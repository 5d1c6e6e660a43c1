"""The one config: nanochat.toml defaults, a profile on top, `--set section.key=value` overrides on top.

Validation happens once, here, so that stages can trust their config: an unknown key names the
nearest valid one, a wrong type or out-of-range value names what is allowed. The derivations from
`depth` (the one dial) live here too, so every consumer derives the same numbers.
"""
from __future__ import annotations

import difflib
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write, get_base_dir

REPO_CONFIG = Path(__file__).resolve().parent.parent / "nanochat.toml"
PROFILES = ("demo", "cpu", "speedrun", "d26", "d32")

# Allowed ranges and choices. Keys not listed accept any value of the default's type.
RANGES: dict[str, tuple[float, float]] = {
    "run.nproc_per_node": (1, 1024), "run.nnodes": (1, 4096),
    "data.num_shards": (2, 1823),
    "tokenizer.vocab_size": (256 + 9, 1 << 20), "tokenizer.max_chars": (1, 10**13), "tokenizer.doc_cap": (1, 10**9),
    "base_train.depth": (1, 64), "base_train.aspect_ratio": (8, 512), "base_train.head_dim": (8, 512),
    "base_train.max_seq_len": (8, 1 << 17), "base_train.device_batch_size": (1, 4096),
    "base_train.target_param_data_ratio": (0.01, 10_000), "base_train.warmup_steps": (0, 10**9),
    "base_train.warmdown_ratio": (0.0, 1.0), "base_train.final_lr_frac": (0.0, 1.0),
    "base_train.weight_decay": (0.0, 10.0),
    "mid_train.device_batch_size": (1, 4096), "mid_train.max_seq_len": (8, 1 << 17),
    "chat_sft.device_batch_size": (1, 4096), "chat_rl.device_batch_size": (1, 4096),
    "chat_rl.num_samples": (1, 1024), "chat_rl.temperature": (0.0, 10.0),
    "chat_eval.temperature": (0.0, 10.0), "chat_eval.num_samples": (1, 1024),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cuda", "cpu", "mps"),
    "data.source": ("fineweb", "demo", "local"),
}
# keys where -1 means "derive it" (exempt from the lower bound)
AUTO_KEYS = {"base_train.total_batch_size", "base_train.num_iterations", "base_train.eval_every",
             "base_train.save_every", "base_train.sample_every", "base_eval.max_per_task",
             "mid_train.num_iterations", "mid_train.save_every", "chat_sft.num_iterations", "chat_sft.save_every",
             "chat_rl.num_iterations", "chat_rl.save_every", "chat_eval.max_problems", "run.gpu_hourly_usd"}


class ConfigError(ValueError):
    """A config problem, with a message meant to be shown to the user as one line."""


def config_path() -> Path:
    return Path(os.environ.get("NANOCHAT_CONFIG") or REPO_CONFIG)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (set NANOCHAT_CONFIG or run from a nanochat checkout)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(options))}"


def _type_name(v: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(type(v), type(v).__name__)


def _check_value(key: str, default: Any, value: Any) -> Any:
    """Coerce ints to floats where a float is expected; reject anything else of the wrong type."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{key} must be {_type_name(default)}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(CHOICES[key])}")
    if key in RANGES:
        lo, hi = RANGES[key]
        if not (lo <= value <= hi) and not (key in AUTO_KEYS and value == -1):
            raise ConfigError(f"{key} = {value!r} is out of range; allowed: {lo} to {hi}"
                              + (" (or -1 to derive it)" if key in AUTO_KEYS else ""))
    if key in AUTO_KEYS and isinstance(value, (int, float)) and value < 0 and value != -1:
        raise ConfigError(f"{key} = {value!r} is not allowed; use a positive value or -1 to derive it")
    return value


def _apply(sections: dict, updates: dict, where: str) -> None:
    for sec, kv in updates.items():
        if sec not in sections:
            raise ConfigError(f"unknown config section '{sec}' in {where}{_nearest(sec, sections)}")
        if not isinstance(kv, dict):
            raise ConfigError(f"'{sec}' in {where} must be a table of keys, got {kv!r}")
        for k, v in kv.items():
            if k not in sections[sec]:
                valid = [f"{sec}.{x}" for x in sections[sec]]
                raise ConfigError(f"unknown config key '{sec}.{k}' in {where}{_nearest(f'{sec}.{k}', valid)}")
            sections[sec][k] = _check_value(f"{sec}.{k}", sections[sec][k], v)


def parse_override(item: str) -> tuple[str, str, Any]:
    """'base_train.depth=12' -> ('base_train', 'depth', 12). Values are TOML; bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. base_train.depth=12)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key (e.g. base_train.depth)")
    sec, k = key.split(".")
    try:
        value = tomllib.loads(f"x = {raw.strip()}")["x"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as cpu or /data/dir
    return sec, k, value


class Config:
    """Validated sections. `cfg["base_train"]` is a plain dict; `cfg.get("base_train.depth")`."""

    def __init__(self, sections: dict[str, dict], profile: str):
        self.sections = sections
        self.profile = profile

    def __getitem__(self, section: str) -> dict:
        return self.sections[section]

    def get(self, dotted: str) -> Any:
        sec, key = dotted.split(".", 1)
        return self.sections[sec][key]

    def to_dict(self) -> dict:
        return {"profile": self.profile, **{s: dict(kv) for s, kv in self.sections.items()}}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, dumps_toml({"meta": {"profile": self.profile}, **self.sections}))


def load_config(profile: str | None = None, overrides=(), path: str | os.PathLike | None = None) -> Config:
    """Defaults from nanochat.toml, then the profile (or a saved run config at `path`), then overrides."""
    repo = _read_toml(config_path())
    if "defaults" not in repo:
        raise ConfigError(f"{config_path()} has no [defaults] table")
    sections = {s: dict(kv) for s, kv in repo["defaults"].items()}
    if path is not None:
        saved = _read_toml(Path(path))
        profile = saved.pop("meta", {}).get("profile", profile or "custom")
        _apply(sections, saved, str(path))
    elif profile is not None:
        profiles = repo.get("profiles", {})
        if profile not in profiles:
            raise ConfigError(f"unknown profile '{profile}'{_nearest(profile, profiles)}")
        _apply(sections, profiles[profile], f"profile '{profile}'")
    for item in overrides:
        sec, k, v = parse_override(item)
        _apply(sections, {sec: {k: v}}, f"--set {item}")
    cfg = Config(sections, profile or "defaults")
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    run = cfg["run"]
    if run["nnodes"] > 1 and not run["rdzv_endpoint"]:
        raise ConfigError("run.nnodes > 1 needs run.rdzv_endpoint (host:port of the rendezvous node)")
    if cfg["data"]["source"] == "local" and not cfg["data"]["dir"]:
        raise ConfigError("data.source = 'local' needs data.dir (a directory of .parquet, .txt or .jsonl files)")
    bt = cfg["base_train"]
    if bt["depth"] * bt["aspect_ratio"] < bt["head_dim"]:
        raise ConfigError(f"base_train: width depth*aspect_ratio = {bt['depth'] * bt['aspect_ratio']} is smaller "
                          f"than head_dim = {bt['head_dim']}; lower head_dim or raise depth")
    if set(bt["window_pattern"]) - {"S", "L"} or not bt["window_pattern"]:
        raise ConfigError(f"base_train.window_pattern = {bt['window_pattern']!r}: use only the letters S and L")
    for s in run["stages"]:
        if not isinstance(s, str) or not s.split(":")[0].replace("_", "").isalnum():
            raise ConfigError(f"run.stages entry {s!r} must be a stage module name, optionally with :phase")


# ------------------------------------------------------------------------------------------- derivations

def data_dir(cfg: Config) -> Path:
    d = cfg["data"]
    if d["dir"]:
        return Path(d["dir"]).expanduser()
    return get_base_dir() / ("demo_data" if d["source"] == "demo" else "base_data")


def fill_command(cfg: Config) -> str:
    """The command that fills the data directory of this config."""
    src, d = cfg["data"]["source"], data_dir(cfg)
    if src == "demo":
        return f"python -m nanochat.demo_corpus --dir {d}"
    if src == "fineweb":
        return f"python -m nanochat.dataset -n {cfg['data']['num_shards']} --dir {d}"
    return f"put .parquet, .txt or .jsonl files into {d}"


def check_data_dir(cfg: Config) -> Path:
    d = data_dir(cfg)
    if not d.is_dir() or not any(d.iterdir()):
        raise ConfigError(f"data directory {d} is missing or empty; fill it with: {fill_command(cfg)}")
    return d


def model_dims(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> dict:
    """Width and heads from depth: width grows linearly with depth, heads keep a fixed size."""
    n_embd = depth * aspect_ratio
    n_head = max(1, n_embd // head_dim)
    return {"n_layer": depth, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_head}


def derive_total_batch(num_params: int, seq_len: int) -> int:
    """Tokens per step: 2^19 at d20 (~560M params), growing with sqrt(params), a power of two,
    at least one sequence. Larger models tolerate (and need) larger batches; sqrt is a gentle rule."""
    ref_params, ref_batch = 560e6, 2 ** 19
    tokens = ref_batch * math.sqrt(num_params / ref_params)
    return max(seq_len, 2 ** round(math.log2(tokens)))


def derive_num_iterations(num_params: int, total_batch: int, ratio: float) -> int:
    """Training horizon from the tokens:params ratio."""
    return max(1, round(ratio * num_params / total_batch))


# ------------------------------------------------------------------------------------------- TOML writer

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(sections: dict[str, dict]) -> str:
    """Tables of scalars and lists: all our config ever holds."""
    out = []
    for sec, kv in sections.items():
        out.append(f"[{sec}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in kv.items()]
        out.append("")
    return "\n".join(out)
