"""Pre-training data: prepare (shards, index, idempotence, errors), reading, packing, mixing and resume."""

import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from dbrx.cli import prepare as prepare_cli
from dbrx.tokenizer import get_tokenizer
from dbrx.train import data
from dbrx.train.data import (
    EOS_ID,
    MixtureLoader,
    MixtureSchedule,
    PackedSequences,
    TokenDataset,
    prepare,
    shard_batch,
    split_documents,
)

TEXTS = ["Now is the winter of our discontent\nMade glorious summer.", "def f(x):\n    return x + 1\n"]
JSONL_DOCS = [f"record number {i}: " + "to be or not to be " * (i % 4) for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i, t in enumerate(TEXTS):
        (src / f"doc{i}.txt").write_text(t)
        paths.append(src / f"doc{i}.txt")
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(JSONL_DOCS)]
    lines.insert(3, "")  # blank lines are skipped
    (src / "more.jsonl").write_text("\n".join(lines) + "\n")
    paths.append(src / "more.jsonl")
    return paths


def expected_tokens(tok) -> np.ndarray:
    return np.array([t for d in TEXTS + JSONL_DOCS for t in tok.encode(d) + [EOS_ID]], dtype=np.uint32)


def shard_bytes(out) -> dict:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name.startswith("shard_")}


def test_prepare_parallel_chunked_output_identical(inputs, tmp_path, tok, monkeypatch):
    r1 = prepare(inputs, tmp_path / "a", workers=1, shard_tokens=40)
    monkeypatch.setattr(data, "CHUNK_BYTES", 100)  # the JSONL file becomes several work units
    assert len(data._units_for(inputs[2], "jsonl", "text", None)) > 2
    r2 = prepare(inputs, tmp_path / "b", workers=2, shard_tokens=40)
    assert r1["status"] == r2["status"] == "written"
    assert r1["shards"] == r2["shards"] and len(r1["shards"]) > 2
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert r1["documents"] == len(TEXTS) + len(JSONL_DOCS)
    assert [x["sha256"] for x in r1["inputs"]] == [data.sha256_file(p) for p in inputs]

    ds = TokenDataset(tmp_path / "a", verify=True)
    np.testing.assert_array_equal(ds.tokens(), expected_tokens(tok))
    assert ds.num_tokens == r1["tokens"] == len(expected_tokens(tok))
    for i, text in enumerate(TEXTS + JSONL_DOCS):
        doc = ds.document(i)
        assert doc[-1] == EOS_ID and EOS_ID not in doc[:-1]
        assert tok.decode(doc[:-1]) == text


def test_prepare_directory_split_and_special_text(tmp_path, tok):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("first work\n\n\n\nsecond work <|endoftext|>\n\n\n\n\n\nthird")
    (src / "empty.txt").write_text("  \n")
    r = prepare(src, tmp_path / "out", split=r"\n{4,}", workers=1)
    ds = TokenDataset(tmp_path / "out")
    assert ds.num_documents == 3 and r["empty_documents_skipped"] == 1
    assert tok.decode(ds.document(1)[:-1]) == "second work <|endoftext|>"  # special-token text stays plain text
    assert (ds.document(1) == EOS_ID).sum() == 1


