"""nanochat.tokenizer: tiktoken encoding of our merges, special tokens, save/load, chat rendering, streaming."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import regex

from nanochat.tokenizer import (MIN_VOCAB_SIZE, SPECIAL_TOKENS, SPLIT_PATTERN, StreamDecoder, Tokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rustbpe import ENGLISH, multilingual_text  # noqa: E402

TEXTS = ["", "hello world", "Hello, World! It's 2024.\n\n  indented\r\n\ttab", "😀 👍🏽 👨\u200d👩\u200d👧 🦀",
         "中文 日本語 한국어 Ελληνικά русский हिन्दी العربية", "a" * 1000, "<|bos|> <|python_start|>x<|python_end|>",
         "lone \udc80 surrogate" .encode("utf-16", "surrogatepass").decode("utf-16", "replace")]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([multilingual_text(3000, seed=s) for s in range(4)] + [ENGLISH],
                                         MIN_VOCAB_SIZE + 500)


def naive_encode(tok: Tokenizer, text: str) -> list[int]:
    """BPE by the book: in each chunk, apply the earliest-learnt merge present, until none applies."""
    rank = {pair: 256 + k for k, pair in enumerate(tok.merges)}
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pairs = [(rank.get(p, 1 << 60), i) for i, p in enumerate(zip(ids, ids[1:]))]
            r, i = min(pairs)
            if r == 1 << 60:
                break
            ids[i:i + 2] = [r]
        out += ids
    return out


def test_vocab_and_special_tokens(tok):
    assert tok.get_vocab_size() == MIN_VOCAB_SIZE + 500 == len(tok.token_bytes())
    assert len(tok.merges) == 500 and tok.train_stats["merges"] == 500
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(256 + 500, 256 + 500 + 9))
    assert tok.get_bos_token_id() == ids[0] and tok.get_special_tokens() == SPECIAL_TOKENS
    assert tok.token_bytes()[-9:] == [0] * 9 and min(tok.token_bytes()[:-9]) == 1
    with pytest.raises(ValueError, match=r"unknown special token '<\|nope\|>'; known: <\|bos\|>, <\|user_start\|>"):
        tok.encode_special("<|nope|>")


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_decode_round_trip_and_naive_bpe(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == naive_encode(tok, text)  # tiktoken with our ranks == applying our merges
    assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode("utf-8"))


def test_batch_encode_prepend_append(tok):
    batch = tok.encode(TEXTS, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"), num_threads=2)
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert batch == [[bos, *tok.encode(t), end] for t in TEXTS]
    assert tok.encode(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode("hi", prepend=bos) == [bos, *tok.encode("hi")]
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(42)


def test_special_token_spelling_in_text_is_ordinary_text(tok):
    text = "<|python_start|>print(1)<|python_end|><|bos|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert tok.decode(ids) == text
    assert tok.decode([tok.encode_special("<|python_start|>")]) == "<|python_start|>"


def test_save_load_is_plain_json(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    data = json.loads(path.read_text())
    assert data["format"] == "nanochat-bpe-v1" and data["special_tokens"] == SPECIAL_TOKENS
    assert [tuple(m) for m in data["merges"]] == tok.merges and data["pattern"] == SPLIT_PATTERN
    tok2 = Tokenizer.load(tmp_path / "tok")
    assert tok2.vocab == tok.vocab and tok2.get_vocab_size() == tok.get_vocab_size()
    assert tok2.encode(TEXTS) == tok.encode(TEXTS) and tok2.train_stats == tok.train_stats


@pytest.mark.parametrize("content,error", [
    (None, r"no tokenizer at .*tokenizer.json: train one first"),
    ("{not json", r"is not valid JSON"),
    ('{"format": "pickle"}', r"is not a nanochat tokenizer"),
    ('{"format": "nanochat-bpe-v1", "merges": [[1, 2, 3]]}', r'"merges" must be a list of \[int, int\] pairs'),
    ('{"format": "nanochat-bpe-v1", "merges": [[1, 256]]}', r"merge 0 \(1, 256\) refers to a token that does not exist"),
    ('{"format": "nanochat-bpe-v1", "merges": [[1, 2]], "special_tokens": "x"}', r'"special_tokens" must be a list'),
])
def test_load_errors(tmp_path, content, error):
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        Tokenizer.load(tmp_path)


def test_fewer_merges_when_the_corpus_is_tiny():
    t = Tokenizer.train_from_iterator(["abc abc abc"], 1000)
    assert t.train_stats["merges"] == 3 and t.get_vocab_size() == 256 + 3 + 9
    assert t.decode(t.encode("abc abd")) == "abc abd"


# ----------------------------------------------------------------------------- chat rendering

def test_render_conversation_tokens_and_mask(tok):
    sp = tok.encode_special
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? <|assistant_end|>"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [
        ([sp("<|bos|>"), sp("<|user_start|>"), *e("Be brief.\n\nWhat is 2+2? <|assistant_end|>"), sp("<|user_end|>"),
          sp("<|assistant_start|>")], 0),
        ([*e("Let me compute."), sp("<|python_start|>"), *e("2+2"), sp("<|python_end|>")], 1),
        ([sp("<|output_start|>"), *e("4"), sp("<|output_end|>")], 0),
        ([*e("It is 4."), sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>"), *e("Thanks"), sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        ([*e("You're welcome."), sp("<|assistant_end|>")], 1),
    ]
    assert ids == [i for part, _ in expected for i in part]
    assert mask == [m for part, m in expected for _ in part]
    # the special spelling inside user text stayed ordinary text
    assert ids.count(sp("<|assistant_end|>")) == 2

    short_ids, short_mask = tok.render_conversation(conv, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


@pytest.mark.parametrize("messages,error", [
    ([], r"at least one message"),
    ([{"role": "assistant", "content": "hi"}], r"message 0 has role 'assistant' but 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1 has role 'user' but 'assistant'"),
    ([{"role": "system", "content": "s"}], r"message 1: a system message must be followed by a user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], r"must be followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], r"message 1 has role 'system'"),
    ([{"role": "robot", "content": "a"}], r"message 0 must be a dict with role system\|user\|assistant"),
    ([{"role": "user", "content": ["x"]}], r"message 0: user content must be a str"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}],
     r"message 1: assistant content must be a str or a list of"),
])
def test_render_errors(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ids = tok.render_for_completion(conv)
    prompt, _ = tok.render_conversation({"messages": conv["messages"][:1]})
    assert ids == prompt + [tok.encode_special("<|assistant_start|>")]
    assert len(conv["messages"]) == 2  # the caller's conversation is untouched
    assert tok.render_for_completion({"messages": conv["messages"][:1]}) == ids


# ----------------------------------------------------------------------------- streaming decode

def test_stream_decoder_never_emits_partial_characters(tok):
    text = "crab 🦀, family 👨\u200d👩\u200d👧 done"
    ids = tok.encode(text)
    crab = text.encode()[5:9]
    assert any(0 < len(tok.vocab[i]) < 4 and tok.vocab[i] in crab for i in ids)  # the emoji is split across tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    for p in pieces:
        p.encode("utf-8")  # every piece is whole characters (a lone surrogate would fail here)
    assert "" in pieces  # some tokens had to be held back


def test_stream_decoder_specials_and_invalid_bytes(tok):
    dec = StreamDecoder(tok)
    assert dec.push(0xF0) == "" and dec.push(0x9F) == ""  # first half of a 4-byte character
    assert dec.push(tok.encode_special("<|assistant_end|>")) == "\ufffd<|assistant_end|>"
    assert dec.push(0xFF) == "\ufffd"  # can never start a character: replaced at once, like decode()
    assert dec.push(ord("a")) == "a"
    assert dec.push(0xE4) == "" and dec.flush() == "\ufffd"
