"""Pre-training data: tokenised shards on disk, packed sequences with document ids, and curriculum mixing.

Pipeline:

* ``prepare(inputs, out_dir)`` (the ``dbrx prepare`` verb) tokenises text files, JSONL or Parquet in parallel into
  ``shard_NNNNN.bin`` files (uint32 tokens, every document followed by EOS 100257), ``shard_NNNNN.docs.npy``
  (int64 end offset of each document in its shard) and ``index.json`` (counts, settings and sha256 checksums of
  the inputs and shards). The index is written last; a re-run with unchanged inputs does nothing.
* ``TokenDataset(dir)`` memory-maps the shards; ``PackedSequences`` cuts a seeded shuffle of the documents into
  windows of ``seq_len + 1`` tokens with per-document ids; ``MixtureLoader`` draws global batches from several such
  streams following a ``MixtureSchedule`` (curriculum), with exact resume through ``state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dbrx import fsutil
from dbrx.tokens import EOS_ID

__all__ = [
    "EOS_ID",
    "MixtureLoader",
    "MixtureSchedule",
    "PackedSequences",
    "TokenDataset",
    "prepare",
    "shard_batch",
    "split_documents",
]

INDEX_NAME = "index.json"
INDEX_VERSION = 1
FORMATS = ("auto", "text", "jsonl", "parquet")
DEFAULT_SHARD_TOKENS = 100_000_000  # 400 MB per shard
CHUNK_BYTES = 16 << 20  # JSONL files larger than this are split (at line ends) into several work units
_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet"}
_SHARD_RE = re.compile(r"^shard_\d{5}\.(bin|docs\.npy)$")


# ---------------------------------------------------------------------------------------------------------------
# prepare: inputs -> shards
# ---------------------------------------------------------------------------------------------------------------
class _Unit(NamedTuple):
    """One piece of work for a tokeniser process: a byte range of a file (or a Parquet row group)."""

    path: str
    fmt: str
    start: int  # byte offset (jsonl), row group (parquet), 0 (text)
    end: int  # byte end (jsonl/text), -1 (parquet)
    text_field: str
    split: str | None
    size: int  # bytes, for progress


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expand_inputs(inputs: Sequence[str | os.PathLike], fmt: str) -> list[Path]:
    """Input files in order; a directory stands for its files (recursively, sorted) of known suffixes."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare needs at least one input file")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and (fmt != "auto" or f.suffix in _SUFFIXES))
            if not found:
                raise ValueError(f"no input files found in directory {p}")
            files += found
        else:
            files.append(p)
    return files


def _format_of(path: Path, fmt: str) -> str:
    return fmt if fmt != "auto" else _SUFFIXES.get(path.suffix.lower(), "text")


