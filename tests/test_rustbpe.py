"""The Rust BPE trainer: pre-tokeniser == the `regex` module, merges == a plain Python BPE and == PyPI rustbpe,
streaming/threads/limits/bad input."""
from __future__ import annotations

import html
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import (SPLIT_PATTERN, Tokenizer, char_class, split_text, train_merges,
                                unicode_version)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import needs_shared_data  # noqa: E402

PAT = regex.compile(SPLIT_PATTERN)


# ----------------------------------------------------------------------------- test corpora

def multilingual_text(n_words: int, seed: int = 0) -> str:
    """Made-up text in many scripts with Zipf-like word frequencies (so that merges form), emoji
    (incl. ZWJ sequences and skin tones), digits, contractions, odd whitespace and punctuation."""
    rng = random.Random(seed)
    alphabets = {
        "latin": "abcdefghijklmnopqrstuvwxyzéèàüößñç", "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюя",
        "greek": "αβγδεζηθικλμνξοπρστυφχψω", "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
        "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのアイウエオカキクケコ", "hangul": "가나다라마바사아자차카타파하한국어",
        "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "devanagari": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह\u094d\u093e\u093f",
    }
    vocab = []
    for script, letters in alphabets.items():
        for _ in range(60):
            word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
            vocab.append(word.capitalize() if script in ("latin", "cyrillic", "greek") and rng.random() < 0.2 else word)
    emoji = ["😀", "😂", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "🎉", "🤖", "✨", "🔥"]
    extras = emoji + ["'s", "'LL", "'ve", "'ſ", "123", "4567", "٣٤", "²", "Ⅻ", "3.14", "\n", "\n\n", "\r\n", "\t",
                      "  ", "\u3000", "\u00a0", ",", ".", "!?", "(", ")", '"', "—", "...", " ", "#", "$", "%"]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    out = []
    for _ in range(n_words):
        r = rng.random()
        out.append(rng.choice(extras) if r < 0.25 else rng.choices(vocab, weights)[0])
        out.append(" " if rng.random() < 0.7 else "")
    return "".join(out)


ENGLISH = ("The quick brown fox jumps over the lazy dog. It's 2024 and we've seen 12345 foxes; they'll say "
           "\"don't\" — aaaa aaaaaaa abababab!!\n\n  Indented line\r\n\ttabbed\u00a0nbsp 3.14159 ") * 8


def reference_bpe(texts: list[str], n_merges: int) -> list[tuple[int, int]]:
    """The plain algorithm: split with the `regex` module, then repeatedly merge the most frequent
    adjacent pair (ties: the smallest pair) in every word, recounting everything each time."""
    words = Counter(tuple(chunk.encode("utf-8")) for t in texts for chunk in PAT.findall(t))
    merges = []
    for k in range(n_merges):
        counts = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += c
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        z, new = 256 + k, Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(z)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
        merges.append(best)
    return merges


def enwiki_docs(max_chars: int) -> list[str]:
    """Bodies of the shared WikiExtractor files (>= 300 chars, HTML unescaped), up to max_chars."""
    root = needs_shared_data("pretrain_enwiki")
    docs, total = [], 0
    for f in sorted(root.rglob("wiki_*")):
        for m in re.finditer(r'<doc id="\d+" url="[^"]*" title="[^"]*">\n(.*?)\n</doc>', f.read_text("utf-8"), re.S):
            body = html.unescape(m.group(1))
            if len(body) >= 300:
                docs.append(body)
                total += len(body)
                if total >= max_chars:
                    return docs
    return docs


# ----------------------------------------------------------------------------- the pre-tokeniser

# characters that exercise every branch of the pattern, mixed with arbitrary assigned characters
TRICKY = list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2028\u2029\u3000\x1c\x1f'sSdDmMtTlLvVeErRſkK0123456789٣²Ⅷ½"
              "aZéß中文日本한국😀👍🏽\u200d\u0301\u094d!?.,;:-()[]\"#$%&*+/<=>@\\^_`{|}~")