def test_prepare_idempotent_and_rebuilds(inputs, tmp_path):
    out = tmp_path / "out"
    assert prepare(inputs, out, workers=1, shard_tokens=50)["status"] == "written"
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = prepare(inputs, out, workers=1, shard_tokens=50)
    assert again["status"] == "up to date"
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes

    shard = out / "shard_00001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:4] + bytes([good[4] ^ 1]) + good[5:])  # same size, one bit flipped
    TokenDataset(out)  # sizes still agree: only the checksum shows it
    with pytest.raises(ValueError, match="checksum mismatch .*shard_00001.bin"):
        TokenDataset(out, verify=True)
    assert prepare(inputs, out, workers=1, shard_tokens=50)["status"] == "written"
    assert shard.read_bytes() == good
    TokenDataset(out, verify=True)

    shard.write_bytes(good[:-4])  # truncated
    with pytest.raises(ValueError, match="shard_00001.bin"):
        TokenDataset(out)
    (out / "shard_00002.docs.npy").unlink()
    assert prepare(inputs, out, workers=1, shard_tokens=50)["status"] == "written"
    TokenDataset(out, verify=True)

    inputs[0].write_text("changed text")  # a changed input is noticed through its checksum
    n_before = len(list(out.iterdir()))
    r = prepare(inputs, out, workers=1, shard_tokens=10_000)
    assert r["status"] == "written" and len(r["shards"]) == 1
    assert len(list(out.iterdir())) < n_before  # stale shards of the earlier run are gone
    assert not list(out.glob(".*tmp"))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "ok"', "invalid JSON"),
        ('{"body": "no text field"}', "missing field 'text'"),
        ('{"text": 42}', "field 'text' is int, expected a string"),
        ("[1, 2]", "missing field 'text'"),
    ],
)
def test_prepare_jsonl_errors_name_file_and_line(tmp_path, monkeypatch, workers, line, match):
    monkeypatch.setattr(data, "CHUNK_BYTES", 64)  # the bad line lands in a later work unit
    lines = [json.dumps({"text": f"fine line {i}"}) for i in range(9)]
    lines[6] = line
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: line 7: {match}"):
        prepare([bad], tmp_path / "out", workers=workers)
    assert not (tmp_path / "out" / "index.json").exists()


