"""Fine-tuning data: JSONL parsing and errors, assistant-only labels, packing, determinism and resume."""

import json

import numpy as np
import pytest
import torch

from dbrx.tokenizer import get_tokenizer
from dbrx.train.sft import SFTLoader, load_chat_jsonl

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Red."}],
    [{"role": "user", "content": "Say <|im_end|> literally"}, {"role": "assistant", "content": "<|im_end|> ok"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there, friend!"}],
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_load_both_formats(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVS[0]}, "", {"prompt": "Hello", "response": "Hi"},
                                              {"system": "S", "prompt": "p", "response": "r"}])
    convs = load_chat_jsonl(p)
    assert convs[0] == CONVS[0]
    assert convs[1] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    assert [m["role"] for m in convs[2]] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"messages": [', "invalid JSON"),
        ('{"text": "hi"}', "expected a 'messages' list or 'prompt' and 'response'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\]\.role"),
        ('{"messages": [{"role": "user", "content": 3}]}', r"messages\[0\]\.content must be a string"),
        ('{"messages": ["hi"]}', r"messages\[0\] must be a mapping .*; message 0 is a str"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
        ('{"prompt": "p", "response": 5}', "field 'response' must be a string"),
        ('["a"]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, match):
    p = write_jsonl(tmp_path / "ft.jsonl", [{"messages": CONVS[0]}, {"messages": CONVS[1]}, bad])
    with pytest.raises(ValueError, match=rf"ft\.jsonl: line 3: {match}"):
        load_chat_jsonl(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        SFTLoader.from_files(tmp_path / "nope.jsonl", 64, 2)


def test_labels_only_on_assistant_replies(tok):
    loader = SFTLoader(CONVS, seq_len=512, global_batch=1, seed=0, system_prompt=None)
    for conv_idx, conv in enumerate(CONVS):
        tokens, labels, doc_ids = loader.window([conv_idx])
        targets = [int(t) for t in labels if t != -100]
        replies = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert tok.decode(targets) == replies
        # every position whose target is not an assistant token carries no loss: prompts, template, padding
        n = len(loader.ids[conv_idx])
        assert (labels[n - 1 :] == -100).all() and (doc_ids[n:] == 1).all()
        assert (tokens[n:] == tok.pad_id).all()
        prompt_text = tok.decode(tokens[: np.flatnonzero(labels != -100)[0] + 1])
        assert prompt_text.endswith("assistant\n") and conv[0]["content"] in prompt_text


def test_user_special_token_text_is_plain(tok):
    loader = SFTLoader([CONVS[2]], seq_len=128, global_batch=1, system_prompt=None)
    ids = loader.ids[0]
    assert (ids == tok.im_end_id).sum() == 2  # only the template's two closing tokens
    assert (ids == tok.im_start_id).sum() == 2
    labels = loader.window([0])[1]
    assert tok.decode([t for t in labels if t != -100]) == "<|im_end|> ok<|im_end|>"


def test_default_system_prompt_is_rendered(tok):
    with_default = SFTLoader([CONVS[0]], seq_len=2048, global_batch=1)
    without = SFTLoader([CONVS[0]], seq_len=2048, global_batch=1, system_prompt=None)
    assert len(with_default.ids[0]) > len(without.ids[0]) + 100
    assert "You are DBRX" in tok.decode(with_default.ids[0])


def test_packing_batches_and_epochs():
    seq_len = 48
    loader = SFTLoader(CONVS * 3, seq_len=seq_len, global_batch=2, seed=4, system_prompt=None)
    packs = loader.packs(0)
    assert sorted(i for p in packs for i in p) == list(range(12))  # each conversation once per epoch
    assert all(sum(len(loader.ids[i]) for i in p) <= seq_len + 1 for p in packs)
    assert any(len(p) > 1 for p in packs)
    assert loader.packs(1) != packs
    n_windows = 0
    while loader.epoch == 0:
        b = loader.batch()
        assert b["input_ids"].shape == b["labels"].shape == b["doc_ids"].shape == (2, seq_len)
        assert b["labels"].dtype == torch.int64
        d = b["doc_ids"]
        assert ((d[:, 1:] - d[:, :-1]) >= 0).all()
        n_windows += 2
    assert n_windows >= len(packs)


def test_truncation_warns():
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    with pytest.warns(UserWarning, match="1 of 2 conversations .* truncated"):
        loader = SFTLoader([long, CONVS[0]], seq_len=32, global_batch=1, system_prompt=None)
    assert loader.truncated == 1 and len(loader.ids[0]) == 33


def test_determinism_resume_and_shard(tmp_path):
    p = write_jsonl(tmp_path / "ft.jsonl", [{"messages": c} for c in CONVS * 4])
    a = SFTLoader.from_files(p, seq_len=40, global_batch=4, seed=1, system_prompt=None)
    b = SFTLoader.from_files([p], seq_len=40, global_batch=4, seed=1, system_prompt=None)
    for step in range(3):
        x, y = a.batch(step), b.batch(step)
        assert all(torch.equal(x[k], y[k]) for k in x)
    state = json.loads(json.dumps(a.state_dict()))
    rest = [a.batch(step) for step in range(3, 9)]
    c = SFTLoader.from_files(p, seq_len=40, global_batch=4, seed=1, system_prompt=None)
    c.load_state_dict(state)
    for step, expected in zip(range(3, 9), rest):
        got = c.batch(step)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    halves = [c.shard(rest[0], r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h["labels"] for h in halves]), rest[0]["labels"])
    other = SFTLoader.from_files(p, seq_len=40, global_batch=4, seed=2, system_prompt=None)
    assert not torch.equal(other.batch(0)["input_ids"], SFTLoader.from_files(
        p, seq_len=40, global_batch=4, seed=1, system_prompt=None).batch(0)["input_ids"])
