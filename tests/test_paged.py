"""The model's serving interface: a ragged batch over a paged KV cache gives the dense forward's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

from dbrx import DbrxForCausalLM
from dbrx.kernels import paged_attention
from dbrx.kernels.paged_attention import PagedMetadata

BS = 4  # tokens per block


class Paged:
    """A tiny stand-in for the engine: a block pool with shuffled block ids, sequences grown chunk by chunk."""

    def __init__(self, model, num_blocks=64, seed=0):
        cfg = model.config
        shape = (num_blocks, BS, cfg.attn_config.kv_n_heads, cfg.head_dim)
        # garbage where nothing was written: attending to a slot outside a sequence's context would show
        self.caches = [(torch.full(shape, 1e4), torch.full(shape, -1e4)) for _ in range(cfg.n_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.done: dict[str, int] = {}
        self.model = model

    def step(self, chunks: dict[str, list[int]], all_logits: bool = True):
        """chunks: sequence -> its next token ids. Returns {sequence: logits (n, V)} of those tokens."""
        ids, pos, slots, qlens, lens, rows = [], [], [], [], [], []
        for name, toks in chunks.items():
            start = self.done.get(name, 0)
            table = self.tables.setdefault(name, [])
            while len(table) * BS < start + len(toks):
                table.append(self.free.pop())
            ids += toks
            pos += range(start, start + len(toks))
            slots += [table[t // BS] * BS + t % BS for t in range(start, start + len(toks))]
            qlens.append(len(toks))
            lens.append(start + len(toks))
            rows.append(table)
            self.done[name] = start + len(toks)
        width = max(len(r) for r in rows)
        tables = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows])
        meta = PagedMetadata(torch.tensor(slots), tables, qlens, lens)
        n = len(ids)
        want = torch.arange(n) if all_logits else torch.tensor([sum(qlens[: i + 1]) - 1 for i in range(len(qlens))])
        with torch.no_grad():
            logits = self.model.forward_paged(torch.tensor(ids), torch.tensor(pos), meta, self.caches, want)
        out, start = {}, 0
        for (name, toks), q in zip(chunks.items(), qlens):
            out[name] = logits[start : start + q] if all_logits else logits[len(out)][None]
            start += q
        return out


@pytest.mark.parametrize("backend", ["reference", "padded", "mixed"])
@pytest.mark.parametrize("overrides", [{}, {"kv_n_heads": 1, "clip_qkv": None}, {"kv_n_heads": 4}])
def test_ragged_chunked_steps_match_the_dense_forward(overrides, backend, monkeypatch):
    monkeypatch.setattr(paged_attention, "BACKEND", backend)
    model = randomize_(DbrxForCausalLM.from_config(tiny_config(**overrides)), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    seqs = {name: torch.randint(0, 128, (n,), generator=g).tolist() for name, n in (("a", 13), ("b", 9), ("c", 9))}
    with torch.no_grad():
        dense = {name: model(torch.tensor([s]))[0] for name, s in seqs.items()}  # (T, V)
    paged = Paged(model)
    got = {name: [] for name in seqs}
    # a chunked prefill of a, then c joins in chunks while a and b decode one token a step (decodes and a prefill
    # chunk in one step), then decodes only
    plan = [{"a": (0, 5), "b": (0, 6)}, {"a": (5, 10), "c": (0, 3)}, {"a": (10, 11), "b": (6, 7), "c": (3, 9)},
            {"a": (11, 12), "b": (7, 8)}, {"a": (12, 13), "b": (8, 9)}]
    for step in plan:
        out = paged.step({name: seqs[name][a:b] for name, (a, b) in step.items()})
        for name, logits in out.items():
            got[name].append(logits)
    for name, s in seqs.items():
        torch.testing.assert_close(torch.cat(got[name]), dense[name], atol=2e-5, rtol=1e-4, msg=name)


def test_only_the_wanted_logits_and_no_router_statistics(monkeypatch):
    model = randomize_(DbrxForCausalLM.from_config(tiny_config()), seed=3).eval()
    calls = []
    real = type(model.transformer.blocks[0].ffn).stats
    monkeypatch.setattr(type(model.transformer.blocks[0].ffn), "stats", lambda *a: calls.append(1) or real(*a))
    paged = Paged(model)
    seq = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(4)).tolist()
    last = paged.step({"x": seq}, all_logits=False)["x"]
    assert last.shape == (1, 128) and calls == []
    with torch.no_grad():
        torch.testing.assert_close(last[0], model(torch.tensor([seq]))[0, -1], atol=2e-5, rtol=1e-4)
