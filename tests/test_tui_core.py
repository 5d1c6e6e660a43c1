"""The TUI's Textual-free core: run model, alerts, log index, plot, config, NVML adapter, bindings."""
from __future__ import annotations

import gc
import json
import math
import threading
import re

import pytest

from fake_run import T0, FakeNvml, FakeRun, demo_run, loss_at
from tui.alerts import AlertBook
from tui.logfile import STRIDE, LogFile, compile_query
from tui.runmodel import (BIG_BATCH, RunModel, gc_paused, RunReader, load_run, quick_summary, read_state, run_cost, run_gpu_name,
                          state_view)
from tui.services import GpuSample, NvmlProvider, TuiConfigError, load_tui_config


def test_model_rebuilds_from_disk_in_order(tmp_path):
    r = demo_run(tmp_path, steps=300)
    m = load_run(r.dir)
    s = m.loss["base_train"]
    assert s.xs == list(range(300)) and s.ys[17] == pytest.approx(loss_at(17))
    assert m.out_of_order == 0
    assert len(m.val_bpb["base_train"]) == 6 and m.val_bpb["base_train"].xs[1] == 50
    # tok_eval's rows differ only by `text`: each is kept
    assert m.evals[("tok_eval", "compression (train)", "bytes_per_token")] == (4.8, None)
    assert m.evals[("tok_eval", "compression (val)", "bytes_per_token")] == (4.7, None)
    assert m.samples[-1]["text"].startswith(" Paris")
    info = m.stages["base_train"]
    assert (info.step, info.total_steps, info.mfu) == (299, 1000, 0.41)
    assert m.main_train_stage() == "base_train"
    # tokens and wall time axes for Compare, aligned with the steps
    assert m.loss_vs("base_train", "tokens").xs[:2] == [524288.0, 1048576.0]
    assert m.loss_vs("base_train", "time").xs[:2] == [0.0, 1.0]


def test_reader_tails_incrementally_and_sees_new_stages(tmp_path):
    r = FakeRun(tmp_path)
    reader, m = RunReader(r.dir), RunModel(r.dir)
    r.start_stage("data")
    m.ingest(reader.poll())
    assert m.stages["data"].started == T0
    r.steps("base_train", 0, 10, total=10)
    with open(r.dir / "base_train" / "events.jsonl", "a") as f:
        f.write('{"v":1,"kind":"step","stage":"base_train","step":10,"lo')  # torn line: not consumed yet
    m.ingest(reader.poll())
    assert m.loss["base_train"].xs == list(range(10))
    with open(r.dir / "base_train" / "events.jsonl", "a") as f:
        f.write('ss":1.5,"total_steps":11}\n')
    m.ingest(reader.poll())
    assert m.loss["base_train"].xs[-1] == 10 and m.out_of_order == 0


def test_big_file_bulk_read_matches_line_reader_and_falls_back(tmp_path):
    from nanochat.events import read_events
    r = FakeRun(tmp_path)
    r.steps("base_train", 0, 9000, total=9000)  # > 1 MiB: the bulk path
    path = r.dir / "base_train" / "events.jsonl"
    assert path.stat().st_size > 1 << 20
    reader = RunReader(r.dir)
    assert reader.poll() == read_events(path)[0] and reader.poll() == []
    r.steps("base_train", 9000, 1, total=9001)
    assert [e["step"] for e in reader.poll()] == [9000]
    with open(path, "a") as f:
        f.write("{not json\n")
    r.steps("base_train", 9001, 2, total=9003)
    m = load_run(r.dir)  # malformed line: line-by-line fallback skips and counts it
    assert m.loss["base_train"].xs == list(range(9003)) and m.out_of_order == 0
    reader = RunReader(r.dir)
    reader.poll()
    assert reader.malformed == 1


def test_nan_and_spike_become_alerts_once(tmp_path):
    m = RunModel(tmp_path)
    evs = [{"kind": "step", "stage": "base_train", "step": i, "loss": 3.0 + 0.01 * (i % 3)} for i in range(40)]
    evs.append({"kind": "step", "stage": "base_train", "step": 40, "loss": 9.0})
    evs.append({"kind": "step", "stage": "base_train", "step": 41, "loss": "nan"})
    evs.append({"kind": "step", "stage": "base_train", "step": 42, "loss": "nan"})
    book = AlertBook()
    alerts = book.on_anomalies(m.ingest(evs))
    assert [a.title for a in alerts] == ["base_train: loss spike", "base_train: loss is nan"]
    assert math.isnan(m.loss["base_train"].ys[-1])
    assert book.on_anomalies(m.ingest([{"kind": "step", "stage": "base_train", "step": 43, "loss": "inf"}])) == []