def _units_for(path: Path, fmt: str, text_field: str, split: str | None) -> list[_Unit]:
    size = path.stat().st_size
    if fmt == "parquet":
        pq = _pyarrow_parquet()
        try:
            n_groups = pq.ParquetFile(path).num_row_groups
        except Exception as e:  # pyarrow raises several types for a bad file
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        return [_Unit(str(path), fmt, g, -1, text_field, None, size // max(n_groups, 1)) for g in range(n_groups)]
    if fmt == "jsonl":
        bounds = [0]
        with open(path, "rb") as f:
            while bounds[-1] + CHUNK_BYTES < size:
                f.seek(bounds[-1] + CHUNK_BYTES)
                f.readline()  # move to the start of the next line
                if f.tell() >= size:
                    break
                bounds.append(f.tell())
        bounds.append(size)
        return [_Unit(str(path), fmt, a, b, text_field, None, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    return [_Unit(str(path), fmt, 0, size, text_field, split, size)]


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow: `pip install pyarrow`") from None
    return pq


def _read_unit(unit: _Unit) -> list[str] | tuple[int, str]:
    """Documents of one unit, or ``(line or row within the unit, message)`` for a malformed record."""
    path = Path(unit.path)
    if unit.fmt == "parquet":
        pq = _pyarrow_parquet()
        pf = pq.ParquetFile(path)
        if unit.text_field not in pf.schema_arrow.names:
            return 0, f"no column {unit.text_field!r} (columns: {pf.schema_arrow.names})"
        column = pf.read_row_group(unit.start, columns=[unit.text_field]).column(0).to_pylist()
        first_row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
        for i, value in enumerate(column):
            if not isinstance(value, str):
                return first_row + i, f"column {unit.text_field!r} is {type(value).__name__}, expected a string"
        return column
    try:
        with open(path, "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.end - unit.start)
    except OSError as e:
        return 0, f"cannot read file ({e.strerror or e})"
    if unit.fmt == "text":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return 0, f"not valid UTF-8 (byte {e.start})"
        return re.split(unit.split, text) if unit.split else [text]
    docs = []
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return i, f"invalid JSON ({e})"
        if not isinstance(record, dict) or unit.text_field not in record:
            return i, f"missing field {unit.text_field!r}"
        if not isinstance(record[unit.text_field], str):
            return i, f"field {unit.text_field!r} is {type(record[unit.text_field]).__name__}, expected a string"
        docs.append(record[unit.text_field])
    return docs


def _tokenize_unit(unit: _Unit) -> tuple:
    """Worker: ``("ok", tokens uint32, doc_lengths int64, n_empty)`` or ``("error", position, message)``."""
    from dbrx.tokenizer import get_tokenizer

    docs = _read_unit(unit)
    if isinstance(docs, tuple):
        return ("error", *docs)
    kept = [d for d in docs if d.strip()]
    ids = get_tokenizer().encode_batch(kept) if kept else []
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for x in ids:
        tokens[pos : pos + len(x)] = x
        tokens[pos + len(x)] = EOS_ID
        pos += len(x) + 1
    return "ok", tokens, lengths, len(docs) - len(kept)


def _raise_unit_error(unit: _Unit, where: int, message: str) -> None:
    if unit.fmt == "jsonl":  # `where` is the line within the unit: count the lines before it
        with open(unit.path, "rb") as f:
            before = f.read(unit.start).count(b"\n")
        raise ValueError(f"{unit.path}: line {before + where + 1}: {message}")
    if unit.fmt == "parquet":
        raise ValueError(f"{unit.path}: row {where}: {message}")
    raise ValueError(f"{unit.path}: {message}")


class _ShardWriter:
    """Writes shards one after another into `out_dir` (prepare's private temporary directory)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.shards: list[dict] = []
        self.file = None  # the shard being written, opened by the first add
        self.n = 0  # tokens in it

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self.file is None:
            self.name = f"shard_{len(self.shards):05d}"
            self.file = open(self.out_dir / f"{self.name}.bin", "wb")
            self.hash = hashlib.sha256()
            self.ends: list[np.ndarray] = []
        data = tokens.astype("<u4", copy=False).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.ends.append(self.n + np.cumsum(lengths))
        self.n += int(lengths.sum())

    def flush(self) -> None:
        """Finish the current shard (if any): close it and write its document offsets."""
        if self.file is None:
            return
        self.close()
        ends = np.concatenate(self.ends).astype(np.int64)
        docs = self.out_dir / f"{self.name}.docs.npy"
        with open(docs, "wb") as f:
            np.save(f, ends, allow_pickle=False)
        self.shards.append({
            "file": f"{self.name}.bin",
            "docs_file": docs.name,
            "tokens": self.n,
            "documents": len(ends),
            "sha256": self.hash.hexdigest(),
            "docs_sha256": sha256_file(docs),
        })
        self.n = 0

    def close(self) -> None:
        """Close the open shard file without finishing it (after an error, its directory is discarded)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _tokenizer_id() -> str:
    from dbrx.tokenizer import BPE_SHA256

    return f"cl100k_base+dbrx:{BPE_SHA256[:16]}"


def _up_to_date(out_dir: Path, inputs: list[dict], settings: dict) -> dict | None:
    """The existing index if it matches the inputs and settings and every shard checks out, else None."""
    try:
        index = json.loads((out_dir / INDEX_NAME).read_text())
        if index.get("version") != INDEX_VERSION or index["inputs"] != inputs or index["settings"] != settings:
            return None
        for s in index["shards"]:
            for name, digest in ((s["file"], s["sha256"]), (s["docs_file"], s["docs_sha256"])):
                if not (out_dir / name).is_file() or sha256_file(out_dir / name) != digest:
                    return None
            if (out_dir / s["file"]).stat().st_size != 4 * s["tokens"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index


def prepare(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    split: str | None = None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict:
    """Tokenise ``inputs`` into shards in ``out_dir``; return the index plus ``status`` ("written" / "up to date").

    Documents: a text file is one document (or several: the pieces between matches of the regex ``split``, e.g.
    ``r"\\n{4,}"``), a JSONL line is one (its ``text_field``), a Parquet row is one (column ``text_field``). Empty
    documents are skipped. Output order depends only on the inputs, never on ``workers`` (default: all CPUs).
    ``progress(done_bytes, total_bytes, tokens)`` is called as work units finish.

    Everything is written into a private temporary directory that replaces ``out_dir`` whole when complete: a
    failure leaves ``out_dir`` as it was. A second ``prepare`` into the same ``out_dir`` meanwhile gets a
    ``LockedError`` (a ValueError) naming this process.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if split is not None:
        try:
            re.compile(split)
        except re.error as e:
            raise ValueError(f"split is not a valid regular expression: {split!r} ({e})") from None
    out = Path(out_dir)
    files = _expand_inputs(inputs, fmt)
    records = []
    for f in files:
        try:
            records.append({"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": sha256_file(f)})
        except PermissionError:
            raise ValueError(f"{f}: cannot read input (permission denied)") from None
        except IsADirectoryError:
            raise ValueError(f"{f}: is a directory") from None
    settings = {"format": fmt, "text_field": text_field, "split": split, "shard_tokens": shard_tokens,
                "tokenizer": _tokenizer_id(), "eos_id": EOS_ID, "dtype": "uint32"}
    # one writer at a time (a second gets LockedError naming the first); readers take no lock: they see the old
    # directory or the new one, which appears complete in one rename
    with fsutil.lock_dir(out, f"prepared data {out}"):
        if out.is_dir() and (index := _up_to_date(out, records, settings)) is not None:
            return {**index, "status": "up to date", "out_dir": str(out)}
        entries = list(out.iterdir()) if out.is_dir() else []
        if entries and not any(p.name == INDEX_NAME or _SHARD_RE.match(p.name) for p in entries):
            raise ValueError(f"{out} is not empty and holds no prepared data (no {INDEX_NAME}, no shards); "
                             f"refusing to replace it: choose another output directory")
        units = [u for f in files for u in _units_for(f, _format_of(f, fmt), text_field, split)]
        with fsutil.atomic_dir(out) as tmp:
            index = _write_shards(units, files, tmp, records, settings, workers, shard_tokens, progress)
    return {**index, "status": "written", "out_dir": str(out)}


def _write_shards(units: list[_Unit], files: list[Path], out: Path, records: list[dict], settings: dict,
                  workers: int | None, shard_tokens: int, progress: Callable[[int, int, int], None] | None) -> dict:
    """Tokenise `units` into shards and the index in the (empty, private) directory `out`; returns the index."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(units)))
    writer = _ShardWriter(out)
    done_bytes = total_tokens = n_empty = 0
    total_bytes = sum(u.size for u in units)
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_tokenize_unit, units) if pool else map(_tokenize_unit, units)
        for unit, result in zip(units, results):
            if result[0] == "error":
                _raise_unit_error(unit, result[1], result[2])
            _, tokens, lengths, empty = result
            _append_documents(writer, tokens, lengths, shard_tokens)
            done_bytes += unit.size
            total_tokens += len(tokens)
            n_empty += empty
            if progress:
                progress(done_bytes, total_bytes, total_tokens)
        writer.flush()
    finally:
        if pool:
            pool.terminate()
        writer.close()
    if not writer.shards:
        raise ValueError(f"the inputs hold no non-empty documents: {[str(f) for f in files]}")
    index = {
        "version": INDEX_VERSION,
        "settings": settings,
        "inputs": records,
        "documents": sum(s["documents"] for s in writer.shards),
        "tokens": sum(s["tokens"] for s in writer.shards),
        "empty_documents_skipped": n_empty,
        "shards": writer.shards,
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index


def _append_documents(writer: _ShardWriter, tokens: np.ndarray, lengths: np.ndarray, shard_tokens: int) -> None:
    """Add whole documents to the writer, starting a new shard when one is full."""
    ends = np.cumsum(lengths)
    i = 0
    while i < len(lengths):
        base = int(ends[i - 1]) if i else 0
        fit = int(np.searchsorted(ends[i:] - base, shard_tokens - writer.n, side="right"))
        if fit == 0:
            if writer.n:
                writer.flush()
                continue
            fit = 1  # a document longer than a shard gets a shard of its own
        writer.add(tokens[base : int(ends[i + fit - 1])], lengths[i : i + fit])
        i += fit
        if writer.n >= shard_tokens:
            writer.flush()


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
class TokenDataset:
    """Memory-mapped shards written by :func:`prepare`; documents include their trailing EOS."""

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found; create it with `dbrx prepare INPUT... --out {path}`")
        try:
            self.index = json.loads(index_path.read_text())
            shards = self.index["shards"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index_path}: not a valid index ({e})") from None
        if self.index.get("version") != INDEX_VERSION:
            raise ValueError(f"{index_path}: unsupported index version {self.index.get('version')!r}")
        if not shards:
            raise ValueError(f"{index_path}: the dataset holds no documents")
        self._tokens: list[np.ndarray] = []
        doc_shard, doc_start, doc_len = [], [], []
        for k, s in enumerate(shards):
            bin_path, docs_path = self.path / s["file"], self.path / s["docs_file"]
            for p in (bin_path, docs_path):
                if not p.is_file():
                    raise FileNotFoundError(f"shard file {p} is missing; re-run `dbrx prepare`")
            if bin_path.stat().st_size != 4 * s["tokens"]:
                raise ValueError(f"shard {bin_path} has {bin_path.stat().st_size} bytes, index says "
                                 f"{s['tokens']} tokens; re-run `dbrx prepare`")
            ends = np.load(docs_path, allow_pickle=False)
            if len(ends) != s["documents"] or int(ends[-1]) != s["tokens"] or np.any(np.diff(ends) <= 0):
                raise ValueError(f"document offsets {docs_path} do not match the index; re-run `dbrx prepare`")
            self._tokens.append(np.memmap(bin_path, dtype="<u4", mode="r", shape=(s["tokens"],)))
            starts = np.concatenate([[0], ends[:-1]])
            doc_shard.append(np.full(len(ends), k, dtype=np.int64))
            doc_start.append(starts)
            doc_len.append(ends - starts)
        self.doc_shard = np.concatenate(doc_shard)
        self.doc_start = np.concatenate(doc_start).astype(np.int64)
        self.doc_lengths = np.concatenate(doc_len).astype(np.int64)
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard against the sha256 in the index (reads all data); ValueError naming a bad shard."""
        for s in self.index["shards"]:
            for name, digest in ((s["file"], s["sha256"]), (s["docs_file"], s["docs_sha256"])):
                if sha256_file(self.path / name) != digest:
                    raise ValueError(f"checksum mismatch for {self.path / name}; re-run `dbrx prepare`")

    @property
    def num_documents(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a read-only uint32 view ending with EOS)."""
        start = self.doc_start[i]
        return self._tokens[self.doc_shard[i]][start : start + self.doc_lengths[i]]

    def tokens(self) -> np.ndarray:
        """All tokens in file order (a copy; for tests and small data)."""
        return np.concatenate([np.asarray(t) for t in self._tokens])


def split_documents(n_documents: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of document indices into (train, validation); validation gets at least one when asked for."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng([seed, 0x5E1]).permutation(n_documents)
    n_val = max(1, round(val_fraction * n_documents)) if val_fraction > 0 else 0
    if n_val >= n_documents:
        raise ValueError(f"cannot hold out {n_val} of {n_documents} documents for validation")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class PackedSequences:
    """Endless stream of windows of ``seq_len + 1`` tokens over a seeded shuffle of documents (new order each epoch).

    Documents (each ending with EOS) are concatenated and cut every ``seq_len`` tokens; window ``k`` covers tokens
    ``[k * seq_len, k * seq_len + seq_len + 1)`` so that its last token is the next window's first and every token
    is a target exactly once. ``next()`` returns ``(tokens, doc_ids)``, both int64 of length ``seq_len + 1``;
    doc ids count documents within the window (0, 1, ...) and change right after each EOS.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, seed: int = 0, documents: Sequence[int] | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.dataset, self.seq_len, self.seed = dataset, int(seq_len), int(seed)
        docs = np.arange(dataset.num_documents) if documents is None else np.asarray(documents, dtype=np.int64)
        if docs.size == 0:
            raise ValueError("PackedSequences needs at least one document")
        if docs.min() < 0 or docs.max() >= dataset.num_documents:
            raise ValueError(f"document indices must be in [0, {dataset.num_documents})")
        self.documents = docs
        self.lengths = dataset.doc_lengths[docs]
        self.epoch_tokens = int(self.lengths.sum())
        self.position = 0  # tokens consumed since the start of epoch 0
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document indices in this epoch's order, cumulative end offsets)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            perm = np.random.default_rng([self.seed, epoch, 0xDA7A]).permutation(len(self.documents))
            self._orders[epoch] = (self.documents[perm], np.cumsum(self.lengths[perm]))
        return self._orders[epoch]

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.seq_len + 1
        tokens = np.empty(n, dtype=np.int64)
        doc_ids = np.empty(n, dtype=np.int64)
        epoch, cursor = divmod(self.position, self.epoch_tokens)
        filled = seg = 0
        while filled < n:
            docs, ends = self._order(epoch)
            i = int(np.searchsorted(ends, cursor, side="right"))
            offset = cursor - (int(ends[i - 1]) if i else 0)
            piece = self.dataset.document(int(docs[i]))[offset : offset + n - filled]
            tokens[filled : filled + len(piece)] = piece
            doc_ids[filled : filled + len(piece)] = seg
            filled, cursor, seg = filled + len(piece), cursor + len(piece), seg + 1
            if cursor == self.epoch_tokens:
                epoch, cursor = epoch + 1, 0
        self.position += self.seq_len
        return tokens, doc_ids

    def __iter__(self):
        while True:
            yield self.next()

    @property
    def epoch(self) -> int:
        return self.position // self.epoch_tokens

    def state_dict(self) -> dict:
        epoch, cursor = divmod(self.position, self.epoch_tokens)
        return {"epoch": epoch, "cursor": cursor, "seed": self.seed, "epoch_tokens": self.epoch_tokens}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state.get("epoch_tokens"), state.get("seed")) != (self.epoch_tokens, self.seed):
            raise ValueError("data state was saved for a different dataset or seed; cannot resume exactly")
        self.position = int(state["epoch"]) * self.epoch_tokens + int(state["cursor"])


# ---------------------------------------------------------------------------------------------------------------
# mixing and curriculum
# ---------------------------------------------------------------------------------------------------------------
class MixtureSchedule:
    """Stream weights by phase; ``until`` is the fraction of total steps where a phase ends (last: 1.0).

    ``MixtureSchedule([{"until": 0.8, "weights": {"text": 0.7, "code": 0.3}},
                       {"until": 1.0, "weights": {"text": 0.3, "code": 0.7}}])``; a plain ``{name: weight}`` mapping
    means one phase. Step ``s`` of ``N`` is in the first phase with ``s < round(until * N)``.
    """

    def __init__(self, phases: Sequence[Mapping[str, Any]] | Mapping[str, float], streams: Sequence[str] | None = None):
        if isinstance(phases, Mapping):
            phases = [{"until": 1.0, "weights": phases}]
        if isinstance(phases, (str, bytes)) or not isinstance(phases, Sequence) or not phases:
            raise ValueError("schedule must be a non-empty list of {'until': fraction, 'weights': {...}} phases")
        self.phases: list[tuple[float, dict[str, float]]] = []
        prev = 0.0
        for i, phase in enumerate(phases):
            where = f"schedule[{i}]"
            if not isinstance(phase, Mapping):
                raise ValueError(f"{where} must be a mapping with 'until' and 'weights'")
            if unknown := set(phase) - {"until", "weights"}:
                raise ValueError(f"{where} has unknown keys {sorted(unknown)}; expected 'until' and 'weights'")
            until = phase.get("until")
            if isinstance(until, bool) or not isinstance(until, (int, float)) or not prev < until <= 1.0:
                raise ValueError(f"{where}.until must be a number in ({prev}, 1.0] greater than the previous phase's, "
                                 f"got {until!r}")
            weights = phase.get("weights")
            if not isinstance(weights, Mapping) or not weights:
                raise ValueError(f"{where}.weights must be a non-empty mapping of stream name to weight")
            for name, w in weights.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ValueError(f"{where}.weights.{name} must be a non-negative number, got {w!r}")
                if streams is not None and name not in streams:
                    raise ValueError(f"{where}.weights.{name}: unknown stream {name!r}; known: {sorted(streams)}")
            total = float(sum(weights.values()))
            if total <= 0:
                raise ValueError(f"{where}.weights must have a positive sum")
            self.phases.append((float(until), {k: float(v) / total for k, v in weights.items()}))
            prev = until
        if abs(prev - 1.0) > 1e-9:
            raise ValueError(f"schedule[{len(phases) - 1}].until must be 1.0 (the end of training), got {prev}")
        self.names = list(streams) if streams is not None else sorted({n for _, w in self.phases for n in w})

    def boundaries(self, total_steps: int) -> list[int]:
        """First step after each phase."""
        return [round(until * total_steps) for until, _ in self.phases]

    def phase_at(self, step: int, total_steps: int) -> int:
        for i, end in enumerate(self.boundaries(total_steps)):
            if step < end:
                return i
        return len(self.phases) - 1

    def weights_at(self, step: int, total_steps: int) -> dict[str, float]:
        """Normalised weights at ``step`` (every stream name present, zero when absent from the phase)."""
        w = self.phases[self.phase_at(step, total_steps)][1]
        return {n: w.get(n, 0.0) for n in self.names}


def shard_batch(batch: Mapping[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rows of the global batch that belong to ``rank`` of ``world`` (contiguous, equal slices)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    B = len(next(iter(batch.values())))
    if B % world:
        raise ValueError(f"global batch {B} is not divisible by world size {world}")
    per = B // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def _to_batch(tokens: np.ndarray, doc_ids: np.ndarray, labels: np.ndarray | None = None,
              real: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """(B, T+1) windows -> input_ids, labels (next tokens), doc_ids, each (B, T) int64; with `real` (B, T+1) bool
    (False on padding) also attention_mask (B, T) int64."""
    out = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:] if labels is None else labels)),
        "doc_ids": torch.from_numpy(np.ascontiguousarray(doc_ids[:, :-1])),
    }
    if real is not None:
        out["attention_mask"] = torch.from_numpy(np.ascontiguousarray(real[:, :-1]).astype(np.int64))
    return out


class MixtureLoader:
    """Global batches drawn from several streams following a :class:`MixtureSchedule`.

    At each step the phase's weights are apportioned over the ``global_batch`` rows (see ``allocation``): every
    stream's count is the floor or ceiling of ``w * B``, and its running total within the phase stays within one
    row of ``w * B * steps``, so the realised mix follows the schedule exactly up to one row. Rows are then
    shuffled (seeded by ``(seed, step)``), and each takes the next window of its stream. ``batch(step)`` must be
    called for consecutive steps (resume with ``load_state_dict``).
    """

    def __init__(
        self,
        streams: Mapping[str, PackedSequences],
        schedule: MixtureSchedule | Sequence[Mapping[str, Any]] | Mapping[str, float],
        total_steps: int,
        global_batch: int,
        seed: int = 0,
    ) -> None:
        if not streams:
            raise ValueError("MixtureLoader needs at least one stream")
        if len({s.seq_len for s in streams.values()}) != 1:
            lens = {k: s.seq_len for k, s in streams.items()}
            raise ValueError(f"all streams must have the same seq_len, got {lens}")
        if total_steps < 1 or global_batch < 1:
            raise ValueError(f"total_steps and global_batch must be positive, got {total_steps}, {global_batch}")
        self.streams = dict(streams)
        self.names = list(self.streams)
        if not isinstance(schedule, MixtureSchedule):
            schedule = MixtureSchedule(schedule, self.names)
        for _, w in schedule.phases:
            if unknown := set(w) - set(self.names):
                raise ValueError(f"schedule names unknown streams {sorted(unknown)}; known: {self.names}")
        self.schedule, self.total_steps, self.global_batch, self.seed = schedule, total_steps, global_batch, seed
        self.seq_len = next(iter(self.streams.values())).seq_len
        self.step = 0
        self.counts = np.zeros((len(schedule.phases), len(self.names)), dtype=np.int64)  # rows per phase, stream

    def allocation(self, step: int) -> np.ndarray:
        """Stream index of each row of the global batch at ``step`` (deterministic in seed, step and position).

        Each stream first gets ``floor(w * B)`` rows; the remaining rows go to the streams furthest behind their
        target for the phase so far (``w * B * steps in phase``), so a stream's realised count never drifts from
        its target by a row or more over the phase.
        """
        p = self.schedule.phase_at(step, self.total_steps)
        w = np.array([self.schedule.phases[p][1].get(n, 0.0) for n in self.names])
        start = 0 if p == 0 else self.schedule.boundaries(self.total_steps)[p - 1]
        counts = np.floor(self.global_batch * w).astype(np.int64)
        target = self.global_batch * (step - start + 1) * w  # rows each stream should have after this step
        behind = np.where(w > 0, target - (self.counts[p] + counts), -np.inf)
        extra = self.global_batch - int(counts.sum())
        counts[np.argsort(-behind, kind="stable")[:extra]] += 1
        assert counts.sum() == self.global_batch and counts.min() >= 0
        rows = np.repeat(np.arange(len(self.names)), counts)
        np.random.default_rng([self.seed, step, 0x313]).shuffle(rows)
        return rows

    def batch(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """Global batch for ``step``: input_ids, labels, doc_ids, each (global_batch, seq_len) int64."""
        step = self.step if step is None else step
        if step != self.step:
            raise ValueError(f"batch({step}) called out of order: the next step is {self.step} "
                             "(restore a saved position with load_state_dict)")
        rows = self.allocation(step)
        tokens = np.empty((self.global_batch, self.seq_len + 1), dtype=np.int64)
        doc_ids = np.empty_like(tokens)
        for r, s in enumerate(rows):
            tokens[r], doc_ids[r] = self.streams[self.names[s]].next()
        np.add.at(self.counts[self.schedule.phase_at(step, self.total_steps)], rows, 1)
        self.step = step + 1
        return _to_batch(tokens, doc_ids)

    shard = staticmethod(shard_batch)

    def realised(self, phase: int | None = None) -> dict[str, float]:
        """Share of rows drawn from each stream so far (overall, or within one phase)."""
        counts = self.counts.sum(0) if phase is None else self.counts[phase]
        total = max(int(counts.sum()), 1)
        return {n: int(c) / total for n, c in zip(self.names, counts)}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "streams": {n: s.state_dict() for n, s in self.streams.items()},
            "counts": self.counts.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["streams"]) != set(self.names):
            raise ValueError(f"data state has streams {sorted(state['streams'])}, this run has {sorted(self.names)}")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        for n, s in self.streams.items():
            s.load_state_dict(state["streams"][n])
        self.step = int(state["step"])
        counts = np.asarray(state.get("counts", np.zeros_like(self.counts)), dtype=np.int64)
        if counts.shape == self.counts.shape:
            self.counts = counts
