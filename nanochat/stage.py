"""What every stage shares: command line, config, distributed init, events, graceful stop.

    python -m stages.<name> --run-dir DIR [--profile P] [--set section.key=value ...] [--resume]

A stage's `main(ctx)` returns a dict of summary fields that go into its `end` event (the report reads
them). SIGTERM or SIGINT sets `ctx.stop_requested`; long loops call `ctx.should_stop()` once per step
(it agrees across ranks, so no rank leaves a collective behind), save a checkpoint and return.
A stopped stage exits with STOPPED_EXIT_CODE and an `end` event with status "stopped".
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from nanochat.common import DistInfo, compute_cleanup, compute_init, die, runs_dir
from nanochat.config import Config, ConfigError, load_config
from nanochat.events import EventWriter

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM, the shell convention for "terminated on request"


class StageContext:
    def __init__(self, name: str, run_dir: Path, cfg: Config, dist: DistInfo, events: EventWriter,
                 args: argparse.Namespace):
        self.name = name
        self.run_dir = run_dir
        self.cfg = cfg
        self.dist = dist
        self.events = events
        self.args = args
        self.resume = bool(args.resume)
        self.stop_requested = False

    def should_stop(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT."""
        if not self.dist.ddp:
            return self.stop_requested
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flag.item())
        return self.stop_requested

    def barrier(self):
        if self.dist.ddp:
            import torch.distributed as dist
            dist.barrier()


def build_parser(name: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None):
    p = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"nanochat stage: {name}")
    p.add_argument("--run-dir", default=os.environ.get("NANOCHAT_RUN_DIR"),
                   help="run directory (default: a new one under <base>/runs)")
    p.add_argument("--profile", default=None, help="config profile when the run has no config.toml yet")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this stage")
    p.add_argument("--stage-name", default=None, help="events directory name (default: the stage's name)")
    if add_args:
        add_args(p)
    return p


def resolve_run_dir(run_dir: str | None, profile: str | None) -> Path:
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    # a stage launched by hand gets a fresh run of its own; torchrun ranks must agree, so use the
    # launcher's shared env when present
    stamp = os.environ.get("TORCHELASTIC_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
    return runs_dir() / f"{stamp}-{profile or 'manual'}"


def stage_main(name: str, main: Callable[[StageContext], dict | None],
               add_args: Callable[[argparse.ArgumentParser], None] | None = None, argv=None) -> None:
    args = build_parser(name, add_args).parse_args(argv)
    run_dir = resolve_run_dir(args.run_dir, args.profile)
    saved = run_dir / "config.toml"
    try:
        cfg = load_config(path=saved, overrides=args.overrides) if saved.exists() else \
            load_config(profile=args.profile or "demo", overrides=args.overrides)
    except ConfigError as e:
        die(str(e))
    from nanochat import sandbox
    sandbox.configure(cfg.get("sandbox.allow_reduced_isolation"))  # the run's own opt-in, profiles and --set included
    dist = compute_init(cfg["run"]["device"], seed=cfg["run"]["seed"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.master and not saved.exists():
        cfg.save(saved)
    events = EventWriter(run_dir, args.stage_name or name, rank=dist.rank)
    ctx = StageContext(name, run_dir, cfg, dist, events, args)

    def on_signal(signum, frame):
        if ctx.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        ctx.stop_requested = True
        print(f"[{name}] received {signal.Signals(signum).name}: finishing the step, checkpointing, exiting",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    events.start(argv=sys.argv, world_size=dist.world_size, device=str(dist.device), resume=ctx.resume)
    events.config(cfg.to_dict())
    code = 0
    try:
        summary = main(ctx) or {}
        # ranks finish at different times (rank 0 writes samples, checkpoints); tearing the process
        # group down while a peer still uses it aborts gloo, so line them up first
        ctx.barrier()
        status = "stopped" if ctx.stop_requested else "ok"
        events.end(status=status, **summary)
        code = STOPPED_EXIT_CODE if ctx.stop_requested else 0
    except ConfigError as e:
        events.error(e)
        die(str(e))  # one line for the user; `finally` still closes events and the process group
    except BaseException as e:
        if not isinstance(e, SystemExit):
            events.error(e)
        raise
    finally:
        events.close()
        compute_cleanup()
    sys.exit(code)
