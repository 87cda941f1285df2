"""Tests for dbrx.tokenizer: parity with tiktoken's own cl100k_base, special tokens, chat template, streaming."""

from __future__ import annotations

import hashlib
import shutil
import socket

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

import dbrx.tokenizer as tokenizer_module
from dbrx.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    find_bpe_file,
    get_tokenizer,
)

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

TRICKY = [
    "",
    " ",
    "hello world",
    "Hello, World!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand\rcarriage\n\n\n",
    "   \n  \n\t\t x",
    "1234567890 3.14159 -42 1e10 0x1F",
    "I'm you're we've they'll it's DON'T",
    "😀👍🏽👨‍👩‍👧‍👦 🇫🇷",
    "日本語のテキスト、中文文本，한국어",
    "Ünïcödé çàfé naïve Ω≈ç√∫",
    "def f(x):\n    return x ** 2  # square\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
    "<|endoftext|> <|im_start|>user<|im_end|> <|pad|> <|fim_prefix|>",
    "\u200b\u00a0\u3000zero-width and odd spaces",
    "a" * 1000,
    "\x00\x01\x7f control",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's own cl100k_base, loaded offline from a cache dir holding the bundled BPE file."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    shutil.copyfile(find_bpe_file(), cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())

    def no_network(path: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {path}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.load, "read_file", no_network)
        return tiktoken.get_encoding("cl100k_base")


def test_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    tokenizer_module._load_encoding.cache_clear()  # really read the file here
    tok = Tokenizer()
    assert tok.encode("hello world") == [15339, 1917]


def test_bad_bpe_file(tmp_path):
    missing = tmp_path / "missing.tiktoken"
    with pytest.raises(FileNotFoundError):
        Tokenizer(missing)
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(find_bpe_file().read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer(bad)


def test_vocab_and_specials(tok):
    assert tok.vocab_size == 100352
    assert tok.n_words == 100280
    assert (tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (100257, 100277, 100278, 100279)
    assert tok.stop_ids == (100257, 100279)
    assert tok.special_tokens == SPECIAL_TOKENS
    assert tok.token_id("<|im_end|>") == 100279
    assert tok.token_id("<|endofprompt|>") == 100276
    with pytest.raises(ValueError, match="nope"):
        tok.token_id("<|nope|>")


def test_known_vectors(tok):
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert tok.encode("<|endoftext|>", allow_special=True) == [100257]
    assert tok.encode("") == []


@pytest.mark.parametrize("text", TRICKY)
def test_matches_official_tricky(tok, official, text):
    assert tok.encode(text) == official.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_matches_official_property(tok, official, text):
    ids = tok.encode(text)
    assert ids == official.encode_ordinary(text)
    assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=" \t\r\n\u00a0\u3000\u200baZ9'.-_😀é日", max_size=60))
def test_matches_official_whitespace_mix(tok, official, text):
    assert tok.encode(text) == official.encode_ordinary(text)


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.sampled_from(["<|im_end|>", "<|endoftext|>", "<|pad|>", "<|", "|>", "a", " ", "\n"])))
def test_specials_plain_by_default(tok, pieces):
    text = "".join(pieces)
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


def test_allow_special(tok):
    text = "a<|im_start|>b<|im_end|>c<|endoftext|>"
    assert 100278 not in tok.encode(text)
    assert tok.encode(text, allow_special=True) == [64, 100278, 65, 100279, 66, 100257]
    some = tok.encode(text, allow_special={"<|im_end|>"})
    assert 100279 in some and 100278 not in some and 100257 not in some
    assert tok.decode(some) == text
    with pytest.raises(ValueError):
        tok.encode(text, allow_special={"<|bogus|>"})
    assert tok.encode(text, allow_special="<|im_end|>") == some
    assert tok.encode_batch(["hello world", text]) == [[15339, 1917], tok.encode(text)]


def test_decode(tok):
    ids = tok.encode("x<|im_end|>y", allow_special=True)
    assert tok.decode(ids) == "x<|im_end|>y"
    assert tok.decode(ids, skip_special=True) == "xy"
    for bad in (100280, 100351, 100256, 100261, -1):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([15339, bad])
    # "😀" is two tokens; the first alone is an incomplete UTF-8 sequence.
    emoji = tok.encode("😀")
    assert emoji == [76460, 222] and tok.decode_bytes(emoji[:1]) == b"\xf0\x9f\x98"
    assert tok.decode(emoji[:1]) == "\ufffd"


