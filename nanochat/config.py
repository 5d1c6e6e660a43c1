"""The one config: nanochat.toml defaults, a profile on top, `--set section.key=value` overrides on top.

Validation happens once, here, so that stages can trust their config: an unknown key names the
nearest valid one, a wrong type or out-of-range value names what is allowed (`KEYS`, one row per
rule). Then `derive` (nanochat/scaling.py) fills every -1 it can from `depth`, the one dial, so
stages read plain values. `Config.save` writes what was asked for (the inputs), never the derived
values, so a saved run config derives the same numbers again when a stage loads it.
"""
from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write, get_base_dir

REPO_CONFIG = Path(__file__).resolve().parent.parent / "nanochat.toml"


@dataclass(frozen=True)
class Rule:
    lo: float = 0             # numbers: lo <= value <= hi
    hi: float = math.inf
    choices: tuple = ()       # strings: one of these
    auto: bool = False        # -1 means "derive it" (nanochat/scaling.py or the stage)


def between(lo, hi=math.inf, auto=False) -> Rule:
    return Rule(lo=lo, hi=hi, auto=auto)


def one_of(*choices) -> Rule:
    return Rule(choices=choices)


COUNT, AUTO = between(1), between(1, auto=True)     # a positive count; one that -1 derives
CADENCE = between(0, auto=True)                     # base_train's steps between events: -1 derived, 0 only at the end
# the chat stages' steps between events: -1 = only at the end (the stage knows its horizon, derive does not)
FRACTION = between(0.0, 1.0)
# The rule of each key. The type of a key is its default's in nanochat.toml; a key not listed here
# takes any value >= 0 if it is a number (floats must be finite) and anything if it is a string.
KEYS: dict[str, Rule] = {
    "run.device": one_of("auto", "cuda", "cpu", "mps"),
    "run.nproc_per_node": between(1, 1024), "run.nnodes": between(1, 4096),
    "run.gpu_hourly_usd": between(0.0, auto=True),
    "data.source": one_of("climbmix", "fineweb", "demo", "local"),
    "data.num_shards": between(1, 6542),
    "tokenizer.vocab_size": between(256 + 9, 1 << 20), "tokenizer.max_chars": between(1, 10**13),
    "tokenizer.doc_cap": between(1, 10**9),
    "base_train.depth": between(1, 64), "base_train.aspect_ratio": between(8, 512),
    "base_train.head_dim": between(8, 512), "base_train.max_seq_len": between(8, 1 << 17, auto=True),
    "base_train.device_batch_size": between(1, 4096), "base_train.total_batch_size": AUTO,
    "base_train.target_param_data_ratio": between(0.01, 10_000), "base_train.num_iterations": AUTO,
    "base_train.warmup_steps": between(0, 10**9), "base_train.warmdown_ratio": FRACTION,
    "base_train.final_lr_frac": FRACTION, "base_train.weight_decay": between(0.0, 10.0),
    "base_train.eval_every": CADENCE, "base_train.eval_tokens": AUTO,
    "base_train.sample_every": CADENCE, "base_train.save_every": CADENCE,
    "base_eval.max_per_task": AUTO, "base_eval.bpb_tokens": AUTO,
    "mid_train.device_batch_size": between(1, 4096, auto=True), "mid_train.max_seq_len": between(8, 1 << 17, auto=True),
    "mid_train.total_batch_size": AUTO, "mid_train.num_iterations": AUTO, "mid_train.eval_every": AUTO,
    "mid_train.eval_tokens": AUTO, "mid_train.val_examples": COUNT, "mid_train.save_every": AUTO,
    "chat_sft.device_batch_size": between(1, 4096), "chat_sft.examples_per_step": COUNT,
    "chat_sft.num_epochs": COUNT, "chat_sft.num_iterations": AUTO, "chat_sft.eval_every": AUTO,
    "chat_sft.save_every": AUTO,
    "chat_rl.device_batch_size": between(1, 4096), "chat_rl.examples_per_step": COUNT,
    "chat_rl.num_samples": between(1, 1024), "chat_rl.temperature": between(0.0, 10.0),
    "chat_rl.max_new_tokens": COUNT, "chat_rl.num_epochs": COUNT, "chat_rl.num_iterations": AUTO,
    "chat_rl.eval_every": AUTO, "chat_rl.eval_samples": COUNT, "chat_rl.save_every": AUTO,
    "chat_eval.temperature": between(0.0, 10.0), "chat_eval.num_samples": between(1, 1024),
    "chat_eval.max_problems": AUTO, "chat_eval.max_new_tokens": COUNT,
}


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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid UTF-8 (byte {e.start}); it must be a TOML text file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None


def list_profiles() -> list[str]:
    """The profiles of nanochat.toml, in file order."""
    return list(_read_toml(config_path()).get("profiles", {}))


def __getattr__(name: str):
    if name == "PROFILES":  # read from the TOML when asked, so there is no second list to keep in step
        return tuple(list_profiles())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(options))}"


