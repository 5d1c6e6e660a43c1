"""Corpus sources: shard download against a local flaky HTTP server, local directory formats, demo corpus."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (SOURCES, default_data_dir, download_file, download_shards, file_format,
                              iter_documents, list_data_files, read_documents, shard_indices, shard_name, split_files)
from nanochat.demo_corpus import make_demo_corpus, make_documents

REPO = Path(__file__).resolve().parents[1]
MAX_SHARD = SOURCES["climbmix"].max_shard  # the default source's validation shard
FINEWEB_VAL = SOURCES["fineweb"].max_shard
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parquet_bytes(texts, row_group_size=None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


# ----------------------------------------------------------------------------- a flaky local HTTP server

class FlakyServer:
    """Serves `files` on 127.0.0.1; `plan[name]` is a queue of behaviours for the next requests:
    ok | 500 | drop (close without answering) | truncate (advertise all, send half) |
    norange (ignore Range, send 200) | garbage (right length, wrong bytes) | slow (trickle the body)."""

    def __init__(self, files):
        self.files, self.plan, self.log = dict(files), {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.log.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                how = server.plan.get(name, []).pop(0) if server.plan.get(name) else "ok"
                if how == "500":
                    self.send_error(500)
                    return
                if how == "drop":
                    self.close_connection = True
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and how != "norange" else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                if how == "garbage":
                    body = bytes(len(body))
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if how == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif how == "slow":
                    for i in range(0, len(body), 2048):
                        self.wfile.write(body[i:i + 2048])
                        self.wfile.flush()
                        time.sleep(0.02)
                else:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def requests(self, name):
        return [rng for n, rng in self.log if n == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shards():
    return {shard_name(i): parquet_bytes([f"document {i}-{k} " * 50 for k in range(200)]) for i in (0, 1, 2, MAX_SHARD, FINEWEB_VAL)}


@pytest.fixture
def server(shards):
    s = FlakyServer(shards)
    yield s
    s.close()


def test_download_retries_resumes_and_renames(server, shards, tmp_path):
    server.plan = {shard_name(0): ["500", "500", "ok"], shard_name(1): ["truncate", "ok"],
                   shard_name(2): ["drop", "garbage", "ok"], shard_name(MAX_SHARD): ["ok"]}
    paths = download_shards(shard_indices(3), tmp_path, base_url=server.url, workers=4, backoff=0.01, progress=False)
    assert [p.name for p in paths] == [shard_name(i) for i in (0, 1, 2, MAX_SHARD)]
    for p in paths:
        assert p.read_bytes() == shards[p.name]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no .partial left behind
    assert server.requests(shard_name(0)) == [None, None, None]
    half = len(shards[shard_name(1)]) // 2
    assert server.requests(shard_name(1)) == [None, f"bytes={half}-"]  # the truncated body was resumed
    # the garbage body had the right length but no parquet footer: it was thrown away and fetched anew
    assert server.requests(shard_name(2)) == [None, None, None]
    # a second call finds everything in place and makes no request at all
    n = len(server.log)
    download_shards(shard_indices(3), tmp_path, base_url=server.url, progress=False)
    assert len(server.log) == n


def test_download_restarts_when_server_ignores_range(server, shards, tmp_path):
    name = shard_name(1)
    server.plan = {name: ["truncate", "norange"]}
    download_file(f"{server.url}/{name}", tmp_path / name, backoff=0.01)
    assert (tmp_path / name).read_bytes() == shards[name]
    assert server.requests(name)[1] is not None  # it asked for a range, got 200, and started over


def test_a_complete_partial_is_finished_without_refetching(server, shards, tmp_path):
    name = shard_name(0)  # a crash between the last write and the rename leaves a whole .partial
    (tmp_path / (name + ".partial")).write_bytes(shards[name])
    download_file(f"{server.url}/{name}", tmp_path / name, backoff=0.01)
    assert (tmp_path / name).read_bytes() == shards[name]
    assert server.requests(name) == [f"bytes={len(shards[name])}-"]  # answered 416, nothing re-sent
    other = shard_name(1)  # a .partial longer than the file on the server: not ours, start over
    (tmp_path / (other + ".partial")).write_bytes(shards[other] + b"junk")
    download_file(f"{server.url}/{other}", tmp_path / other, backoff=0.01)
    assert (tmp_path / other).read_bytes() == shards[other] and len(server.requests(other)) == 2


def test_download_gives_up_with_a_clear_error_and_no_final_file(server, tmp_path, monkeypatch):
    server.plan = {shard_name(0): ["truncate"] * 3}
    sleeps = []
    monkeypatch.setattr(dataset.time, "sleep", sleeps.append)
    with pytest.raises(RuntimeError, match=r"shard_00000\.parquet.*3 attempts"):
        download_file(f"{server.url}/{shard_name(0)}", tmp_path / shard_name(0), attempts=3, backoff=1.0)
    assert not (tmp_path / shard_name(0)).exists()
    assert (tmp_path / (shard_name(0) + ".partial")).exists()  # kept, for a later Range resume
    # exponential backoff with jitter: the k-th wait lies in [0.5, 1.5] * 2**k
    assert len(sleeps) == 2 and all(0.5 * 2 ** k <= s <= 1.5 * 2 ** k for k, s in enumerate(sleeps))


def test_download_missing_shard_is_not_retried(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)  # the environment override, no base_url argument
    with pytest.raises(RuntimeError, match=r"1 of 1 shards failed: shard_00007\.parquet.*404"):
        download_shards([7], tmp_path, backoff=0.01, progress=False)
    assert server.requests(shard_name(7)) == [None]
    assert not any(tmp_path.iterdir())


def test_killed_download_leaves_no_final_file_and_resumes(server, tmp_path):
    name = shard_name(0)
    big = parquet_bytes([os.urandom(3000).hex() for _ in range(100)])  # ~600 kB, trickled over seconds
    server.files[name], server.plan = big, {name: ["slow"]}
    dest, part = tmp_path / name, tmp_path / (name + ".partial")
    code = f"from nanochat.dataset import download_file; download_file({server.url + '/' + name!r}, {str(dest)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 30
        while not (part.exists() and part.stat().st_size >= 16384):
            assert time.time() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not dest.exists()
    have = part.stat().st_size
    assert 0 < have < len(big) and part.read_bytes() == big[:have]
    download_file(f"{server.url}/{name}", dest, backoff=0.01)
    assert dest.read_bytes() == big and not part.exists()
    assert server.requests(name)[-1] == f"bytes={have}-"


def test_ctrl_c_stops_parallel_downloads_promptly(server, tmp_path):
    big = parquet_bytes([os.urandom(3000).hex() for _ in range(100)])
    for i in (0, 1):
        server.files[shard_name(i)] = big
    server.plan = {shard_name(0): ["slow"], shard_name(1): ["slow"]}
    cmd = [sys.executable, "-m", "nanochat.dataset", "-n", "2", "--dir", str(tmp_path), "--url", server.url]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    part = tmp_path / (shard_name(0) + ".partial")
    deadline = time.time() + 30
    while not (part.exists() and part.stat().st_size > 0):
        assert time.time() < deadline and proc.poll() is None, "the download never started"
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 3  # the slow transfers (~6 s each) were abandoned, not waited for
    assert proc.returncode == 130 and "run the same command again to resume" in err
    assert not (tmp_path / shard_name(0)).exists() and part.exists()


def test_cli_downloads_train_and_val_shards(server, tmp_path, capsys):
    assert dataset.main(["-n", "2", "--dir", str(tmp_path), "--url", server.url]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_name(0), shard_name(1), shard_name(MAX_SHARD)]
    # FineWeb-Edu: the same layout and loader, its own validation shard
    fw = tmp_path / "fw"
    assert dataset.main(["--source", "fineweb", "-n", "1", "--dir", str(fw), "--url", server.url]) == 0
    assert sorted(p.name for p in fw.iterdir()) == [shard_name(0), shard_name(FINEWEB_VAL)]
    assert [t for t, _ in iter_documents(list_data_files(fw))][:1] == ["document 0-0 " * 50]
    assert dataset.main(["-n", "-3", "--dir", str(tmp_path)]) == 1
    assert "-n -3 is not allowed" in capsys.readouterr().err
    assert shard_indices(-1) == list(range(MAX_SHARD + 1))
    assert shard_indices(-1, "fineweb") == list(range(FINEWEB_VAL + 1))


def test_sources_are_the_real_locations(monkeypatch, tmp_path):
    assert SOURCES["climbmix"].base_url.endswith("karpathy/climbmix-400b-shuffle/resolve/main")
    assert SOURCES["fineweb"].base_url.endswith("karpathy/fineweb-edu-100b-shuffle/resolve/main")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path / "base_data_climbmix" and default_data_dir("fineweb") == tmp_path / "base_data"


# ----------------------------------------------------------------------------- local directories

def make_mixed_dir(root: Path) -> dict:
    """One file of every format, with the awkward cases; returns the documents each should yield."""
    (root / "sub").mkdir(parents=True)
    bad = b"caf\xe9 \xff\xfe end"  # latin-1 and stray bytes: not UTF-8
    pq.write_table(pa.table({"text": ["p0", "", None, "p3", "p4"]}), root / "a.parquet", row_group_size=2)
    (root / "b.txt").write_bytes(b"first block\nstill first\n\n\n  \nsecond " + bad + b"\r\n\r\nthird\n")
    (root / "c.jsonl").write_bytes(b'{"text": "j0"}\nnot json\n{"other": 1}\n{"text": "j1 ' + bad + b'"}\n[1]\n')
    long = "x" * 400
    (root / "sub" / "wiki_00").write_text(
        '<doc id="1" url="?curid=1" title="Short">\nShort\n\nstub\n</doc>\n'
        f'<doc id="2" url="?curid=2" title="Long">\nLong\n\nFish &amp; chips {long}\n</doc>\n', encoding="utf-8")
    (root / "README.md").write_text("not data")
    (root / ".hidden.txt").write_text("hidden")
    (root / "d.parquet.partial").write_bytes(b"PAR1 half")
    return {"a.parquet": ["p0", "p3", "p4"],
            "b.txt": ["first block\nstill first", "second caf\ufffd \ufffd\ufffd end", "third"],
            "c.jsonl": ["j0", "j1 caf\ufffd \ufffd\ufffd end"],
            "wiki_00": [f"Long\n\nFish & chips {long}"]}


def test_local_formats_are_detected_and_parsed(tmp_path):
    expected = make_mixed_dir(tmp_path)
    files = list_data_files(tmp_path)
    assert [f.name for f in files] == ["a.parquet", "b.txt", "c.jsonl", "wiki_00"]
    assert [file_format(f) for f in files] == ["parquet", "txt", "jsonl", "wiki"]
    for fi, f in enumerate(files):
        docs = list(iter_documents([f]))
        assert [t for t, _ in docs] == expected[f.name], f.name
    assert list(iter_documents(files))[:3] == [("p0", [0, 0]), ("p3", [0, 3]), ("p4", [0, 4])]
    assert split_files(files, "val") == files[-1:] and split_files(files, "train") == files[:-1]


def test_parquet_string_column_with_invalid_utf8(tmp_path):
    data = b"hello" + b"ok \xff bad"
    offsets = pa.array([0, 5, len(data)], type=pa.int32()).buffers()[1]
    col = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])  # unvalidated, like a sloppy writer
    pq.write_table(pa.table({"text": col}), tmp_path / "bad.parquet")
    assert [t for t, _ in iter_documents([tmp_path / "bad.parquet"])] == ["hello", "ok \ufffd bad"]


def test_ranks_partition_documents_and_resume(tmp_path):
    expected = make_mixed_dir(tmp_path)
    files = list_data_files(tmp_path)
    everything = list(iter_documents(files))
    assert [t for t, _ in everything] == [d for f in files for d in expected[f.name]]
    for world in (2, 3):
        per_rank = [list(iter_documents(files, r, world)) for r in range(world)]
        merged = sorted((tuple(p), t) for docs in per_rank for t, p in docs)
        assert merged == sorted((tuple(p), t) for t, p in everything)  # none lost, none twice
    # resuming after any position yields exactly the rest
    for k, (_, pos) in enumerate(everything):
        assert list(iter_documents(files, start=json.loads(json.dumps(pos)))) == everything[k + 1:]
    picks = [everything[i][1] for i in (5, 0, 3)]
    assert read_documents(files, picks) == [everything[i][0] for i in (5, 0, 3)]


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*python -m nanochat.dataset --source climbmix -n 8"):
        list_data_files(tmp_path / "nope")
    (tmp_path / "notes.md").write_text("hi")
    assert list_data_files(tmp_path) == []
    with pytest.raises(ValueError, match="at least 2 data files.*found 0; fill the data directory with `python -m"):
        split_files([], "train")
    with pytest.raises(ValueError, match="at least 2 data files.*found 1: .*a.txt"):
        split_files([tmp_path / "a.txt"], "train")
    with pytest.raises(ValueError, match="use 'train' or 'val'"):
        split_files([tmp_path / "a.txt"] * 2, "test")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_documents([tmp_path / "x.parquet"]))
    with pytest.raises(ValueError, match="rank 2 is not allowed"):
        list(iter_documents([tmp_path / "x.parquet"], 2, 2))


# ----------------------------------------------------------------------------- demo corpus

def test_demo_corpus_is_deterministic_and_structured(tmp_path):
    a = make_demo_corpus(tmp_path / "a", n_docs=600, seed=3, docs_per_shard=200)
    b = make_demo_corpus(tmp_path / "b", n_docs=600, seed=3, docs_per_shard=200)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert make_documents(600, seed=4) != make_documents(600, seed=3)
    files = list_data_files(tmp_path / "a")
    assert files == a and len(files) == 4  # 3 train shards + 1 val shard
    docs = [t for t, _ in iter_documents(files)]
    assert docs == make_documents(600, seed=3)
    # the arithmetic is right and facts are consistent across documents
    import re
    sums = re.findall(r"(\d+) plus (\d+) is (\d+)\.", "\n".join(docs))
    assert len(sums) > 20 and all(int(x) + int(y) == int(z) for x, y, z in sums)
    homes = {}
    for name, town in re.findall(r"(\w+) is an? \w+ who lives in (\w+)\.", "\n".join(docs)):
        assert homes.setdefault(name, town) == town
    assert len(homes) > 20
    # regenerating smaller removes the old extra shards; a foreign non-empty directory is refused
    assert len(make_demo_corpus(tmp_path / "a", n_docs=300, seed=3, docs_per_shard=200)) == 3
    assert len(list_data_files(tmp_path / "a")) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shard_00000.parquet").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo_corpus(tmp_path / "mine", n_docs=100)


def test_demo_corpus_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nanochat.demo_corpus", "--dir", str(tmp_path), "--docs", "300"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "wrote 2 shards" in out and len(list_data_files(tmp_path)) == 2


# ----------------------------------------------------------------------------- real data (skipped when absent)

@pytest.mark.shared_data
def test_enwiki_wikiextractor_files():
    root = SHARED / "pretrain_enwiki"
    if not root.is_dir():
        pytest.skip("../shared/data/pretrain_enwiki is absent")
    files = list_data_files(root)
    assert len(files) == 64 and files[-1].name == "wiki_63" and {file_format(f) for f in files} == {"wiki"}
    docs = [t for t, _ in iter_documents(files)]
    assert len(docs) == 25_072  # the README's count of documents with at least 300 characters
    assert docs[0].startswith("Jarred Shaw\n\nJarred Shaw (born September 28, 1990)")
    assert not any("&amp;" in d for d in docs[:2000])  # entities are unescaped
    r0, r1 = (sum(1 for _ in iter_documents(files[:4], r, 2)) for r in (0, 1))
    assert r0 + r1 == sum(1 for _ in iter_documents(files[:4])) and abs(r0 - r1) <= 4