def test_prepare_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        prepare([tmp_path / "nothere.txt"], tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out", workers=1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", workers=1)
    with pytest.raises(ValueError, match="format"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", fmt="csv")
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenDataset(tmp_path / "out2")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pyarrow"):
        prepare([tmp_path / "x.parquet"], tmp_path / "out", workers=1)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_rows_are_documents(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} text" for i in range(10)]
    pq.write_table(pa.table({"body": texts, "n": list(range(10))}), tmp_path / "t.parquet", row_group_size=3)
    prepare([tmp_path / "t.parquet"], tmp_path / "out", text_field="body", workers=2)
    ds = TokenDataset(tmp_path / "out")
    assert [tok.decode(ds.document(i)[:-1]) for i in range(len(ds))] == texts
    with pytest.raises(ValueError, match=r"t\.parquet.*no column 'text'"):
        prepare([tmp_path / "t.parquet"], tmp_path / "out2", workers=1)
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet: row 1"):
        prepare([tmp_path / "n.parquet"], tmp_path / "out3", workers=1)


def test_cli_prepare(inputs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prepare_cli.register(parser.add_subparsers())
    args = parser.parse_args(["prepare", *map(str, inputs), "--out", str(tmp_path / "cli"), "--workers", "1"])
    assert args.func(args) == 0
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "written" in out.out and "up to date" in out.out and "14 documents" in out.out
    assert "prepare:" in out.err


# ---- reading and packing ---------------------------------------------------------------------------------------
def make_dataset(path, lengths, start=1) -> TokenDataset:
    """A dataset written directly in the shard format: document i is `lengths[i] - 1` distinct tokens + EOS."""
    tokens, n = [], start
    for k in lengths:
        tokens += list(range(n, n + k - 1)) + [EOS_ID]
        n += k - 1
    path.mkdir(parents=True)
    arr = np.array(tokens, dtype=np.uint32)
    arr.tofile(path / "shard_00000.bin")
    np.save(path / "shard_00000.docs.npy", np.cumsum(lengths).astype(np.int64))
    shard = {"file": "shard_00000.bin", "docs_file": "shard_00000.docs.npy", "tokens": len(arr),
             "documents": len(lengths), "sha256": data.sha256_file(path / "shard_00000.bin"),
             "docs_sha256": data.sha256_file(path / "shard_00000.docs.npy")}
    index = {"version": 1, "settings": {}, "inputs": [], "documents": len(lengths), "tokens": len(arr),
             "shards": [shard]}
    (path / "index.json").write_text(json.dumps(index))
    return TokenDataset(path, verify=True)


LENGTHS = [5, 1, 12, 3, 30, 7, 2, 9]


def test_packing_reconstructs_stream_and_doc_ids(tmp_path):
    ds = make_dataset(tmp_path / "d", LENGTHS)
    T = 7
    ps = PackedSequences(ds, T, seed=3)
    windows = [ps.next() for _ in range(3 * sum(LENGTHS) // T)]  # about three epochs
    for (tokens, doc_ids), (nxt, _) in zip(windows, windows[1:]):
        assert tokens.shape == doc_ids.shape == (T + 1,)
        assert tokens[-1] == nxt[0]  # windows overlap by one token: every token is a target once
        step = np.diff(doc_ids)
        assert set(step.tolist()) <= {0, 1}
        np.testing.assert_array_equal(step == 1, tokens[:-1] == EOS_ID)  # a new id exactly after each EOS
        assert doc_ids[0] == 0
    stream = np.concatenate([t[:-1] for t, _ in windows])
    # each epoch is the documents in some order, and the orders differ between epochs
    E = sum(LENGTHS)
    orders = []
    for e in range(len(stream) // E):
        chunk = stream[e * E : (e + 1) * E]
        docs = np.split(chunk, np.flatnonzero(chunk == EOS_ID)[:-1] + 1)
        assert sorted(map(tuple, docs)) == sorted(tuple(ds.document(i)) for i in range(len(ds)))
        orders.append([int(d[0]) for d in docs])
    assert len(orders) >= 2 and orders[0] != orders[1]


def test_packing_deterministic_and_resume(tmp_path):
    ds = make_dataset(tmp_path / "d", LENGTHS)
    a, b, c = PackedSequences(ds, 6, seed=1), PackedSequences(ds, 6, seed=1), PackedSequences(ds, 6, seed=2)
    wa = [a.next()[0] for _ in range(20)]
    assert all(np.array_equal(x, b.next()[0]) for x in wa)
    assert not all(np.array_equal(x, c.next()[0]) for x in wa)
    state = json.loads(json.dumps(a.state_dict()))
    more = [a.next()[0] for _ in range(15)]
    d = PackedSequences(ds, 6, seed=1)
    d.load_state_dict(state)
    assert all(np.array_equal(x, d.next()[0]) for x in more)
    with pytest.raises(ValueError, match="seed"):
        PackedSequences(ds, 6, seed=9).load_state_dict(state)


def test_split_documents(tmp_path):
    train, val = split_documents(50, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 45 and not set(train) & set(val)
    ds = make_dataset(tmp_path / "d", LENGTHS)
    ps = PackedSequences(ds, 4, documents=[2, 4])
    seen = np.concatenate([ps.next()[0] for _ in range(20)])
    assert set(seen.tolist()) <= set(ds.document(2).tolist()) | set(ds.document(4).tolist())


# ---- mixing ----------------------------------------------------------------------------------------------------
SCHEDULE = [
    {"until": 0.8, "weights": {"text": 0.7, "code": 0.3}},
    {"until": 1.0, "weights": {"text": 0.3, "code": 0.7}},
]


def make_loader(tmp_path, total_steps=300, batch=16, seed=0) -> MixtureLoader:
    if not (tmp_path / "text").exists():
        make_dataset(tmp_path / "text", LENGTHS, start=1)
        make_dataset(tmp_path / "code", [4, 11, 6], start=50_000)
    streams = {"text": PackedSequences(TokenDataset(tmp_path / "text"), 8, seed=1),
               "code": PackedSequences(TokenDataset(tmp_path / "code"), 8, seed=2)}
    return MixtureLoader(streams, SCHEDULE, total_steps, batch, seed)


def test_mixture_follows_schedule(tmp_path):
    loader = make_loader(tmp_path)
    rows_code = []
    for step in range(300):
        b = loader.batch(step)
        assert b["input_ids"].shape == b["labels"].shape == b["doc_ids"].shape == (16, 8)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
        assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
        is_code = (b["input_ids"] >= 50_000) & (b["input_ids"] != EOS_ID)
        rows_code.append(int(is_code.any(1).sum()))  # rows of the code stream
        phase = 0 if step < 240 else 1
        in_phase = step + 1 - (0 if phase == 0 else 240)
        target = 16 * in_phase * (0.3 if phase == 0 else 0.7)
        assert abs(sum(rows_code[step + 1 - in_phase:]) - target) < 1  # never a whole row off the schedule
    # the phase switches at step 240 = 0.8 * 300; each step's counts are floor/ceil of weight * batch
    assert all(rows in (4, 5) for rows in rows_code[:240]) and all(rows in (11, 12) for rows in rows_code[240:])
    assert loader.schedule.boundaries(300) == [240, 300]
    for phase, (_, weights) in enumerate(loader.schedule.phases):
        realised = loader.realised(phase)
        assert all(abs(realised[n] - w) < 0.01 for n, w in weights.items()), (phase, realised)
    assert abs(np.mean(rows_code[:240]) / 16 - 0.3) < 0.01
    assert abs(loader.realised()["code"] - (0.3 * 240 + 0.7 * 60) / 300) < 0.01


def test_mixture_resume_and_determinism(tmp_path):
    loader = make_loader(tmp_path)
    for step in range(7):
        loader.batch(step)
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [loader.batch(step) for step in range(7, 12)]
    resumed = make_loader(tmp_path)
    resumed.load_state_dict(state)
    for step, expected in zip(range(7, 12), rest):
        got = resumed.batch(step)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.realised() == loader.realised()
    with pytest.raises(ValueError, match="out of order"):
        resumed.batch(3)
    other_seed = make_loader(tmp_path, seed=5)
    first = make_loader(tmp_path).batch(0)
    assert not torch.equal(other_seed.batch(0)["input_ids"], first["input_ids"])


def test_rank_shards_reassemble_global_batch(tmp_path):
    global_batch = make_loader(tmp_path, batch=8).batch(0)
    for world in (1, 2, 4):
        parts = []
        for rank in range(world):  # each rank runs its own loader, as in a multi-process job
            parts.append(make_loader(tmp_path, batch=8).shard(make_loader(tmp_path, batch=8).batch(0), rank, world))
        for k in global_batch:
            assert torch.equal(torch.cat([p[k] for p in parts]), global_batch[k])
    with pytest.raises(ValueError, match="divisible"):
        shard_batch(global_batch, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_batch(global_batch, 2, 2)


@pytest.mark.parametrize(
    "phases, match",
    [
        ([], "non-empty"),
        ([{"until": 0.5, "weights": {"a": 1}}, {"until": 0.5, "weights": {"a": 1}}], r"schedule\[1\]\.until"),
        ([{"until": 0.9, "weights": {"a": 1}}], r"schedule\[0\]\.until must be 1\.0"),
        ([{"until": 1.0, "weights": {"a": -1}}], r"schedule\[0\]\.weights\.a"),
        ([{"until": 1.0, "weights": {"a": 0, "b": 0}}], r"schedule\[0\]\.weights must have a positive sum"),
        ([{"until": 1.0, "weights": {"zzz": 1}}], r"schedule\[0\]\.weights\.zzz: unknown stream"),
        ([{"until": 1.0, "weights": {"a": 1}, "extra": 1}], r"schedule\[0\] has unknown keys"),
        ([{"until": 1.0, "weights": {"a": "x"}}], r"schedule\[0\]\.weights\.a"),
    ],
)
def test_schedule_validation(phases, match):
    with pytest.raises(ValueError, match=match):
        MixtureSchedule(phases, streams=["a", "b"])


def test_schedule_phases():
    s = MixtureSchedule(SCHEDULE)
    assert s.names == ["code", "text"]
    assert s.phase_at(0, 100) == 0 and s.phase_at(79, 100) == 0 and s.phase_at(80, 100) == 1
    assert s.weights_at(99, 100) == pytest.approx({"text": 0.3, "code": 0.7})
    assert MixtureSchedule({"a": 2, "b": 6}).weights_at(0, 10) == {"a": 0.25, "b": 0.75}


def test_prepared_shards_feed_the_loader(inputs, tmp_path, tok):
    prepare(inputs, tmp_path / "p", workers=1, shard_tokens=30)
    ds = TokenDataset(tmp_path / "p")
    loader = MixtureLoader({"all": PackedSequences(ds, 16, seed=0)}, {"all": 1.0}, 10, 4)
    b = loader.batch(0)
    assert torch.isin(b["input_ids"], torch.from_numpy(expected_tokens(tok).astype(np.int64))).all()
    assert os.path.getsize(tmp_path / "p" / "shard_00000.bin") % 4 == 0