# The tables follow the Unicode version of the Python that generated them (14.0 for 3.11), `regex` its own
# (newer) one: compare on characters both know. On another Python, fall back to those of Unicode 3.2.
SAME_UNICODE = unicode_version() == unicodedata.unidata_version
OTHER_PYTHON = (f"the tables are Unicode {unicode_version()}, this Python's unicodedata is "
                f"{unicodedata.unidata_version} (python tools/gen_unicode_tables.py regenerates them)")
assigned = st.characters(blacklist_categories=("Cs", "Cn"))  # Cn: unassigned in this Python's Unicode
if not SAME_UNICODE:
    assigned = assigned.filter(lambda c: unicodedata.ucd_3_2_0.category(c) != "Cn")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(TRICKY), assigned), max_size=40).map("".join))
def test_split_matches_regex_module(text):
    assert split_text(text) == PAT.findall(text)


def test_split_examples():
    assert split_text("Hello world") == ["Hello", " world"]
    assert split_text("I'm 12345 x'ſ  \n\n  y") == ["I", "'m", " ", "12", "34", "5", " x", "'ſ", "  \n\n", " ", " y"]
    assert split_text("") == []
    for text in (ENGLISH, multilingual_text(3000, seed=1)):
        assert split_text(text) == PAT.findall(text)


@pytest.mark.skipif(not SAME_UNICODE, reason=OTHER_PYTHON)
def test_char_classes_match_regex_module_for_every_assigned_codepoint():
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    text = "".join(map(chr, cps))
    expected = [0] * len(cps)
    for cls, pat in ((1, r"\p{L}"), (2, r"\p{N}"), (3, r"\s")):
        for m in regex.finditer(pat, text):
            expected[m.start()] = cls
    got = [char_class(c) for c in cps]
    bad = [(hex(c), e, g) for c, e, g in zip(cps, expected, got) if e != g]
    assert not bad, f"{len(bad)} codepoints differ, first: {bad[:5]}"


