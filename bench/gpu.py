"""One-shot GPU check (one H100/H200, < 8 minutes): prints one table, then a JSON last line.

    python bench/gpu.py [--quick]

Rows: bf16 training step vs fp32 (loss within tolerance), torch.compile step vs eager, each attention
path (SDPA full, FlexAttention windowed, SDPA masked) vs the written-out reference (outputs and
gradients), an fp8 step (H100-class only), training MFU at d12 and d20 and decode tok/s at d12/d20 from
bench/train.py and bench/infer.py run as subprocesses (their JSON last lines), and NVML readings.
Without a CUDA GPU it prints one line and exits 0.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def row(rows, name, ok, detail):
    rows.append({"check": name, "ok": bool(ok), "detail": detail})


def tiny_model(dtype, seq=256):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                          window_pattern="SSSL"), compute_dtype=dtype).cuda()
    model.init_weights()
    return model


def step_loss(model, x, y, run=None):
    loss = (run or model)(x, y)
    loss.backward()
    return loss.item()


def check_precision(rows):
    x = torch.randint(0, 8192, (4, 257), device="cuda")
    ref = step_loss(tiny_model(torch.float32), x[:, :-1], x[:, 1:])
    bf16 = step_loss(tiny_model(torch.bfloat16), x[:, :-1], x[:, 1:])
    row(rows, "bf16 step vs fp32", abs(bf16 - ref) < 0.02 * abs(ref), f"loss {bf16:.4f} vs {ref:.4f}")
    m = tiny_model(torch.bfloat16)
    comp = step_loss(m, x[:, :-1], x[:, 1:], torch.compile(m, dynamic=False))
    row(rows, "compiled step vs eager", abs(comp - bf16) < 0.01 * abs(bf16), f"loss {comp:.4f} vs {bf16:.4f}")


def check_attention(rows):
    from nanochat.gpt import _sliding_mask, attention
    for window, Tq, Tk in [(None, 1024, 1024), (256, 1024, 1024), (256, 1, 1024), (256, 16, 1024)]:
        g = torch.Generator(device="cuda").manual_seed(Tq)
        q = torch.randn(2, 8, Tq, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(2, 4, Tk, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(2, 4, Tk, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        kr, vr = kf.repeat_interleave(2, 1), vf.repeat_interleave(2, 1)
        s = (qf @ kr.mT / math.sqrt(128)).masked_fill(~_sliding_mask(Tq, Tk, window, q.device), float("-inf"))
        want = s.softmax(-1) @ vr
        want.sum().backward()
        for impl in ("auto", "sdpa", "flex"):
            for t in (q, k, v):
                t.grad = None
            got = attention(q, k, v, window, impl=impl)
            got.float().sum().backward()
            err = max((got.float() - want).abs().max().item(),
                      *((a.grad.float() - b.grad).abs().max().item() for a, b in zip((q, k, v), (qf, kf, vf))))
            row(rows, f"attention {impl} w={window} {Tq}x{Tk}", err < 5e-2, f"max err {err:.2e} (out, grads)")


def check_fp8(rows):
    from nanochat.fp8 import convert_to_fp8, fp8_unavailable
    why = fp8_unavailable(torch.device("cuda"))
    if why:
        row(rows, "fp8 step", True, f"skipped: {why}")
        return
    x = torch.randint(0, 8192, (8, 1025), device="cuda")
    ref = step_loss(tiny_model(torch.bfloat16, 1024), x[:, :-1], x[:, 1:])
    m = tiny_model(torch.bfloat16, 1024)
    n = convert_to_fp8(m)
    got = step_loss(m, x[:, :-1], x[:, 1:], torch.compile(m, dynamic=False))
    row(rows, "fp8 step vs bf16", abs(got - ref) < 0.05 * abs(ref), f"{n} fp8 linears, loss {got:.4f} vs {ref:.4f}")


def sub_json(rows, name, cmd, timeout):
    """Run a bench script, return its JSON last line (None and a failed row on error)."""
    t0 = time.time()
    try:
        out = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        row(rows, name, False, f"{type(e).__name__}: {e}"[:200])
        return None
    row(rows, name, True, f"{time.time() - t0:.0f}s")
    return result


def supported(script, flag):
    text = (REPO / "bench" / script).read_text()
    return f'"{flag}"' in text


def nvml(rows):
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        r = dict(temp_c=pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                 power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                 mem_used_gib=pynvml.nvmlDeviceGetMemoryInfo(h).used / 2 ** 30,
                 sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        row(rows, "NVML", True, ", ".join(f"{k} {v:.0f}" for k, v in r.items()))
        return r
    except Exception as e:  # noqa: BLE001 - a reading, never a reason to fail the check
        row(rows, "NVML", False, f"{type(e).__name__}: {e}"[:120])
        return {}


def main(argv=None) -> int:
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU on this machine; nothing to check")
        return 0
    rows, result = [], {"gpu": torch.cuda.get_device_name(0)}
    check_precision(rows)
    check_attention(rows)
    check_fp8(rows)
    for depth in ([12] if quick else [12, 20]):
        cmd = ["bench/train.py", "--device", "cuda", "--depth", str(depth), "--seq", "2048",
               "--batch-tokens", str(16 * 2048), "--steps", "5"]
        if supported("train.py", "--compile"):
            cmd.append("--compile")
        r = sub_json(rows, f"train d{depth}", cmd, 240)
        if r:
            result[f"train_d{depth}"] = r
        for compiled in (False, True):
            flag = "--compile"
            if compiled and not supported("infer.py", flag):
                continue
            cmd = ["bench/infer.py", "--device", "cuda", "--depth", str(depth), "--repeats", "1", "--batches", "1,8"]
            r = sub_json(rows, f"decode d{depth}" + (" compiled" if compiled else ""), cmd + ([flag] if compiled else []), 180)
            if r:
                result[f"decode_d{depth}" + ("_compiled" if compiled else "")] = r
    result["nvml"] = nvml(rows)
    print(f"{'check':<34} {'ok':<4} detail")
    for r in rows:
        print(f"{r['check']:<34} {'yes' if r['ok'] else 'NO':<4} {r['detail']}")
    result["checks"] = rows
    result["all_ok"] = all(r["ok"] for r in rows)
    print(json.dumps(result))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