def test_state_from_supervisor_format_and_failure_alert(tmp_path):
    r = demo_run(tmp_path, fail=True)
    st = read_state(r.dir)
    assert st["status"] == "failed"
    bt = next(s for s in st["stages"] if s.name == "base_train")
    assert bt.status == "failed" and bt.exit_code == 1 and "OutOfMemoryError" in bt.error
    assert bt.traceback.splitlines()[-1].startswith("torch.OutOfMemoryError")
    book = AlertBook()
    alerts = book.check(st, load_run(r.dir), None, r.t)
    assert len(alerts) == 1 and alerts[0].stage == "base_train" and "out of memory" in alerts[0].detail
    assert book.check(st, load_run(r.dir), None, r.t + 10) == []  # raised once


def test_stall_idle_gpu_and_throttle_rules(tmp_path):
    r = demo_run(tmp_path)
    st, m = read_state(r.dir), load_run(r.dir)
    book = AlertBook(stall_s=120, gpu_idle_s=30)
    idle = [GpuSample(0, "H100", 0.0, 1, 2, 40, 100, 700, 1000, 2000)]
    assert book.check(st, m, idle, r.t + 10) == []  # starts the idle clock
    titles = [a.title for a in book.check(st, m, idle, r.t + 200)]
    assert "stage base_train stalled" in titles and "GPUs idle" in titles
    hot = [GpuSample(1, "H100", 99.0, 1, 2, 91, 700, 700, 1000, 2000, ["hw_thermal"])]
    assert [a.title for a in book.check(st, m, hot, r.t + 201)] == ["GPU 1 throttled"]


def test_cost_counts_wall_time_times_gpus_times_rate(tmp_path):
    r = demo_run(tmp_path, steps=100)
    st = read_state(r.dir)
    wall, cost = run_cost(st, {"run": {"nproc_per_node": 8}}, load_run(r.dir), now=T0 + 3600, rate_per_gpu_hour=2.0)
    assert wall == pytest.approx(3600) and cost == pytest.approx(16.0)
    s = quick_summary(r.dir, st, T0 + 3600, fallback_rate=9.0)  # config.toml says gpu_hourly_usd = 2.5
    assert s.status == "running" and s.stage == "base_train" and s.cost == pytest.approx(20.0)
    assert s.progress == "3/8 stages, 10%"
    # a CPU run costs nothing (as in report.md), whatever the fallback price
    cpu = state_view({**st["raw"], "system": {"gpus": []}})
    assert run_cost(cpu, {"run": {"nproc_per_node": 8}}, load_run(r.dir), T0 + 3600, 2.0)[1] == 0.0
    assert run_cost(st, {"run": {"device": "cpu"}}, load_run(r.dir), T0 + 3600, 2.0)[1] == 0.0
    # the price of the run's own GPUs (state.json's snapshot), not of the machine the TUI runs on
    h100 = state_view({**st["raw"], "system": {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}})
    assert run_gpu_name(h100, {}, "NVIDIA A10G") == "NVIDIA H100 80GB HBM3"
    assert run_gpu_name(st, {}, "NVIDIA A10G") == "NVIDIA A10G"  # the run recorded none
    # wall time is the stages' process lifetime from state.json: start-up before the first event counts
    late = read_state(r.dir)
    late["stages"][0].started -= 20
    assert run_cost(late, {}, load_run(r.dir), T0 + 3600, 2.0)[0] == pytest.approx(3620)


