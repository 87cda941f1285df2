"""Fine-tuning data: chat or prompt/response JSONL, rendered with DBRX's chat template, packed with document ids.

Each line of a JSONL file is one conversation, either ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
``{"prompt": ..., "response": ...}`` (optionally with ``"system"``), which becomes a user turn and an assistant turn.
Conversations are tokenised with :meth:`dbrx.tokenizer.Tokenizer.encode_chat`; only assistant replies (content and
their closing ``<|im_end|>``) carry labels. Whole conversations are packed greedily, in a seeded order that changes
each epoch, into windows of ``seq_len + 1`` tokens; the rest of a window is padding without loss.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbrx.tokenizer import DEFAULT_SYSTEM_PROMPT, Tokenizer, check_messages, get_tokenizer
from dbrx.train.data import _to_batch, shard_batch

__all__ = ["SFTLoader", "load_chat_jsonl"]

IGNORE = -100


def _parse_record(record: Any) -> list[dict[str, str]]:
    """Messages of one JSONL record; ValueError with a message (no location) when malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        check_messages(messages)
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"field {key!r} must be a string, got {type(record.get(key)).__name__}")
        out = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if "system" in record:
            if not isinstance(record["system"], str):
                raise ValueError(f"field 'system' must be a string, got {type(record['system']).__name__}")
            out.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ValueError("expected a 'messages' list or 'prompt' and 'response' fields")
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message (nothing to learn from)")
    return out


def load_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations in a chat or prompt/response JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning data not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e.strerror or e})") from None
    conversations = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno}: invalid JSON ({e})") from None
        try:
            conversations.append(_parse_record(record))
        except ValueError as e:
            raise ValueError(f"{path}: line {lineno}: {e}") from None
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


class SFTLoader:
    """Global batches of packed conversations: input_ids, labels (-100 off assistant replies), doc_ids and
    attention_mask (0 on the padding that ends a window: never a target, never routed into the statistics).

    Same interface as :class:`dbrx.train.data.MixtureLoader`: ``batch(step)`` for consecutive steps, ``shard`` for
    one rank's rows, ``state_dict`` / ``load_state_dict`` for exact resume. A conversation longer than
    ``seq_len + 1`` tokens is truncated (counted in ``truncated``, with a warning).
    """

    def __init__(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        seq_len: int,
        global_batch: int,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len and global_batch must be positive, got {seq_len}, {global_batch}")
        if not conversations:
            raise ValueError("SFTLoader needs at least one conversation")
        tok = tokenizer or get_tokenizer()
        self.seq_len, self.global_batch, self.seed, self.pad_id = seq_len, global_batch, seed, tok.pad_id
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.truncated = 0
        for i, conv in enumerate(conversations):
            try:
                ids, mask = tok.encode_chat(conv, add_generation_prompt=False, system_prompt=system_prompt)
            except ValueError as e:
                raise ValueError(f"conversation {i}: {e}") from None
            if len(ids) > seq_len + 1:
                self.truncated += 1
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            self.ids.append(np.asarray(ids, dtype=np.int64))
            self.masks.append(np.asarray(mask, dtype=bool))
        if self.truncated:
            warnings.warn(f"{self.truncated} of {len(self.ids)} conversations are longer than seq_len + 1 = "
                          f"{seq_len + 1} tokens and were truncated", stacklevel=2)
        self.step = self.epoch = self.cursor = 0
        self._packs: tuple[int, list[list[int]]] | None = None

    @classmethod
    def from_files(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], seq_len: int, global_batch: int,
                   seed: int = 0, **kwargs: Any) -> SFTLoader:
        """Loader over the conversations of one or more JSONL files (in order)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        conversations = [c for p in paths for c in load_chat_jsonl(p)]
        return cls(conversations, seq_len, global_batch, seed, **kwargs)

    def packs(self, epoch: int) -> list[list[int]]:
        """Conversation indices of each window in ``epoch``: a seeded order, packed greedily."""
        if self._packs is None or self._packs[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 0x5F7]).permutation(len(self.ids))
            packs: list[list[int]] = [[]]
            room = self.seq_len + 1
            for i in order.tolist():
                n = len(self.ids[i])
                if n > room:
                    packs.append([])
                    room = self.seq_len + 1
                packs[-1].append(i)
                room -= n
            self._packs = (epoch, packs)
        return self._packs[1]

    def window(self, conv_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens (T+1), labels (T), doc_ids (T+1)) of one packed window; padding gets the next doc id."""
        n = self.seq_len + 1
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        mask = np.zeros(n, dtype=bool)
        doc_ids = np.full(n, len(conv_indices), dtype=np.int64)
        pos = 0
        for d, i in enumerate(conv_indices):
            k = len(self.ids[i])
            tokens[pos : pos + k], mask[pos : pos + k], doc_ids[pos : pos + k] = self.ids[i], self.masks[i], d
            pos += k
        assert pos <= n
        keep = mask[1:] & (doc_ids[1:] == doc_ids[:-1])  # the target is an assistant token of the same conversation
        labels = np.where(keep, tokens[1:], IGNORE)
        return tokens, labels, doc_ids

    def batch(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """Global batch for ``step``: input_ids, labels, doc_ids, each (global_batch, seq_len) int64."""
        step = self.step if step is None else step
        if step != self.step:
            raise ValueError(f"batch({step}) called out of order: the next step is {self.step} "
                             "(restore a saved position with load_state_dict)")
        rows, n_convs = [], []
        for _ in range(self.global_batch):
            packs = self.packs(self.epoch)
            rows.append(self.window(packs[self.cursor]))
            n_convs.append(len(packs[self.cursor]))
            self.cursor += 1
            if self.cursor == len(packs):
                self.epoch, self.cursor = self.epoch + 1, 0
        self.step = step + 1
        tokens, labels, doc_ids = (np.stack(x) for x in zip(*rows))
        real = doc_ids < np.array(n_convs)[:, None]  # (B, T+1): padding has the doc id after the last conversation
        return _to_batch(tokens, doc_ids, labels, real)

    shard = staticmethod(shard_batch)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "conversations": len(self.ids)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("conversations", len(self.ids)) != len(self.ids):
            raise ValueError("data state was saved for a different data set or seed; cannot resume exactly")
        self.step, self.epoch, self.cursor = int(state["step"]), int(state["epoch"]), int(state["cursor"])
