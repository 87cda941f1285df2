"""Random initialisation that gives the same weights whatever the number of ranks, and lets each rank draw only
its own shards.

Every parameter is seen as a flat vector cut into fixed blocks of `BLOCK` elements; block b of parameter `name` is
drawn from its own generator, seeded by a hash of (seed, name, b). A rank fills the flat range of its shard by
drawing just the blocks that overlap it, so the full parameters gathered from 1, 2, 3, ... ranks are bit-identical
and no rank ever holds more than its shard plus one block. Flat blocks rather than row blocks: FSDP2's dim-0 shard
of an (E, F, D) or (V, D) parameter is one contiguous flat range, and the block size then does not depend on the
shape. Values: normal(0, std) for every weight, 1.0 for LayerNorm weights (0.0 for their biases, if any).

The values differ from `DbrxForCausalLM.from_config(cfg, seed=...)`, which draws the whole model in order from
torch's global generator: a shard of that stream cannot be drawn without drawing everything before it.
Blocks are drawn on the CPU (then copied to the shard's device), so the weights do not depend on the device either;
that runs at ~140 M values/s on one core of our CPU VM: `dbrx-132b` over 8 ranks, 16.5 G values each, ~2 min.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

BLOCK = 1 << 20  # elements drawn from one generator: the largest temporary of the init (4 MB of fp32)


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of one block: a 63-bit hash of (seed, parameter name, block index)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of parameter `p` as a flat tensor, and the flat index of its first element in the full one.

    A plain tensor is its own shard. A DTensor may be split on dim 0 over one mesh dimension (FSDP2; HSDP adds a
    replicated one), the torch.chunk rule: ceil(rows / n) rows a rank, the last ones shorter or empty. Its shard is
    then one contiguous flat range.
    """
    if not isinstance(p, DTensor):
        return p.data.view(-1), 0
    local, mesh = p.to_local(), p.device_mesh
    sharded = [i for i, placement in enumerate(p.placements) if not placement.is_replicate()]
    assert len(sharded) <= 1 and all(p.placements[i].is_shard(0) for i in sharded), p.placements
    rows = per_rank = p.shape[0]
    row = 0
    if sharded:  # the rule itself, not the private compute_local_shape_and_global_offset (whose cached mesh
        # coordinate went stale when a process made a new process group, as the fake-group tests do)
        per_rank = -(-rows // mesh.size(sharded[0]))
        row = min(mesh.get_local_rank(sharded[0]) * per_rank, rows)
    assert local.shape[0] == min(per_rank, rows - row), (p.shape, p.placements, local.shape)
    assert local.shape[1:] == p.shape[1:] and local.is_contiguous()
    return local.view(-1), row * math.prod(p.shape[1:])


@torch.no_grad()
def normal_(p: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill this rank's shard of `p` with its part of the world-size-invariant normal(0, std) draw."""
    flat, start = local_shard(p)
    if not flat.numel():  # an empty shard (more ranks than rows) draws nothing
        return
    end, numel = start + flat.numel(), p.numel()
    g = torch.Generator()
    for b in range(start // BLOCK, -(-end // BLOCK)):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, numel)
        g.manual_seed(block_seed(seed, name, b))
        values = torch.randn(hi - lo, generator=g)  # always the whole block: its values never depend on the shard
        a, z = max(lo, start), min(hi, end)
        flat[a - start : z - start].copy_(values[a - lo : z - lo].mul_(std))
        del values  # before the next block is drawn: one block is the init's only temporary


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float) -> nn.Module:
    """Initialise every parameter of `model` (plain or FSDP2-sharded) in place; returns the model.

    LayerNorm weights 1.0 (biases 0.0), everything else normal(0, std) drawn block by block (see the module
    docstring), so any number of ranks, each filling only its shards, gives the same full parameters.
    """
    norms = {id(p): name for m in model.modules() if isinstance(m, nn.LayerNorm)
             for name, p in m.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"init_weights: {name} is on the meta device; materialise the model first (to_empty)")
        if id(p) in norms:
            local_shard(p)[0].fill_(1.0 if norms[id(p)] == "weight" else 0.0)
        else:
            normal_(p, name, seed, std)
    return model


__all__ = ["BLOCK", "block_seed", "init_weights", "local_shard", "normal_"]
