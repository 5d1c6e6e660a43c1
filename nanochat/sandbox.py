"""Run untrusted, model-written Python (the calculator tool, HumanEval) without endangering the caller.

Every call starts a fresh interpreter (`python -I`, so no PYTHON* env vars, no user site) in a new
session, with:
  - resource limits: CPU seconds, address space (memory), processes, file size, no core dumps;
  - a wall-clock timeout, after which the whole process group is SIGKILLed;
  - a scrubbed environment (the parent's secrets never reach the child) and closed stdin;
  - a fresh temporary working directory, deleted afterwards;
  - stdout/stderr capped (the rest is drained and dropped, so a chatty child can't block or bloat us);
  - no network where the OS allows it: the child moves itself into an empty network namespace
    (works as root, or unprivileged via a user namespace), and `socket` is disabled in-process anyway;
  - destructive functions disabled before the user code runs (process creation, signals, deleting or
    writing files outside the working directory, ...).

The in-process guard is a seatbelt against accidents, in the spirit of HumanEval's "reliability guard",
not a security boundary against a determined attacker (pure Python can always dig the originals back
out). The hard limits are the rlimits, the namespace, the timeout and the process-group kill.
"""
from __future__ import annotations

import ast
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

EXIT_MEMORY = 86  # the child exits with this when user code ran out of memory (MemoryError)
STATUSES = ("ok", "error", "timeout", "memory")


@dataclass
class SandboxResult:
    status: str              # "ok" | "error" | "timeout" | "memory"
    stdout: str
    stderr: str
    returncode: int | None   # negative: killed by that signal; None: could not start
    duration_s: float
    truncated: bool = False  # output went over max_output_bytes and was cut
    network_isolated: bool = False  # the child ran in an empty network namespace

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- the child side
# This source runs as `python -I -c _BOOT <config json>`: it isolates and limits itself, disables
# destructive functions, then executes the user's file. Kept as plain source so that nothing of the
# parent (imports, torch, open files) is inherited.
_BOOT = r'''
import builtins, io, json, os, resource, sys
cfg = json.loads(sys.argv[1])
work = os.path.realpath(cfg["work"])

# 1) network: an empty network namespace has only a downed loopback, so nothing can be reached.
#    Root can create one directly; other users through a new user namespace (if the kernel allows).
net = False
try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    net = _libc.unshare(CLONE_NEWNET) == 0 or _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    del _libc
except Exception:
    pass
sys.stderr.write("\x00NET%d\x00" % net); sys.stderr.flush()

# 2) resource limits: soft == hard, so user code can't raise them again.
def limit(res, value):
    soft, hard = resource.getrlimit(res)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass
limit(resource.RLIMIT_CPU, cfg["cpu_s"])
limit(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
limit(resource.RLIMIT_FSIZE, cfg["file_mb"] << 20)
limit(resource.RLIMIT_CORE, 0)
# RLIMIT_NPROC counts all processes of this user (and root is exempt), so it only adds to the
# in-process fork ban below; 1 means "no new processes or threads" for an ordinary user.
limit(resource.RLIMIT_NPROC, 1)

# 3) the guard: replace destructive functions with ones that raise PermissionError.
def blocked(name):
    def f(*a, **k):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return f

realpath, getpid = os.path.realpath, os.getpid
def inside(path):
    if isinstance(path, int):          # an already-open file descriptor
        return True
    p = realpath(os.fsdecode(path))
    return p == work or p.startswith(work + os.sep) or p == "/dev/null"

def check(name, *paths, dir_fd=None):
    if dir_fd is not None and any(not os.path.isabs(os.fsdecode(p)) for p in paths if not isinstance(p, int)):
        raise PermissionError(f"{name} with dir_fd is disabled in the sandbox")
    for p in paths:
        if not inside(p):
            raise PermissionError(f"{name} outside the sandbox directory is not allowed: {os.fsdecode(p)!r}")

def no_proc_peeking(path):
    # other processes' /proc entries hold their environment and command line
    if isinstance(path, int):
        return
    parts = realpath(os.fsdecode(path)).split(os.sep)
    if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != getpid():
        raise PermissionError("reading other processes' /proc entries is not allowed in the sandbox")

_open = io.open
def guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        check("open for writing", file)
    no_proc_peeking(file)
    return _open(file, mode, *a, **k)
builtins.open = io.open = guarded_open
import _io; _io.open = guarded_open

_os_open = os.open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & WRITE_FLAGS:
        check("os.open for writing", path, dir_fd=dir_fd)
    no_proc_peeking(path)
    return _os_open(path, flags, mode, dir_fd=dir_fd)
os.open = guarded_os_open

def path_checked(name, nargs):
    orig = getattr(os, name)
    def f(*a, **k):
        check("os." + name, *a[:nargs], dir_fd=k.get("dir_fd") or k.get("src_dir_fd") or k.get("dst_dir_fd"))
        return orig(*a, **k)
    return f
for name, nargs in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("rename", 2),
                    ("replace", 2), ("truncate", 1), ("chmod", 1), ("chown", 1), ("lchown", 1),
                    ("link", 2), ("symlink", 2), ("utime", 1), ("mkfifo", 1), ("mknod", 1)]:
    if hasattr(os, name):
        setattr(os, name, path_checked(name, nargs))

import posix, shutil, subprocess, _posixsubprocess, socket, _socket  # import before disabling fork & co
for name in ["system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid",
             "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid",
             "chroot", "fchmod", "fchown", "execv", "execve", "execl", "execle", "execlp", "execlpe",
             "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
             "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open",
             "plock", "nice"]:
    for mod in (os, posix):
        if hasattr(mod, name):
            setattr(mod, name, blocked("os." + name))

for name in ["rmtree", "move", "chown"]:
    setattr(shutil, name, blocked("shutil." + name))
for name in ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"]:
    setattr(subprocess, name, blocked("subprocess." + name))
_posixsubprocess.fork_exec = blocked("fork_exec")
for mod in (socket, _socket):
    for name in ["socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"]:
        if hasattr(mod, name):
            setattr(mod, name, blocked("socket." + name))
resource.setrlimit = blocked("resource.setrlimit")
for name in ["ctypes", "_ctypes", "multiprocessing", "pty", "psutil"]:
    sys.modules[name] = None  # `import ctypes` now raises ImportError
builtins.help = None

# 4) run the user's code as __main__, from its file so tracebacks show its lines
with _open(cfg["main"], encoding="utf-8") as f:
    source = f.read()
sys.argv = ["main.py"]
g = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(source, "main.py", "exec"), g)
except (SystemExit, KeyboardInterrupt):
    raise
except MemoryError:
    try:
        sys.stderr.write("MemoryError: the sandbox memory limit was reached\n")
        sys.stdout.flush(); sys.stderr.flush()
    finally:
        os._exit(cfg["exit_memory"])
except BaseException as e:  # the usual traceback, minus this bootstrap's own frame
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
'''


