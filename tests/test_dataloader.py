"""The BOS-aligned best-fit packing loader: invariants, rank sharding, exact resume, eval batches, bpb."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from nanochat.dataloader import PackingLoader
from nanochat.dataset import iter_documents, list_data_files, read_documents
from nanochat.demo_corpus import make_demo_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BOS = 0


class ByteTokenizer:
    """Token = byte + 1, BOS = 0: the real tokenizer's encode/BOS interface, trivially invertible."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=1):
        one = isinstance(texts, str)
        out = [([prepend] if prepend is not None else []) + [b + 1 for b in t.encode("utf-8")]
               for t in ([texts] if one else texts)]
        return out[0] if one else out

    def token_bytes(self):
        return [0] + [1] * 256


class IdTokenizer(ByteTokenizer):
    """Document "id:length" becomes BOS followed by `length` copies of id+1: every token names its document."""

    def encode(self, texts, prepend=None, num_threads=1):
        out = []
        for t in texts:
            doc_id, length = map(int, t.split(":"))
            out.append([prepend] + [doc_id + 1] * length)
        return out


def id_corpus(root: Path, n_files=3, per_file=60, max_len=50, seed=0) -> dict:
    """jsonl files of "id:length" documents; returns {id: length}."""
    rng, lengths, i = random.Random(seed), {}, 0
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        with open(root / f"part{f}.jsonl", "w") as fh:
            for _ in range(per_file):
                lengths[i] = rng.randint(1, max_len)
                fh.write(json.dumps({"text": f"{i}:{lengths[i]}"}) + "\n")
                i += 1
    return lengths


def rows_of(x, y):
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    return torch.cat([x, y[:, -1:]], dim=1).tolist()


def segments(row):
    """Split a row at BOS tokens: [(doc_id, n_tokens_after_bos)], asserting one document per segment."""
    assert row[0] == BOS, "row does not start with BOS"
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] == BOS:
            body = row[start + 1:i]
            assert len(set(body)) <= 1, "tokens of two documents without a BOS between them"
            out.append((body[0] - 1 if body else None, len(body)))
            start = i
    return out


def check_rows(batches, lengths, T):
    """Every row: BOS first, whole documents, only the last one possibly cropped; returns ids in order
    (None for a lone BOS in the last position, which uses no document)."""
    seen = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape[1] == T
        for row in rows_of(x, y):
            segs = segments(row)
            for k, (doc, n) in enumerate(segs):
                if doc is None:  # a lone BOS filling the very last token of a row
                    assert k == len(segs) - 1 and n == 0
                elif k < len(segs) - 1:
                    assert n == lengths[doc], f"document {doc} cut in the middle of a row"
                else:
                    assert n <= lengths[doc]
                seen.append(doc)
    return seen


def test_rows_are_bos_aligned_whole_documents_and_best_fit(tmp_path):
    lengths = id_corpus(tmp_path, max_len=60)
    files = list_data_files(tmp_path)
    T = 40
    # a buffer that holds the whole corpus: then every choice is checkable against everything not yet used
    batches = list(PackingLoader(IdTokenizer(), files, B=3, T=T, buffer_size=10_000, loop=False))
    assert len(batches) > 10
    seen = check_rows(batches, lengths, T)
    known = [d for d in seen if d is not None]
    assert len(known) == len(set(known))  # nothing used twice in one pass
    short = {d for d in lengths if lengths[d] + 1 <= T + 1}  # with BOS, fits a row whole
    long_order = [d for d in known if d not in short]
    assert long_order == sorted(long_order) and 0 < len(long_order) < len(lengths)  # long: first in, first out
    unused, long_first = set(lengths), 0
    for x, y in batches:
        for row in rows_of(x, y):
            space = T + 1
            for doc, n in segments(row):
                shorts = [d for d in unused if d in short]
                fits = [lengths[d] + 1 for d in shorts if lengths[d] + 1 <= space]
                if doc is None:  # one token of space left and no document is that short
                    assert space == 1 and not fits
                    space = 0
                    continue
                unused.discard(doc)
                if doc not in short:  # an empty row, when long ones are half the buffer or nothing short is left
                    n_long = len(unused) + 1 - len(shorts)
                    assert (space == T + 1 and n_long >= len(shorts)) or not shorts
                    long_first += space == T + 1 and bool(shorts)
                    assert n + 1 == space
                elif lengths[doc] + 1 <= space:  # taken whole: the largest that fit
                    assert n == lengths[doc] and all(f <= n + 1 for f in fits)
                else:  # cropped: only when nothing fit, and then the shortest (least waste)
                    assert n + 1 == space and not fits and all(lengths[d] >= lengths[doc] for d in shorts)
                space -= n + 1
            assert space == 0  # no padding: the row is exactly full
    assert long_first > 0  # the half-the-buffer rule was exercised, not only the leftovers at the end


