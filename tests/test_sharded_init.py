"""Sharded initialisation (dbrx.parallel.init): the model built on the meta device, sharded with FSDP2, then each
rank allocates and fills only its own shards, and 1, 2, 3, ... ranks give bit-identical full weights.

Run as a script under torchrun, this file is also the worker of the multi-process tests: it builds the tiny model
sharded, writes each rank's local sizes and the gathered full state dict (rank 0) into the given directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config  # tests/ is on the path under pytest, and as the script's folder under torchrun
from safetensors.torch import load_file, save_file

from dbrx.model import DbrxForCausalLM
from dbrx.parallel import fsdp
from dbrx.parallel import init as init_mod
from dbrx.parallel.init import init_weights

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
SMALL_BLOCK = 1000  # many blocks per parameter, shard boundaries inside blocks


def build(cfg, seed: int = SEED, shard: bool = False) -> DbrxForCausalLM:
    """The trainer's path: meta build, (FSDP2 sharding,) then allocate this rank's part and initialise it."""
    model = DbrxForCausalLM.from_config(cfg, device="meta")
    if shard:
        fsdp.shard_model(model)
    model.to_empty(device="cpu")
    return init_weights(model, seed, cfg.initializer_range)


def full_weights(cfg, seed: int = SEED) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build(cfg, seed).state_dict().items()}


def padded_rows(rows: int, world: int) -> int:
    """FSDP2's dim-0 rule: every rank allocates ceil(rows / world) rows (the last ranks' partly or wholly padding)."""
    return -(-rows // world)


# ---- (a) world-size invariance ---------------------------------------------------------------------------
def _worker(out: Path, block: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    fsdp.init_distributed()
    rank = dist.get_rank()
    init_mod.BLOCK = block
    model = build(tiny_config(), shard=True)
    local = {n: [p.to_local().numel(), p.to_local().untyped_storage().nbytes()] for n, p in model.named_parameters()}
    (out / f"rank{rank}.json").write_text(json.dumps(local))
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "full.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def _torchrun(world: int, out: Path, block: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           __file__, str(out), str(block)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


needs_cpu_fsdp = pytest.mark.skipif(fsdp._TORCH < (2, 7), reason="FSDP2 runs on the CPU from torch 2.7")


@needs_cpu_fsdp
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: uneven shards (8 experts)
def test_ranks_give_the_single_process_weights_bit_for_bit(tmp_path, monkeypatch, world):
    cfg = tiny_config()
    _torchrun(world, tmp_path, SMALL_BLOCK)
    monkeypatch.setattr(init_mod, "BLOCK", SMALL_BLOCK)
    single = full_weights(cfg)
    gathered = load_file(str(tmp_path / "full.safetensors"))
    assert gathered.keys() == single.keys()
    for k, v in single.items():
        assert torch.equal(gathered[k], v), k

    # (c) each rank allocated ceil(rows / world) rows of each parameter, never the whole model
    total = sum(v.numel() for v in single.values())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert sum(n for local in ranks for n, _ in local.values()) == total  # the shards tile the model
    for local in ranks:
        allocated = sum(b for _, b in local.values())
        assert allocated == sum(padded_rows(v.shape[0], world) * v[0].numel() * 4 for v in single.values())
        assert allocated < total * 4 / world * 1.15  # about 1/world: 8 experts over 3 ranks pad the most


def _fake_rank_weights(cfg, world: int, rank: int) -> dict[str, tuple[torch.Tensor, int]]:
    """One rank's local shards (and their flat offsets), built under a fake process group of `world` ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        model = build(cfg, shard=True)
        return {n: init_mod.local_shard(p) for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


@needs_cpu_fsdp
@pytest.mark.parametrize("world", [4, 16])  # 16 > 8 experts: some ranks hold empty expert shards
def test_many_ranks_tile_the_single_process_weights(monkeypatch, world):
    # each rank's init needs no communication, so a fake process group shows what each rank of a large job fills
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    cfg = tiny_config()
    monkeypatch.setattr(init_mod, "BLOCK", SMALL_BLOCK)
    single = full_weights(cfg)
    filled = {k: torch.full((v.numel(),), float("nan")) for k, v in single.items()}
    for rank in range(world):
        for name, (flat, start) in _fake_rank_weights(cfg, world, rank).items():
            filled[name][start : start + flat.numel()] = flat
    for k, v in single.items():
        assert torch.equal(filled[k].view(v.shape), v), k


# ---- (b) the values ---------------------------------------------------------------------------------------
def test_statistics_and_seeds():
    cfg = tiny_config(d_model=128, ffn_hidden_size=256, vocab_size=512)
    w = full_weights(cfg)
    std = cfg.initializer_range
    norms = [k for k in w if k.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight"))]
    assert norms and all(torch.equal(w[k], torch.ones_like(w[k])) for k in norms)
    values = torch.cat([v.flatten() for k, v in w.items() if k not in norms])  # about 1.2M values
    n = values.numel()
    assert abs(values.mean().item()) < 5 * std / math.sqrt(n)
    assert values.std().item() == pytest.approx(std, rel=0.01)
    assert values.abs().max().item() < 7 * std
    # every parameter has its own values: no two equal, nor equal to the next seed's
    other = full_weights(cfg, seed=SEED + 1)
    assert not torch.equal(w["lm_head.weight"], w["transformer.wte.weight"])
    e = "transformer.blocks.0.ffn.experts.mlp"
    assert not torch.equal(w[f"{e}.w1"], w[f"{e}.v1"])
    assert all(not torch.equal(w[k], other[k]) for k in w if k not in norms)
    assert all(torch.equal(w[k], other[k]) for k in norms)


def test_blocks_are_independent_and_shape_free(monkeypatch):
    # a parameter of several blocks: each block its own stream (not one block repeated)
    p = torch.nn.Parameter(torch.empty(5, 1000))
    monkeypatch.setattr(init_mod, "BLOCK", 2048)
    init_mod.normal_(p, "x", SEED, 1.0)
    flat = p.detach().flatten()
    assert not torch.equal(flat[:2048], flat[2048:4096])
    assert abs(torch.corrcoef(torch.stack([flat[:900], flat[2048:2948]]))[0, 1].item()) < 0.15
    # the values depend on (seed, name, flat position) only: another shape of the same numel draws the same
    q = torch.nn.Parameter(torch.empty(10, 500))
    init_mod.normal_(q, "x", SEED, 1.0)
    assert torch.equal(q.detach().flatten(), flat)


def test_meta_parameters_are_refused():
    model = DbrxForCausalLM.from_config(tiny_config(), device="meta")
    with pytest.raises(ValueError, match="to_empty"):
        init_weights(model, SEED, 0.02)


def test_the_trainer_initialises_with_init_weights(tmp_path):
    from test_trainer import tiny_train_config

    from dbrx.train.trainer import Trainer

    cfg = tiny_train_config(tmp_path)
    trainer = Trainer(cfg)
    try:
        got = trainer.model.state_dict()
    finally:
        trainer.close()
    expected = full_weights(trainer.mcfg, seed=cfg.train.seed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