def _scrubbed_env(work: str) -> dict[str, str]:
    """A minimal environment: nothing from the parent but a PATH and a UTF-8 locale."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made pid the group id
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until they close or the deadline passes. Keeps `cap` bytes of each, drains the rest."""
    bufs = {"out": bytearray(), "err": bytearray()}
    truncated = timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready = sel.select(min(remaining, 0.25))
            if not ready and proc.poll() is not None:
                break  # exited, but something else holds the pipes open: don't wait for it
            for key, _ in ready:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                room = max(0, cap - len(buf))
                buf += chunk[:room]
                truncated |= len(chunk) > room
    return bytes(bufs["out"]), bytes(bufs["err"]), timed_out, truncated


def run_code(code: str, timeout: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1 << 16,
             max_file_mb: int = 16, cpu_seconds: int | None = None) -> SandboxResult:
    """Run `code` as a Python program in a fresh, limited subprocess; never raises for anything the code does.

    `timeout` is wall-clock seconds; the CPU-time limit defaults to the timeout rounded up plus one.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0 or memory_mb < 32:
        raise ValueError(f"need timeout > 0 and memory_mb >= 32 (got timeout={timeout}, memory_mb={memory_mb})")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        main = os.path.join(tmp, "main.py")  # outside `work`: the code can't rewrite itself
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        cfg = {"work": work, "main": main, "exit_memory": EXIT_MEMORY, "memory_mb": int(memory_mb), "file_mb": int(max_file_mb),
               "cpu_s": int(cpu_seconds or int(timeout) + 1)}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, json.dumps(cfg)], cwd=work,
                                    env=_scrubbed_env(work), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as e:
            return SandboxResult("error", "", f"sandbox could not start: {e}", None, time.monotonic() - t0)
        try:
            out, err, timed_out, truncated = _collect(proc, t0 + timeout, max_output_bytes)
            if not timed_out:
                try:
                    proc.wait(timeout=max(0.0, t0 + timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True  # closed its pipes but kept running
        finally:
            _kill_group(proc)  # always: nothing it started may outlive the call
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    rc = proc.returncode
    net = err.startswith(b"\x00NET1\x00")
    if err[:1] == b"\x00":
        err = err[6:]
    stderr = err.decode("utf-8", errors="replace")
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):  # SIGXCPU/SIGKILL: the CPU limit
        status = "timeout"
        stderr += f"\n[sandbox] time limit reached ({timeout:g} s wall, {cfg['cpu_s']} s CPU)"
    elif rc == EXIT_MEMORY:
        status = "memory"
    elif rc == 0:
        status = "ok"
    else:
        status = "error"
    return SandboxResult(status, out.decode("utf-8", errors="replace"), stderr, rc, time.monotonic() - t0,
                         truncated, net)


# ----------------------------------------------------------------------------- the calculator tool
_CALC_BUILTINS = ["abs", "min", "max", "round", "sum", "len", "pow", "divmod", "int", "float", "str",
                  "bool", "sorted", "reversed", "range", "list", "tuple", "set", "dict", "enumerate",
                  "zip", "all", "any", "chr", "ord", "hex", "bin", "True", "False", "None"]
_CALC_PROGRAM = """import builtins, math
safe = {{k: getattr(builtins, k) for k in {names!r}}}
print(repr(eval({expr!r}, {{"__builtins__": safe, "math": math}}, {{}})))
"""


def calculator(expr: str, timeout: float = 3.0) -> tuple[str, str]:
    """Evaluate one Python expression (arithmetic, `math.*`, simple str/list methods like `.count`).

    Returns (output, status): the value's repr and "ok", or a one-line error and the sandbox status.
    Dunder attributes are refused (they are the usual way out of a restricted eval).
    """
    expr = expr.strip()
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        return f"SyntaxError: not a Python expression ({e.msg})", "error"
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        if name.startswith("__"):
            return f"NameError: {name} is not allowed in the calculator", "error"
    r = run_code(_CALC_PROGRAM.format(names=_CALC_BUILTINS, expr=expr), timeout=timeout, memory_mb=256,
                 max_output_bytes=4096)
    if r.status == "ok":
        out = r.stdout.strip()
        return (out + "…" if r.truncated else out), "ok"
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return (lines[-1].strip() if lines else f"calculator failed ({r.status})"), r.status
