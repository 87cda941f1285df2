"""The LoRA verb: `merge-lora` (dbrx.lora does the work).

    dbrx merge-lora BASE ADAPTER OUT      a Hugging Face checkpoint with a PEFT LoRA adapter merged in

Adapters are trained with `dbrx finetune ... lora.rank=16 lora.targets=[Wqkv,w1,v1,w2]` (their run's final/ is the
adapter, in PEFT's format); adapters made by PEFT for transformers' DbrxForCausalLM are read too.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge-lora", help="merge a LoRA adapter (PEFT format) into its base checkpoint",
        description="Write BASE (a Hugging Face-format DBRX checkpoint) with ADAPTER (a PEFT LoRA adapter directory: "
                    "adapter_config.json + adapter_model.safetensors, from `dbrx finetune ... lora.rank=N` or from "
                    "PEFT) merged in, W + scaling * B @ A computed in fp32, to OUT, tensor by tensor (the model is "
                    "never built). OUT is replaced whole once complete.")
    p.add_argument("base", metavar="BASE", help="the base checkpoint directory")
    p.add_argument("adapter", metavar="ADAPTER", help="the LoRA adapter directory (PEFT format)")
    p.add_argument("out", metavar="OUT", help="the merged checkpoint directory to write")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the base's)")
    p.add_argument("--shard-size", default="4GB", help="largest weight file (default 4GB)")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from dbrx.lora import merge_checkpoint

    out = merge_checkpoint(args.base, args.adapter, args.out, dtype=args.dtype, max_shard_bytes=args.shard_size)
    print(f"merged {args.adapter} into {args.base}: {out}", file=sys.stderr)
    return 0


__all__ = ["register", "run_merge"]