def _type_name(v: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(type(v), type(v).__name__)


def _fmt(x) -> str:
    return "no limit" if x == math.inf else f"{x}"


def _check_value(key: str, default: Any, value: Any) -> Any:
    """Coerce ints to floats where a float is expected; reject anything else of the wrong type or range."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{key} must be {_type_name(default)}, got {value!r}")
    rule = KEYS.get(key, Rule())
    if isinstance(value, str) and rule.choices and value not in rule.choices:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(rule.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r} is not allowed; it must be a finite number")
        if rule.auto and value < 0:
            if value != -1:
                raise ConfigError(f"{key} = {value!r} is not allowed; use a positive value or -1 to derive it")
        elif not rule.lo <= value <= rule.hi:
            raise ConfigError(f"{key} = {value!r} is out of range; allowed: {rule.lo} to {_fmt(rule.hi)}"
                              + (" (or -1 to derive it)" if rule.auto else ""))
    return value


def _apply(sections: dict, updates: Any, where: str) -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"{where} must be a table of sections, got {updates!r}")
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
    """Resolved sections (`cfg["base_train"]` is a plain dict, `cfg.get("base_train.depth")`), and the
    validated inputs they were derived from (what `save` writes)."""

    def __init__(self, sections: dict[str, dict], profile: str, inputs: dict[str, dict] | None = None):
        self.sections = sections
        self.profile = profile
        self.inputs = inputs if inputs is not None else sections

    def __getitem__(self, section: str) -> dict:
        return self.sections[section]

    def get(self, dotted: str) -> Any:
        sec, key = dotted.split(".", 1)
        return self.sections[sec][key]

    def to_dict(self) -> dict:
        return {"profile": self.profile, **{s: dict(kv) for s, kv in self.sections.items()}}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, dumps_toml({"meta": {"profile": self.profile}, **self.inputs}))


def load_config(profile: str | None = None, overrides=(), path: str | os.PathLike | None = None) -> Config:
    """Defaults from nanochat.toml, then the profile (or a saved run config at `path`), then overrides,
    then `derive`."""
    repo = _read_toml(config_path())
    if not isinstance(repo.get("defaults"), dict):
        raise ConfigError(f"{config_path()} has no [defaults] table")
    sections = {s: dict(kv) for s, kv in repo["defaults"].items()}
    if path is not None:
        saved = _read_toml(Path(path))
        meta = saved.pop("meta", {})
        if not isinstance(meta, dict) or not isinstance(meta.get("profile", ""), str):
            raise ConfigError(f"[meta] in {path} must be a table with a string 'profile', got {meta!r}")
        profile = meta.get("profile", profile or "custom")
        _apply(sections, saved, str(path))
    elif profile is not None:
        profiles = repo.get("profiles", {})
        if profile not in profiles:
            raise ConfigError(f"unknown profile '{profile}'{_nearest(profile, profiles)}")
        _apply(sections, profiles[profile], f"profile '{profile}'")
    for item in overrides:
        sec, k, v = parse_override(item)
        _apply(sections, {sec: {k: v}}, f"--set {item}")
    _check_consistency(sections)
    from nanochat.scaling import derive
    return Config(derive(sections), profile or "defaults", inputs=sections)


def _check_consistency(sections: dict) -> None:
    run, data, bt = sections["run"], sections["data"], sections["base_train"]
    if run["nnodes"] > 1 and not run["rdzv_endpoint"]:
        raise ConfigError("run.nnodes > 1 needs run.rdzv_endpoint (host:port of the rendezvous node)")
    if data["source"] == "local" and not data["dir"]:
        raise ConfigError("data.source = 'local' needs data.dir (a directory of .parquet, .txt or .jsonl files)")
    from nanochat.dataset import SOURCES
    if data["source"] in SOURCES and data["num_shards"] > SOURCES[data["source"]].max_shard:
        raise ConfigError(f"data.num_shards = {data['num_shards']} is more than {data['source']} has; "
                          f"allowed: 1 to {SOURCES[data['source']].max_shard}")
    if set(bt["window_pattern"]) - {"S", "L"} or not bt["window_pattern"]:
        raise ConfigError(f"base_train.window_pattern = {bt['window_pattern']!r}: use only the letters S and L")
    for s in run["stages"]:
        if not isinstance(s, str) or not s.split(":")[0].replace("_", "").isalnum():
            raise ConfigError(f"run.stages entry {s!r} must be a stage module name, optionally with :phase")


# ------------------------------------------------------------------------------------------- data

def data_dir(cfg: Config) -> Path:
    from nanochat.dataset import SOURCES
    d = cfg["data"]
    if d["dir"]:
        return Path(d["dir"]).expanduser()
    if d["source"] in SOURCES:
        return get_base_dir() / SOURCES[d["source"]].dir_name
    return get_base_dir() / "demo_data"


def fill_command(cfg: Config) -> str:
    """The command that fills the data directory of this config."""
    src, d = cfg["data"]["source"], data_dir(cfg)
    if src == "demo":
        return f"python -m nanochat.demo_corpus --dir {d}"
    if src == "local":
        return f"put .parquet, .txt or .jsonl files into {d}"
    return f"python -m nanochat.dataset --source {src} -n {cfg['data']['num_shards']} --dir {d}"


def check_data_dir(cfg: Config) -> Path:
    d = data_dir(cfg)
    if not d.is_dir() or not any(d.iterdir()):
        raise ConfigError(f"data directory {d} is missing or empty; fill it with: {fill_command(cfg)}")
    return d


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