@pytest.mark.skipif(not SAME_UNICODE, reason=OTHER_PYTHON)
def test_unicode_tables_are_up_to_date():
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(repo / "tools" / "gen_unicode_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.shared_data
def test_split_of_enwiki_matches_regex_module():
    text = "\n".join(enwiki_docs(1_000_000))
    assert split_text(text) == PAT.findall(text)


# ----------------------------------------------------------------------------- merges

@pytest.mark.parametrize("texts,n_merges", [
    ([ENGLISH], 200),
    ([multilingual_text(2000, seed=2)], 300),
    (["aaaaaaaaaa aaa aa a", "abababab ba ab", "xyzzyzzyz"] * 3, 40),  # overlapping pairs, runs, ties
    (["😀😀😀 👍🏽👍🏽 中文中文中文", "ſſſ 'ſ 'S"], 60),
])
def test_merges_equal_reference_bpe(texts, n_merges):
    merges, stats = train_merges(texts, n_merges)
    assert merges == reference_bpe(texts, n_merges)
    assert stats["chunks"] == sum(len(PAT.findall(t)) for t in texts)


def test_merges_stop_when_pairs_run_out():
    merges, stats = train_merges(["abc abc"], 50)
    assert merges == reference_bpe(["abc abc"], 50) and len(merges) == stats["merges"] == 3  # ab, (ab)c, ' '+abc


def test_same_merges_whatever_buffers_threads_and_piece_splits():
    docs = [multilingual_text(400, seed=s) for s in range(30)]
    big = "\n".join(docs) * 40  # > 2 MiB of UTF-8: cut into pieces at safe boundaries inside Rust
    no_newline = "ab, " * 600_000  # > 2 MiB with no safe boundary: one piece
    assert len(big.encode()) > 2 << 20 and len(no_newline) > 2 << 20
    corpus = docs + [big, no_newline]
    base, st1 = train_merges(corpus, 300, num_threads=1)
    for threads, buf in ((2, 1 << 20), (3, 1000), (4, 1)):
        merges, st = train_merges(iter(corpus), 300, num_threads=threads, buffer_bytes=buf)
        assert merges == base
        assert (st["chunks"], st["unique_chunks"]) == (st1["chunks"], st1["unique_chunks"])
    assert st1["chunks"] == sum(len(PAT.findall(d)) for d in corpus)


def test_doc_cap_and_max_chars():
    docs = ["héllo wörld " * 10, "short", "never read"]
    merges, st = train_merges(docs, 20, doc_cap=30, max_chars=33)
    assert (st["docs"], st["chars"], st["capped_docs"], st["limit_reached"]) == (2, 33, 1, 1)
    assert merges == reference_bpe([docs[0][:30], "sho"], 20)

    consumed = []

    def gen():
        for i in range(10_000):
            consumed.append(i)
            yield "x" * 1000
    train_merges(gen(), 5, max_chars=5000, buffer_bytes=2000)
    assert len(consumed) < 10  # stops pulling from the iterator once the limit is reached


def test_invalid_utf8_is_replaced_and_counted():
    docs = [b"caf\xc3\xa9 ok", b"bad \xff\xfe bytes \xc3", "lone \udc80 surrogate", b"\xed\xa0\x80"]
    merges, st = train_merges(docs, 30)
    assert st["replaced"] == 2 + 1 + 1 + 3  # Python's decode(errors="replace") counts the same sequences
    fixed = ["café ok", b"bad \xff\xfe bytes \xc3".decode("utf-8", "replace"), "lone \ufffd surrogate",
             b"\xed\xa0\x80".decode("utf-8", "replace")]
    assert merges == reference_bpe(fixed, 30)


def test_errors_and_progress():
    with pytest.raises(ValueError, match="corpus is empty"):
        train_merges(iter([]), 10)
    with pytest.raises(ValueError, match="corpus is empty"):
        train_merges(["", b""], 10)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer of at least 265 \(256 byte tokens \+ 9 special"):
        Tokenizer.train_from_iterator(["hello"], 264)
    with pytest.raises(TypeError, match="must be str or bytes, got int"):
        train_merges([1, 2], 10)

    text = multilingual_text(3000)
    seen = []
    merges, _ = train_merges([text], 250, progress=lambda phase, done, total: seen.append((phase, done, total)))
    phases = [p for p, _, _ in seen]
    assert phases[0] == "read" and "count" in phases and phases[-1] == "merge"
    assert seen[-1] == ("merge", 250, 250) and len(merges) == 250
    merge_done = [d for p, d, _ in seen if p == "merge"]
    assert merge_done == sorted(merge_done) and len(merge_done) >= 50

    with pytest.raises(InterruptedError):
        train_merges([text], 250, progress=lambda phase, done, total: phase != "merge" or done < 100)

    def boom(phase, done, total):
        if phase == "merge":
            raise KeyError("from the callback")
    with pytest.raises(KeyError, match="from the callback"):
        train_merges([text], 250, progress=boom)

    seen.clear()  # a corpus that runs out of pairs still ends with a report of what was done
    merges, _ = train_merges(["abc abc"], 250, progress=lambda *a: seen.append(a))
    assert seen[-1] == ("merge", 3, 250)


# ----------------------------------------------------------------------------- vs PyPI rustbpe

def _compare_with_pypi_rustbpe(docs: list[str], vocab_size: int):
    rustbpe = pytest.importorskip("rustbpe")
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(docs), vocab_size, pattern=SPLIT_PATTERN)
    merges, _ = train_merges(docs, vocab_size - 256)
    tok = Tokenizer(merges)
    ref_vocab = [bytes(b) for b, _ in sorted(ref.get_mergeable_ranks(), key=lambda kv: kv[1])]
    assert len(merges) == vocab_size - 256
    assert ref_vocab == tok.vocab  # the same token bytes at every id
    sample = docs[0][:5000] + multilingual_text(300, seed=99)
    assert ref.encode(sample) == tok.encode(sample)  # and the same pairs: rustbpe encodes with its merge table


def test_merges_equal_pypi_rustbpe_on_generated_multilingual_text():
    docs = [multilingual_text(1500, seed=s) for s in range(60)]  # ~1 MB
    _compare_with_pypi_rustbpe(docs, 2048)


@pytest.mark.shared_data
def test_merges_equal_pypi_rustbpe_on_a_few_mb_of_multilingual_text():
    docs = enwiki_docs(2_500_000) + [multilingual_text(1500, seed=100 + s) for s in range(60)]
    random.Random(0).shuffle(docs)
    _compare_with_pypi_rustbpe(docs, 8192)