def test_logfile_index_window_search_filter(tmp_path):
    p = tmp_path / "big.log"
    n = 20 * STRIDE + 17
    with open(p, "w") as f:
        for i in range(n):
            f.write(f"{'ERROR' if i % 1000 == 999 else 'INFO'} line {i} é\n")
        f.write("partial tail")
    log = LogFile(p)
    log.refresh(budget=20_000)  # indexing in steps, as the watcher does
    assert len(log) < n
    while log.refresh(budget=20_000):
        pass
    assert len(log) == n + 1
    assert log.lines(5 * STRIDE + 3, 2) == [f"INFO line {5 * STRIDE + 3} é", f"INFO line {5 * STRIDE + 4} é"]
    assert log.lines(n, 5) == ["partial tail"]
    pat = compile_query("line 4242 ", regex=False)
    assert log.find(pat, 0) == 4242 and log.find(pat, 4242) == 4242  # wraps around to itself
    assert log.find(compile_query(r"ERROR line \d+", regex=True), 2000, backwards=True) == 1999
    assert log.filter(None, min_level=3) == [999, 1999, 2999, 3999, 4999]
    assert log.filter(compile_query("line 12", regex=False), 0)[:3] == [12, 120, 121]
    with open(p, "a") as f:
        f.write(" done\nnew line\n")
    assert log.refresh() and len(log) == n + 2 and log.lines(n, 2) == ["partial tail done", "new line"]
    with pytest.raises(ValueError, match="bad regex"):
        compile_query("(", regex=True)


def test_plot_downsamples_100k_points_and_keeps_spikes():
    from textual.geometry import Size
    from tui.widgets.plot import Plot
    xs = list(range(100_000))
    ys = [1.0] * 100_000
    ys[54_321] = 50.0
    p = Plot()
    p.series = [("loss", xs, ys)]
    text = p.draw(60, 12)
    lines = text.plain.splitlines()
    assert lines[0].strip().startswith("50")  # the max label shows the spike
    assert any(ch != " " for ch in lines[0][8:])  # and it is drawn
    assert len(lines) == 12 and all(len(ln) <= 60 for ln in lines)
    p.set_options(log_y=True) if p.is_mounted else setattr(p, "log_y", True)
    assert p.draw(60, 12).plain.splitlines()[0].strip().startswith("50")


def test_plot_draws_a_lone_point_as_a_marker():
    """One val bpb at the end of a stage (the demo's base_train): a 2x2 marker, not a single braille dot."""
    from tui.widgets.plot import Plot
    p = Plot()
    for series in ([("val", [40], [0.87])], [("a", [10], [1.9]), ("b", [40], [0.87])]):  # left edge, right edge
        p.series = series
        dots = sum(bin(ord(ch) - 0x2800).count("1") for ch in p.draw(40, 8).plain if 0x2800 < ord(ch) <= 0x28FF)
        assert dots == 4 * len(series)