def test_two_ranks_lose_and_duplicate_nothing(tmp_path):
    lengths = id_corpus(tmp_path)
    files = list_data_files(tmp_path)
    tok, owner = IdTokenizer(), {}
    for rank in range(2):
        loader = PackingLoader(tok, files, B=2, T=24, rank=rank, world_size=2, buffer_size=20, tokenizer_batch_size=8)
        used = check_rows([next(loader) for _ in range(6)], lengths, 24)
        state = loader.state_dict()
        assert loader.epoch == 1  # still in the first pass, so every document is in exactly one place:
        buffered = [int(t.split(":")[0]) for t in read_documents(files, state["buffer"])]
        unread = [int(t.split(":")[0]) for t, _ in iter_documents(files, rank, 2, start=state["cursor"])]
        for doc in used + buffered + unread:  # ... used, waiting in the buffer, or not read yet
            if doc is None:
                continue
            assert doc not in owner, f"document {doc} seen by rank {owner.get(doc)} and rank {rank}"
            owner[doc] = rank
        assert used and buffered and unread
    assert sorted(owner) == sorted(lengths)
    assert abs(sum(r == 0 for r in owner.values()) - sum(r == 1 for r in owner.values())) <= 3


@pytest.mark.parametrize("rank,world,skip", [(0, 1, 3), (1, 2, 4), (0, 1, 60), (1, 2, 30)])
def test_resume_gives_the_same_next_batches(tmp_path, rank, world, skip):
    id_corpus(tmp_path, n_files=2, per_file=40)  # small: the long skips reach the second epoch
    files = list_data_files(tmp_path)
    kw = dict(B=2, T=16, rank=rank, world_size=world, buffer_size=16, tokenizer_batch_size=5)
    a = PackingLoader(IdTokenizer(), files, **kw)
    for _ in range(skip):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # as it travels through a checkpoint's meta.json
    b = PackingLoader(IdTokenizer(), files, state=state, **kw)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == b.epoch and (skip < 30 or state["epoch"] >= 2)


def test_resume_refuses_other_ranks_or_files(tmp_path):
    id_corpus(tmp_path)
    files = list_data_files(tmp_path)
    state = PackingLoader(IdTokenizer(), files, B=1, T=8).state_dict()
    with pytest.raises(ValueError, match="rank 0 of 1, not rank 0 of 2"):
        PackingLoader(IdTokenizer(), files, B=1, T=8, world_size=2, state=state)
    with pytest.raises(ValueError, match="data files differ"):
        PackingLoader(IdTokenizer(), files[:2], B=1, T=8, state=state)
    one = tmp_path / "solo" / "one.jsonl"
    one.parent.mkdir()
    one.write_text('{"text": "0:3"}\n{"text": "1:3"}\n')
    with pytest.raises(ValueError, match="rank 2 of 3 gets no documents"):
        next(PackingLoader(IdTokenizer(), [one], B=1, T=8, rank=2, world_size=3))


def test_demo_corpus_rows_decode_to_document_text(tmp_path):
    files = make_demo_corpus(tmp_path, n_docs=400, seed=1, docs_per_shard=150, row_group_size=32)
    texts = [t.encode() for t, _ in iter_documents(files)]
    whole = set(texts)
    loader = PackingLoader(ByteTokenizer(), files[:-1], B=4, T=256, buffer_size=64, tokenizer_batch_size=16)
    for _ in range(4):
        for row in rows_of(*next(loader)):
            pieces = bytes(t - 1 if t else 0 for t in row).split(b"\x00")[1:]  # BOS (0) separates documents
            for k, p in enumerate(pieces):
                assert p in whole if k < len(pieces) - 1 else any(d.startswith(p) for d in texts)
    # resume through parquet row groups (read_documents on parquet positions)
    state = loader.state_dict()
    again = PackingLoader(ByteTokenizer(), files[:-1], B=4, T=256, buffer_size=64, tokenizer_batch_size=16, state=state)
    assert all(torch.equal(a, b) for a, b in zip(next(loader), next(again)))


