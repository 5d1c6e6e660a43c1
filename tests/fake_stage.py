"""A fake pipeline stage for supervisor tests: behaves like a real one (events, checkpoints, graceful
stop on SIGTERM with exit code 143, --resume) without torch, in a fraction of a second.

    python -m tests.fake_stage --run-dir DIR [--steps 5] [--sleep 0.05] [--crash-at 3] [--resume] ...
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanochat.common import atomic_write
from nanochat.events import EventWriter
from nanochat.stage import STOPPED_EXIT_CODE


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.fake_stage")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage-name", default=os.environ.get("NANOCHAT_STAGE", "fake"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.05, help="seconds per step")
    p.add_argument("--crash-at", type=int, default=None, help="raise an exception at this step")
    p.add_argument("--crash-once", action="store_true", help="crash (with --crash-at) only on the first attempt")
    p.add_argument("--die-at", type=int, default=None, help="os._exit(7) at this step, no event")
    p.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (tests the SIGKILL escalation)")
    p.add_argument("--child", action="store_true", help="spawn a sleeping helper process in our group")
    p.add_argument("--garbage", action="store_true", help="write malformed event lines between steps")
    p.add_argument("--ckpt-every", type=int, default=0,
                   help="save a real checkpoint (nanochat.checkpoint, torch) every N steps, as training stages do")
    p.add_argument("--ckpt-mb", type=float, default=1.0, help="size of the checkpointed tensor")
    p.add_argument("--eval", action="append", default=[], metavar="TASK:METRIC:VALUE[:PHASE]")
    p.add_argument("--end", action="append", default=[], metavar="KEY=JSON", help="summary field of the end event")
    p.add_argument("-i", dest="phase", default=None, help="phase (as chat_eval -i sft)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", 0))  # under torchrun: only rank 0 writes events and checkpoints
    ev = EventWriter(run_dir, args.stage_name, rank=rank)
    ckpt = run_dir / args.stage_name / "fake_ckpt.json"
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else lambda *_: stop.update(flag=True))
    ev.start(argv=sys.argv, world_size=1, device="cpu", resume=args.resume)
    print(f"fake stage {args.stage_name} starting (pid {os.getpid()})", file=sys.stderr, flush=True)
    start = 0
    if args.resume and ckpt.exists():
        start = json.loads(ckpt.read_text())["step"]
        ev.emit("log", message=f"resumed from step {start}", step=start)
    if args.child and not rank:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        ev.emit("log", message="helper", helper_pid=helper.pid)

    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.ckpt_every:  # real checkpoints: resume from the latest complete one
        import torch
        import torch.distributed as tdist

        from nanochat.checkpoint import latest_step, load_checkpoint, save_checkpoint
        if world > 1:
            tdist.init_process_group("gloo")
        cdir = run_dir / "checkpoints" / args.stage_name
        if args.resume and latest_step(cdir) is not None:
            try:
                _, opt, meta = load_checkpoint(cdir, rank=rank, load_optim=True)
            except Exception as e:  # e.g. another world size: the one-line error, as a stage reports it
                ev.error(e)
                raise
            start = meta["step"]
            assert opt["rank"] == rank
            ev.emit("log", message=f"resumed from step {start}", step=start)

    def should_stop():
        """Every rank stops at the same step (a checkpoint is collective), as StageContext.should_stop."""
        if not (args.ckpt_every and world > 1):
            return stop["flag"]
        flag = torch.tensor([float(stop["flag"])])
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def save(step):
        if args.ckpt_every:
            n = int(args.ckpt_mb * 2**18)  # float32s
            path = save_checkpoint(cdir, step, {"w": torch.full((n,), float(step))}, {"rank": rank}, {},
                                   rank=rank, world_size=world, keep_last=2)
            if not rank:
                ev.checkpoint(step=step, path=str(path))
            return
        if rank:
            return
        atomic_write(ckpt, json.dumps({"step": step}))
        ev.checkpoint(step=step, path=str(ckpt))

    t0 = time.time()
    try:
        for step in range(start + 1, args.steps + 1):
            time.sleep(args.sleep)
            if args.crash_at == step and not (args.crash_once and (ckpt.parent / "crashed").exists()):
                (ckpt.parent / "crashed").touch()
                raise RuntimeError(f"fake crash at step {step}")
            if args.die_at == step:
                print(f"dying hard at step {step}", file=sys.stderr, flush=True)
                os._exit(7)
            loss = 10.0 / (step + 1)
            ev.step(step=step, total_steps=args.steps, loss=loss, smooth_loss=loss, dt=args.sleep,
                    tok_per_sec=1000.0 * step, mfu=None, tokens=step * 1000,
                    eta_s=(args.steps - step) * args.sleep)
            print(f"step {step}/{args.steps} loss {loss:.4f}", flush=True)
            if args.ckpt_every and step % args.ckpt_every == 0 and step < args.steps:
                save(step)
            if args.garbage:
                with open(ev.path, "a") as f:
                    f.write('{"kind": "step", "step": \n\x00\xff not json\n[1, 2]\n')
            if should_stop():
                save(step)
                ev.end(status="stopped", steps_done=step)
                return STOPPED_EXIT_CODE
        save(args.steps)
        for spec in args.eval:
            task, metric, value, *phase = spec.split(":")
            ev.eval(task=task, metric=metric, value=float(value), phase=(phase or [args.phase])[0])
        summary = {k: json.loads(v) for k, v in (e.split("=", 1) for e in args.end)}
        ev.end(status="ok", steps_done=args.steps, train_time_s=round(time.time() - t0, 3), **summary)
        return 0
    except Exception as e:
        ev.error(e)
        raise
    finally:
        ev.close()
        if args.ckpt_every and world > 1:
            tdist.barrier()
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
