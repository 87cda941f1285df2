"""Per-rank memory of the sharded initialisation of `dbrx-132b` (estimated), with the formula checked on a tiny model.

What a rank allocates when the trainer builds a model without a checkpoint: the model on the meta device (nothing),
`fsdp.shard_model`, `model.to_empty(device)` (this rank's fp32 shards, as FSDP2 allocates them: ceil(rows / world)
rows of every parameter, the last ranks' rows partly or wholly padding), then `init_weights`, whose only temporary
is one block of `BLOCK` fp32 values (never more than the parameter). Not counted: gradients and optimizer state
(created at the first step: AdamW adds two fp32 copies of the shard, gradients one), activations, the CUDA context
and the Python/torch runtime. On GPUs the shards are on the device and the host holds only the block.

The check, under a fake process group of each size (one process plays each rank; the init needs no communication):
for a tiny model, the bytes of each rank's parameter storages after `to_empty` and the peak of the tensors
`init_weights` allocates (`dbrx.memory.LiveMemory`) must equal the formula to the byte; for a 1.7 GB model on 8
ranks, the growth of the process's peak RSS must be the formula's (within 10 % + 20 MB): nothing transient holds
the full weights.

    python benchmarks/sharded_init_memory.py
"""

from __future__ import annotations

import math
import os
import resource

import torch
import torch.distributed as dist

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.hf_checkpoint import _expected_shapes
from dbrx.memory import LiveMemory
from dbrx.parallel import fsdp
from dbrx.parallel import init as init_mod

FP32 = 4
GB = 1e9


def shard_bytes(shapes: dict[str, tuple[int, ...]], world: int, expert_dim: int = 0) -> int:
    """fp32 bytes one rank allocates: ceil(size / world) along the sharded dim of every parameter (FSDP2: dim 0;
    `expert_dim` for the (E, F, D) expert weights)."""
    total = 0
    for shape in shapes.values():
        d = expert_dim if len(shape) == 3 else 0
        total += -(-shape[d] // world) * math.prod(shape) // shape[d] * FP32
    return total


def init_temp_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The init's largest temporary: one block (or the whole parameter, when smaller) of fp32 values."""
    return max(min(init_mod.BLOCK, math.prod(s)) for s in shapes.values()) * FP32


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg: DbrxConfig, world: int, rank: int) -> tuple[int, int, int]:
    """Rank `rank` of `world` under a fake process group: (bytes of its parameter storages after `to_empty`, peak
    bytes of the tensors `init_weights` allocates, growth of the process's peak RSS over both)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        model = DbrxForCausalLM.from_config(cfg, device="meta")
        fsdp.shard_model(model)
        before = rss_bytes()
        model.to_empty(device="cpu")
        # DTensor ops hide their local allocations from a dispatch mode: count the local storages themselves
        local = [p.to_local() for p in model.parameters()]
        shards = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in local}.values())
        tracker = LiveMemory()
        tracker.ignore(local)
        with tracker:
            init_mod.init_weights(model, 0, cfg.initializer_range)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        return shards, tracker.peak, peak_rss
    finally:
        dist.destroy_process_group()


def check_formula() -> None:
    # first, while the process's peak RSS is still its current one: a model whose full fp32 weights (1.7 GB)
    # would show plainly if `to_empty` or the init ever held them
    cfg = DbrxConfig.from_preset("dbrx-tiny", d_model=1024, ffn_hidden_size=2048, moe_num_experts=16, n_layers=4,
                                 vocab_size=8192, max_seq_len=64)
    shapes = _expected_shapes(cfg)
    world = 8
    shards, temp, rss = measure(cfg, world, 0)
    want = shard_bytes(shapes, world) + init_temp_bytes(shapes)
    full = cfg.num_params()["total"] * FP32
    print(f"  {full / 1e6:,.0f} MB model, world {world}, rank 0: peak RSS grew {rss / 1e6:,.0f} MB; "
          f"formula {want / 1e6:,.0f} MB")
    assert abs(rss - want) < 0.1 * want + 20e6, (rss, want)
    # then byte for byte, for a tiny model (8 experts) over several world sizes and block sizes
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=1000, max_seq_len=64)
    shapes = _expected_shapes(cfg)
    for block in (init_mod.BLOCK, 1000):  # each parameter in one block / in many blocks
        init_mod.BLOCK = block
        for world in (2, 3, 8, 16):
            for rank in sorted({0, world - 1}):
                got = measure(cfg, world, rank)[:2]
                want = shard_bytes(shapes, world), init_temp_bytes(shapes)
                print(f"  tiny, block {block:>7}, world {world:>2}, rank {rank:>2}: shards + init temporary "
                      f"measured {got[0]:>9,} + {got[1]:>7,} B, formula {want[0]:>9,} + {want[1]:>7,} B")
                assert got == want, (block, world, rank, got, want)
    init_mod.BLOCK = 1 << 20


def table() -> None:
    cfg = DbrxConfig.from_preset("dbrx-132b")
    shapes = _expected_shapes(cfg)
    total = cfg.num_params()["total"]
    assert sum(math.prod(s) for s in shapes.values()) == total
    temp = init_temp_bytes(shapes)
    print(f"\ndbrx-132b: {total:,} parameters, fp32 {total * FP32 / GB:.1f} GB; init temporary {temp / 2**20:.0f} MiB")
    print("| ranks | ideal fp32 shard (total / ranks) | allocated by FSDP2 (dim-0 rule) + init block "
          "| if experts were sharded on dim 1 (F) | today: full fp32 model on every rank |")
    print("|---|---|---|---|---|")
    for world in (8, 64, 512):
        cells = [total * FP32 / world, shard_bytes(shapes, world) + temp,
                 shard_bytes(shapes, world, expert_dim=1) + temp]
        print(f"| {world} | " + " | ".join(f"{b / GB:.2f} GB" for b in cells) + f" | {total * FP32 / GB:.1f} GB |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("the formula against measurements (fake process group, one process playing each rank):")
    check_formula()
    table()
