"""Verbs about checkpoints: `info`, `init`, `convert`."""

from __future__ import annotations

import json
import sys

from .common import parse_override_args, resolve_config


def _human(n: float) -> str:
    """Bytes in binary units: 163840 -> '160.0 KiB'."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for prefix in ("Ki", "Mi", "Gi", "Ti"):
        n /= 1024
        if abs(n) < 1024:
            break
    return f"{n:.1f} {prefix}B"


# ---- info -----------------------------------------------------------------------------------------------
def info_report(cfg) -> dict:
    from dbrx.quant import TARGETS, QuantSpec, checkpoint_bytes

    n = cfg.num_params()
    # what `dbrx quantize --include-head --include-embedding` writes (the router and norms stay bf16), exactly
    int8 = QuantSpec.make(cfg, 8, None, TARGETS)
    int4 = QuantSpec.make(cfg, 4, None, TARGETS) if cfg.d_model % 32 == 0 else None
    return {
        "config": cfg.to_hf_dict(),
        "params_total": n["total"],
        "params_active_per_token": n["active"],
        "params_by_part": {k: v for k, v in n.items() if k not in ("total", "active")},
        "memory_bytes": {
            "bf16": 2 * n["total"],
            "int8": checkpoint_bytes(cfg, int8),  # one bf16 scale per output row
            "int4": checkpoint_bytes(cfg, int4) if int4 else None,  # bf16 scale and zero per group
        },
        "int4_group_size": int4.group_size if int4 else None,
        "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
        "kv_cache_bytes_full_context_bf16": cfg.kv_cache_bytes_per_token(2) * cfg.max_seq_len,
        "train_flops_per_token": cfg.flops_per_token(cfg.max_seq_len, training=True),
    }


def cmd_info(args) -> int:
    cfg = resolve_config(args.model, parse_override_args(args.override))
    rep = info_report(cfg)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    a, f = cfg.attn_config, cfg.ffn_config
    print(f"{args.model}")
    print(f"  d_model {cfg.d_model} · n_heads {cfg.n_heads} (kv {a.kv_n_heads}, head_dim {cfg.head_dim}) · "
          f"n_layers {cfg.n_layers} · max_seq_len {cfg.max_seq_len} · vocab {cfg.vocab_size}")
    print(f"  experts {f.moe_num_experts} top-{f.moe_top_k} · ffn_hidden_size {f.ffn_hidden_size} · "
          f"clip_qkv {a.clip_qkv} · rope_theta {a.rope_theta:g}")
    print(f"  parameters: {rep['params_total'] / 1e9:.2f}B total, {rep['params_active_per_token'] / 1e9:.2f}B "
          f"active per token")
    for k, v in rep["params_by_part"].items():
        print(f"    {k:<11} {v / 1e9:8.3f}B")
    m = rep["memory_bytes"]
    int4 = f"int4 {_human(m['int4'])} (groups of {rep['int4_group_size']})" if m["int4"] else "int4 n/a"
    print(f"  weights: bf16 {_human(m['bf16'])} · int8 {_human(m['int8'])} · {int4} "
          "(dbrx quantize --include-head --include-embedding)")
    print(f"  KV cache (bf16): {_human(rep['kv_cache_bytes_per_token_bf16'])} per token, "
          f"{_human(rep['kv_cache_bytes_full_context_bf16'])} per sequence at {cfg.max_seq_len} tokens")
    return 0


# ---- init -----------------------------------------------------------------------------------------------
def cmd_init(args) -> int:
    from dbrx.devices import parse_dtype
    from dbrx.model import DbrxForCausalLM

    cfg = resolve_config(args.preset, parse_override_args(args.override))
    dtype = parse_dtype(args.dtype)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise ValueError(f"{args.out} is not empty (use --force to replace the checkpoint in it)")
    total = cfg.num_params()["total"]
    print(f"initialising {args.preset} ({total / 1e6:.1f}M parameters, seed {args.seed}) ...", file=sys.stderr)
    model = DbrxForCausalLM.from_config(cfg, seed=args.seed, dtype=dtype)
    model.save_pretrained(args.out)
    print(f"saved to {args.out}", file=sys.stderr)
    return 0


# ---- convert --------------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from dbrx.hf_checkpoint import convert_checkpoint, parse_size

    names = convert_checkpoint(args.input, args.output, layout=args.layout, dtype=args.dtype,
                               max_shard_bytes=parse_size(args.shard_size),
                               progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"wrote {len(names)} weight file(s) to {args.output}")
    return 0


def register(sub) -> None:
    from pathlib import Path

    p = sub.add_parser("info", help="show a preset's or checkpoint's config, parameters and memory")
    p.add_argument("model", help="a preset name (dbrx-132b, dbrx-9b, ...) or a checkpoint directory")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="preset override, e.g. n_layers=2")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--preset", required=True, help="preset name (see `dbrx info`)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="preset override, e.g. n_layers=2")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default fp32)")
    p.add_argument("--force", action="store_true", help="replace the checkpoint in a non-empty OUT")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "convert", help="rewrite a DBRX safetensors checkpoint (expert layout, dtype, shard size)",
        description="Convert a Hugging Face-format DBRX checkpoint directory IN into OUT, streaming tensor by "
        "tensor: stacked experts ([E*F, D], the official layout) or split per-expert tensors. OUT is written "
        "into a temporary directory and replaces an existing OUT only once complete.",
    )
    p.add_argument("input", metavar="IN", help="source checkpoint directory")
    p.add_argument("output", metavar="OUT", help="destination directory")
    p.add_argument("--layout", choices=("stacked", "split"), default="stacked",
                   help="expert layout to write (default stacked)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="convert tensors (default: keep)")
    p.add_argument("--shard-size", default="4GiB", help="largest shard, e.g. 4GB, 2GiB (default 4GiB)")
    p.set_defaults(func=cmd_convert)


__all__ = ["register", "info_report"]