def test_tui_config_merge_and_errors(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[tui]\ntheme = "nord"\ngpu_poll_s = 0.1\n[tui.keys]\n"dashboard.logs" = "L"\n')
    b.write_text('[tui.keys]\n"app.help" = "f1"\n')
    cfg = load_tui_config([a, b])
    assert cfg["theme"] == "nord" and cfg["gpu_poll_s"] == 0.5  # clamped: NVML never polled faster
    assert cfg["keys"] == {"dashboard.logs": "L", "app.help": "f1"}
    a.write_text('[tui]\nthem = "nord"\n')
    with pytest.raises(TuiConfigError, match="unknown setting 'them'"):
        load_tui_config([a])
    a.write_text('[tui]\nstall_s = "x"\n')
    with pytest.raises(TuiConfigError, match="stall_s must be a float"):
        load_tui_config([a])


def test_nvml_provider_reads_fake_nvml_and_reports_absence():
    nv = FakeNvml(n=2, util=88, throttle=0x20 | 0x4)
    p = NvmlProvider(nv)
    g = p.sample()
    assert p.available and len(g) == 2 and g[0].util == 88 and g[1].temp == 72
    assert g[0].mem_total == 80 * 2**30 and g[0].power == 612 and g[0].throttle == ["sw_power_cap", "sw_thermal"]
    off = NvmlProvider(FakeNvml(fail_init=True))
    assert not off.available and off.sample() == [] and "NVML unavailable" in off.error


def test_every_binding_has_an_id_and_no_swallowed_keys():
    from textual.binding import Binding
    from tui import dialogs
    from tui.app import NanochatApp, all_binding_ids
    from tui.bindings import FORBIDDEN_KEYS
    from tui.screens import all_screen_classes
    ids = all_binding_ids()
    assert len(ids) > 40 and {"confirm.yes", "pick.cancel", "export.cancel", "menu.close"} <= set(ids)
    for cls in [NanochatApp, *all_screen_classes(), dialogs.ConfirmScreen, dialogs.PickScreen, dialogs.ExportScreen,
                dialogs.MenuScreen]:
        for b in cls.BINDINGS:
            assert isinstance(b, Binding) and b.id, f"{cls.__name__} binding {b} has no id"
            for key in b.key.split(","):
                assert key not in FORBIDDEN_KEYS, f"{b.id} uses {key}"
    assert re.fullmatch(r"[a-z]+\.[a-z_]+", "dashboard.log_scale") and "dashboard.log_scale" in ids


def test_main_rejects_unknown_binding_ids(tmp_path, monkeypatch, capsys):
    from tui.app import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "tui.toml").write_text('[tui.keys]\n"dashboard.nope" = "z"\n')
    with pytest.raises(SystemExit):
        main([])
    assert "unknown binding id(s) in [tui.keys]: dashboard.nope" in capsys.readouterr().err
    (tmp_path / "tui.toml").write_text('[tui.keys]\n"dashboard.logs" = "L,ctrl+s"\n')
    with pytest.raises(SystemExit):
        main([])
    assert "[tui.keys] dashboard.logs = 'L,ctrl+s': terminals or tmux swallow" in capsys.readouterr().err
    (tmp_path / "tui.toml").unlink()
    for bad in ("0.1", "nan", "soon"):
        with pytest.raises(SystemExit):
            main(["--poll", bad])
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage line
        assert last.startswith("nanochat-tui: error: ") and "--poll" in last and ">= 0.5" in last
    with pytest.raises(SystemExit):
        main(["no-such-run"])
    assert capsys.readouterr().err.startswith("nanochat-tui: error: no runs in")
    r = demo_run(tmp_path / "runs", "20250101-100000-demo")
    with pytest.raises(SystemExit):
        main(["no-such-run"])
    err = capsys.readouterr().err
    assert "run 'no-such-run' matches no run; runs: 20250101-100000-demo" in err and err.count("\n") == 1
    # a run is named as `nanochat` names it: directory, id, unique prefix or latest
    from tui.services import Supervisor
    sup = Supervisor(tmp_path)
    assert sup.resolve("latest") == sup.resolve("20250101-10") == sup.resolve(str(r.dir)) == r.dir


def test_state_view_uses_the_supervisors_status_and_survives_a_bad_state_file(tmp_path):
    from nanochat import supervisor as sv
    r = demo_run(tmp_path)
    r.set_stage("base_train", "succeeded")  # done so far, nothing running, no driver: the CLI says "incomplete"
    for s in r.state["stages"]:
        s["status"] = "succeeded" if s["name"] in ("data", "tok_train", "tok_eval", "base_train") else "pending"
    r.save_state()
    raw = sv.read_state(r.dir)
    assert read_state(r.dir)["status"] == sv.run_status(raw) == "incomplete"
    for junk in (b"\xff\xfe", b"[1, 2]", b'{"stages": [{"status": "running"}]}', b'{"stages": "x"}'):
        (r.dir / "state.json").write_bytes(junk)
        assert read_state(r.dir) == {"status": "unknown", "profile": "", "created": None, "stages": [], "raw": {}}
        assert not sv.reattach(r.dir) and not sv.is_live(r.dir)


def test_gc_is_paused_for_a_big_batch_only_and_always_restored():
    """A bulk ingest runs with the cyclic GC off (nested and from two threads at once), then it is back on;
    a GC the user turned off stays off; an exception inside still restores it."""
    assert gc.isenabled()
    seen = []
    evs = [{"v": 1, "ts": T0 + i, "stage": "base_train", "kind": "step", "step": i, "loss": 2.0}
           for i in range(BIG_BATCH)]

    class Probe(list):
        def __iter__(self):
            seen.append(gc.isenabled())
            return super().__iter__()

    m = RunModel(run_dir=None)
    m.ingest(Probe(evs), checked=True)
    m.ingest(Probe(evs[:10]), checked=True)
    assert seen == [False, True] and gc.isenabled() and m.n_events == BIG_BATCH + 10
    entered, leave, states = threading.Event(), threading.Event(), []

    def other_thread():
        with gc_paused():
            entered.set()
            leave.wait(5)
        states.append(gc.isenabled())

    with gc_paused():
        t = threading.Thread(target=other_thread)
        t.start()
        entered.wait(5)
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread still holds it
    leave.set()
    t.join(5)
    assert states == [True] and gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        with gc_paused():
            1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
