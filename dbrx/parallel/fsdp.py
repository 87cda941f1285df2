"""Process groups and FSDP2 sharding, applied to a built model from outside.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) `init_distributed` joins the process group
(NCCL on CUDA, gloo on CPU); `shard_model` applies `fully_shard` to every transformer block and then to the root,
so parameters, gradients and optimizer state are sharded over the ranks. With bf16 the policy computes in bf16
and reduces gradients in fp32; the sharded fp32 parameters are the master weights.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..compat import TORCH_VERSION as _TORCH  # patched by tests


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, local_world, device)


def shard_model(model: nn.Module, bf16: bool = False) -> nn.Module:
    """fully_shard each block, then the root (embedding, final norm and head stay in the root's group).

    A model on the meta device stays there, sharded: `model.to_empty(device=...)` then allocates only each rank's
    shards, and `dbrx.parallel.init.init_weights` fills them.
    """
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu" or (device.type == "meta" and not torch.cuda.is_available())
    if _TORCH < (2, 7) and on_cpu:
        raise ValueError(f"sharded training on the CPU (several processes) needs torch >= 2.7, where FSDP2 runs on "
                         f"the CPU; this is torch {torch.__version__}: use GPUs, one process, or a newer torch")
    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = model.transformer.blocks
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again right away in backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        register_fsdp_forward_method(block, "forward_paged")  # the serving step gathers the block as forward does
    fully_shard(model, mp_policy=mp)
    if hasattr(model, "compute_loss"):  # gather the root's parameters for compute_loss as for forward
        register_fsdp_forward_method(model, "compute_loss")
    return model


@contextlib.contextmanager
def root_gathered(model: nn.Module):
    """Inference that reads the root's parameters outside its forward (embedding, final norm and head: the serving
    engine's `forward_paged`, blocked-head scoring) sees them whole; each block still gathers its own around its
    forward. Every rank must run the same calls inside (each block's gather is a collective). A no-op unsharded."""
    if isinstance(model, FSDPModule):
        model.unshard()
    try:
        yield model
    finally:
        reshard_all(model)


def reshard_all(model: nn.Module) -> None:
    """Reshard every FSDP module after inference: a forward without backward leaves the modules that keep their
    parameters gathered after forward (the root, the last block) unsharded, and a checkpoint taken then would see
    whole tensors where the optimizer holds shards."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op outside a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "init_distributed", "shard_model", "root_gathered", "reshard_all", "all_reduce_sum",
           "all_reduce_max", "barrier", "destroy"]
