"""The `quantize` verb: a weight-only int8 / int4 checkpoint from a float one (dbrx.quant)."""

from __future__ import annotations

import sys
import time

DESCRIPTION = """Quantize the Hugging Face-format DBRX checkpoint IN into OUT, tensor by tensor (no model is built,
so any size fits in the memory of its largest tensor). Attention (Wqkv, out_proj) and all experts are quantized,
the router and norms stay float; --include-head and --include-embedding quantize the LM head and the embedding
too (at batch 1 the 100352-row head outweighs the active experts). --bits 8: symmetric, one scale per output row.
--bits 4: asymmetric groups along the input dim (32, 64, 128 or 256; default 128, or the largest below it that
divides d_model). OUT keeps the Hugging Face layout with a `quantization_config` in config.json (see the README);
generate, chat, serve and eval load it directly and run it on the CPU through torch's weight-only kernels. OUT is
replaced only once the new checkpoint is complete."""


def cmd_quantize(args) -> int:
    from dbrx.hf_checkpoint import parse_size
    from dbrx.quant import quantize_checkpoint

    targets = ["attn", "experts"] + ["lm_head"] * args.include_head + ["embedding"] * args.include_embedding
    start = time.perf_counter()
    names = quantize_checkpoint(args.input, args.output, bits=args.bits, group_size=args.group_size,
                                targets=targets, max_shard_bytes=parse_size(args.shard_size),
                                progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"wrote {len(names)} weight file(s) to {args.output} (int{args.bits}, {', '.join(targets)}; "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-only int8 / int4 checkpoint (CPU kernels)",
                       description=DESCRIPTION)
    p.add_argument("input", metavar="IN", help="float checkpoint directory")
    p.add_argument("output", metavar="OUT", help="destination directory")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8 or 4")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="int4 group size along the input dim: 32, 64, 128 or 256 (default 128 where it divides "
                        "d_model)")
    p.add_argument("--include-head", action="store_true", help="quantize the LM head as well")
    p.add_argument("--include-embedding", action="store_true", help="quantize the input embedding as well")
    p.add_argument("--shard-size", default="4GiB", help="largest shard, e.g. 4GB, 2GiB (default 4GiB)")
    p.set_defaults(func=cmd_quantize)


__all__ = ["register"]