def test_stream_decoder(tok):
    text = "Hi 😀👨‍👩‍👧 日本語 ok 🇫🇷!"
    ids = tok.encode(text)
    # Make sure the test exercises characters split across tokens.
    assert any(not _is_utf8(tok.decode_bytes([i])) for i in ids)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    # An emoji split across tokens yields nothing until complete; a truncated one becomes U+FFFD at flush.
    stream = StreamDecoder(tok)
    assert stream.push(76460) == ""
    assert stream.push(222) == "😀"
    assert stream.push(76460) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(15339) == "hello"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? <|im_end|>"},
]

EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4.<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3? <|im_end|><|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_chat_template_string(tok):
    assert tok.apply_chat_template(CONVERSATION) == EXPECTED
    assert (
        tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
        == EXPECTED[: -len("\n<|im_start|>assistant\n")]
    )
    # The system message is stripped, like DBRX Instruct's template does.
    padded = [{"role": "system", "content": "  You are a helpful assistant.\n"}] + CONVERSATION[1:]
    assert tok.apply_chat_template(padded) == EXPECTED


def test_default_system_prompt(tok):
    assert DEFAULT_SYSTEM_PROMPT.startswith(
        "You are DBRX, created by Databricks. You were last updated in December 2023."
    )
    assert DEFAULT_SYSTEM_PROMPT.endswith("UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY.")
    assert "code blocks \u2014 remember" in DEFAULT_SYSTEM_PROMPT
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        tok.apply_chat_template(msgs, system_prompt=None) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, system_prompt="Be terse.").startswith(
        "<|im_start|>system\nBe terse.<|im_end|>"
    )


@pytest.mark.parametrize(
    "messages, index",
    [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "1"),
        ([{"role": "user", "content": None}], "0"),
        ([{"role": "user", "content": "a"}, "hello"], "1"),
        ([{"content": "a"}], "0"),
    ],
)
def test_chat_validation(tok, messages, index):
    with pytest.raises(ValueError, match=f"message {index}"):
        tok.apply_chat_template(messages)


def test_lone_surrogate_never_raises(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    ids = tok.apply_chat_template([{"role": "user", "content": "x\udfffy"}], tokenize=True, system_prompt=None)
    assert tok.decode(ids) == "<|im_start|>user\nx\ufffdy<|im_end|>\n<|im_start|>assistant\n"


def test_chat_needs_a_turn(tok):
    with pytest.raises(ValueError):
        tok.apply_chat_template([])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_tokens(tok):
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True)
    S, E, enc = 100278, 100279, tok.encode
    expected = (
        [S, *enc("system\nYou are a helpful assistant."), E, *enc("\n")]
        + [S, *enc("user\nWhat is 2+2?"), E, *enc("\n")]
        + [S, *enc("assistant\n4."), E, *enc("\n")]
        + [S, *enc("user\nAnd 3+3? <|im_end|>"), E, *enc("\n")]
        + [S, *enc("assistant\n")]
    )
    assert ids == expected
    assert ids.count(E) == 4  # the user's "<|im_end|>" text is not the special id
    assert tok.decode(ids) == EXPECTED


def test_chat_tokens_match_rendered_string(tok):
    msgs = [
        {"role": "user", "content": "\n\nleading newlines and  spaces "},
        {"role": "assistant", "content": "  ok\n"},
        {"role": "user", "content": "日本語 😀"},
    ]
    rendered = tok.apply_chat_template(msgs)
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode(rendered, allow_special=True)


def test_assistant_mask(tok):
    ids, mask = tok.encode_chat(CONVERSATION, add_generation_prompt=True)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert len(mask) == len(ids)
    reply = [i for i, m in zip(ids, mask) if m]
    assert reply == tok.encode("4.") + [100279]
    # One contiguous span, starting right after "<|im_start|>assistant\n".
    first = mask.index(True)
    assert ids[first - 3 : first] == [100278, *tok.encode("assistant\n")]
    assert mask[first : first + len(reply)] == [True] * len(reply) and sum(mask) == len(reply)


def test_assistant_mask_multi(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there! 😀"},
        {"role": "user", "content": "<|im_end|> again"},
        {"role": "assistant", "content": ""},
    ]
    ids, mask = tok.encode_chat(msgs, add_generation_prompt=False, system_prompt=None)
    text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert text == "Hello there! 😀<|im_end|><|im_end|>"
    assert ids[-1] == 100279 and mask[-1]
    assert not any(m for i, m in zip(ids, mask) if i == 100278)