def test_eval_loader_is_one_repeatable_pass(tmp_path):
    files = make_demo_corpus(tmp_path, n_docs=200, seed=2, docs_per_shard=100)
    one = list(PackingLoader(ByteTokenizer(), files[-1:], B=2, T=64, loop=False))
    two = list(PackingLoader(ByteTokenizer(), files[-1:], B=2, T=64, loop=False))
    assert len(one) > 3 and all(torch.equal(a[0], b[0]) for a, b in zip(one, two))


def test_bits_per_byte_is_one_pass_and_says_when_it_ran_short(tmp_path):
    from nanochat.loss_eval import bits_per_byte, evaluate_bpb
    files = make_demo_corpus(tmp_path, n_docs=400, seed=2, docs_per_shard=400)

    class Uniform(torch.nn.Module):  # every token costs ln(257) nats: exactly log2(257) bits per byte
        def forward(self, x, y, loss_reduction="mean"):
            return torch.full(y.shape, math.log(257.0))

    token_bytes = torch.tensor(ByteTokenizer().token_bytes())
    n = len(list(PackingLoader(ByteTokenizer(), files[-1:], B=2, T=32, loop=False)))
    r = bits_per_byte(Uniform(), PackingLoader(ByteTokenizer(), files[-1:], B=2, T=32, loop=False), 3, token_bytes)
    assert r == {"bpb": pytest.approx(math.log2(257)), "tokens": 3 * 2 * 32, "steps": 3}
    # asked for more than the split holds: every batch once, no cycling, and the count says so
    r = bits_per_byte(Uniform(), PackingLoader(ByteTokenizer(), files[-1:], B=2, T=32, loop=False), n + 50, token_bytes)
    assert r["steps"] == n and r["tokens"] == n * 2 * 32 < (n + 50) * 2 * 32
    assert evaluate_bpb(Uniform(), PackingLoader(ByteTokenizer(), files[-1:], B=2, T=32), 3, token_bytes) == \
        pytest.approx(math.log2(257))


def test_with_the_real_tokenizer(tmp_path):
    from nanochat.tokenizer import Tokenizer
    files = make_demo_corpus(tmp_path, n_docs=600, seed=5, docs_per_shard=200)
    texts = [t for t, _ in iter_documents(files[:-1])]
    tok = Tokenizer.train_from_iterator(iter(texts), 400)
    bos = tok.get_bos_token_id()
    encoded = [tuple(ids) for ids in tok.encode(texts, prepend=bos)]
    whole = set(encoded)
    kw = dict(B=4, T=128, rank=1, world_size=2, buffer_size=50, tokenizer_batch_size=16)
    loader = PackingLoader(tok, files[:-1], **kw)
    for _ in range(3):
        for row in rows_of(*next(loader)):
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            assert starts[0] == 0
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            for k, p in enumerate(pieces):
                assert p in whole if k < len(pieces) - 1 else any(d[:len(p)] == p for d in encoded)
    resumed = PackingLoader(tok, files[:-1], state=json.loads(json.dumps(loader.state_dict())), **kw)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(next(loader), next(resumed)))


@pytest.mark.shared_data
def test_enwiki_rows(tmp_path):
    root = SHARED / "pretrain_enwiki"
    if not root.is_dir():
        pytest.skip("../shared/data/pretrain_enwiki is absent")
    files = list_data_files(root)[:2]
    texts = [t.encode() for t, _ in iter_documents(files)]
    loader = PackingLoader(ByteTokenizer(), files, B=2, T=1024, buffer_size=100, tokenizer_batch_size=32)
    for _ in range(3):
        for row in rows_of(*next(loader)):
            pieces = bytes(t - 1 if t else 0 for t in row).split(b"\x00")[1:]
            assert pieces and all(any(d.startswith(p) for d in texts) for p in pieces)
    assert loader.tokens_cropped > 0  # wikipedia articles are longer than 1k bytes: some must be cut
