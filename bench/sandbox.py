"""Sandbox overhead: calculator expressions and HumanEval-sized programs per second, the bubblewrap
boundary against the old path (rlimits + in-process guard, now the opt-in "reduced isolation").

    python bench/sandbox.py                    # 200 calculator calls, 20 HumanEval programs per path
    python bench/sandbox.py --calc 1000 --programs 50

Rows:
  calculator, bwrap worker   the engine's path: one warm sandboxed worker evaluates every expression
  calculator, bwrap per call a fresh bwrap sandbox per expression (what run_code costs)
  calculator, old path       a fresh rlimited interpreter per expression (the reduced path)
  humaneval, bwrap / old     a HumanEval program (prompt + canonical solution + its tests) per call; the real
                             problems from $NANOCHAT_DATA_DIR/humaneval or /work/shared/data when present,
                             else a stand-in of the same size; every program must pass on both paths
Figures are medians of per-call wall times; calls/s = 1 / median. The last line is one JSON object,
with the ratios (old / bwrap latency) measured in this same run.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat import sandbox  # noqa: E402
from nanochat.tasks.humaneval import build_program  # noqa: E402

STAND_IN = {"prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
            "canonical_solution": "    return a + b\n", "entry_point": "add",
            "test": "def check(candidate):\n" + "".join(f"    assert candidate({i}, {i}) == {2 * i}\n" for i in range(40))}


def humaneval_rows(n: int) -> tuple[list[dict], str]:
    for base in (os.environ.get("NANOCHAT_DATA_DIR", ""), "/work/shared/data"):
        path = Path(base) / "humaneval" / "HumanEval.jsonl.gz"
        if base and path.exists():
            with gzip.open(path, "rt") as f:
                rows = [json.loads(line) for line in f]
            step = max(1, len(rows) // n)
            return rows[::step][:n], str(path)
    return [STAND_IN] * n, "stand-in"


def timed(fn, items) -> list[float]:
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calc", type=int, default=200, help="calculator expressions per path")
    ap.add_argument("--programs", type=int, default=20, help="HumanEval programs per path")
    args = ap.parse_args()
    if sandbox.isolation() != "full":
        sys.exit(f"bench/sandbox.py: bubblewrap cannot run here ({sandbox._probe()})")
    b = sandbox._probe()
    exprs = [f"round(math.sqrt({i}) * {i % 7 + 1}, 3)" for i in range(args.calc)]
    few = exprs[:max(5, args.calc // 10)]  # the per-process paths are ~100x slower: fewer calls suffice
    calc_program = lambda e: sandbox._CALC_PROGRAM.format(names=sandbox._CALC_BUILTINS, cap=4096, worker=False, expr=e)

    def calc_bwrap(e):
        r = sandbox._run_bwrap(b, calc_program(e), 5.0, 256, 4160, 1, 1, 6, 1)
        assert r.ok, r

    def calc_old(e):
        r = sandbox._run_reduced(calc_program(e), 5.0, 256, 4160, 1, 6, 1)
        assert r.ok, r

    def calc_worker(e):
        out, status = sandbox.calculator(e)
        assert status == "ok", out

    rows, source = humaneval_rows(args.programs)
    programs = [build_program(r, r["canonical_solution"]) for r in rows]

    def he_bwrap(p):
        r = sandbox._run_bwrap(b, p, 10.0, 512, 1 << 16, 16, 64, 11, 1)
        assert r.ok, r

    def he_old(p):
        r = sandbox._run_reduced(p, 10.0, 512, 1 << 16, 16, 11, 1)
        assert r.ok, r

    calc_worker("1")  # start the worker outside the timings
    results = {"calculator_bwrap_worker": timed(calc_worker, exprs), "calculator_bwrap_per_call": timed(calc_bwrap, few),
               "calculator_old": timed(calc_old, few), "humaneval_bwrap": timed(he_bwrap, programs),
               "humaneval_old": timed(he_old, programs)}
    sandbox._calc_worker.kill()
    load = os.getloadavg()[0]
    print(f"sandbox overhead  (cores {os.cpu_count()}, load {load:.1f}, humaneval: {source})")
    print(f"{'path':30} {'calls':>6} {'median ms':>10} {'p90 ms':>8} {'calls/s':>9}")
    summary = {}
    for name, ts in results.items():
        med, p90 = statistics.median(ts), sorted(ts)[int(0.9 * (len(ts) - 1))]
        summary[name] = {"calls": len(ts), "median_ms": round(med * 1e3, 3), "p90_ms": round(p90 * 1e3, 3),
                         "calls_per_s": round(1 / med, 1)}
        print(f"{name:30} {len(ts):6d} {med * 1e3:10.2f} {p90 * 1e3:8.2f} {1 / med:9.1f}")
    ratio = lambda a, b: round(summary[a]["median_ms"] / summary[b]["median_ms"], 2)
    summary["old_over_worker_calculator"] = ratio("calculator_old", "calculator_bwrap_worker")
    summary["old_over_bwrap_calculator_per_call"] = ratio("calculator_old", "calculator_bwrap_per_call")
    summary["old_over_bwrap_humaneval"] = ratio("humaneval_old", "humaneval_bwrap")
    summary.update(load_avg_1m=round(load, 2), cpus=os.cpu_count(), humaneval_source=source)
    print(f"calculator: worker {summary['old_over_worker_calculator']}x faster than the old path; "
          f"humaneval: old/bwrap latency {summary['old_over_bwrap_humaneval']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
