"""The `serve` verb: an OpenAI-compatible HTTP server over the continuous-batching engine (dbrx.serve)."""

from __future__ import annotations

import os
import sys

from .common import add_model_args


def parse_adapters(items: list[str] | None, model_name: str) -> dict[str, str]:
    """`--adapter` values -> {served name: directory}: `NAME=DIR` (split at the first '='), or `DIR`, named after
    its last path component. ValueError for an empty name or directory, a name with spaces, a name given twice, or
    the base model's name."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if not name or not path or any(c.isspace() for c in name):
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR or DIR (a non-empty NAME without spaces)")
        if name == model_name:
            raise ValueError(f"--adapter {item!r}: {name!r} is the base model's name; name the adapter: "
                             f"--adapter OTHER={path}")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice ({out[name]} and {path}); name them: "
                             f"--adapter NAME=DIR")
        out[name] = path
    return out


def _load(args, adapters: dict[str, str]):
    """The base model with every adapter attached (each read and checked against the base's config first)."""
    from dbrx.config import DbrxConfig
    from dbrx.loading import load_pretrained
    from dbrx.lora.multi import attach_adapters
    from dbrx.lora.peft_format import read_peft

    config = os.path.join(args.model, "config.json")
    factors = None
    if os.path.isfile(config):  # bad adapters fail before the (large) base is read
        cfg = DbrxConfig.load(config)
        factors = {n: read_peft(d, cfg) for n, d in adapters.items()}
    model = load_pretrained(args.model, device=args.device, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite)
    if adapters:
        attach_adapters(model, factors or {n: read_peft(d, model.config) for n, d in adapters.items()})
    return model


def cmd_serve(args) -> int:
    try:
        from dbrx.serve.api import create_app, run_server
    except ImportError as e:
        raise ValueError(f"dbrx serve needs the serve extra: pip install -e '.[serve]' ({e})") from None
    from dbrx.hf_checkpoint import parse_size
    from dbrx.serve.engine import AsyncEngine, Engine, EngineConfig
    from dbrx.tokenizer import get_tokenizer

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    config = EngineConfig(block_size=args.block_size, kv_memory_bytes=parse_size(args.kv_memory),
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, max_waiting=args.max_waiting,
                          enable_prefix_cache=not args.no_prefix_cache, attention_backend=args.attention_backend)
    config.validate()  # before the (slow) model load
    name = args.name or os.path.basename(os.path.normpath(args.model))
    adapters = parse_adapters(args.adapter, name)
    engine = AsyncEngine(Engine(_load(args, adapters), config))
    app = create_app(engine, get_tokenizer(), name, api_key=args.api_key)
    s = engine.engine.pool
    served = f"{name} (+ adapters {', '.join(adapters)})" if adapters else name
    print(f"dbrx serve: {served} on http://{args.host}:{args.port} ({s.num_blocks} KV blocks of {args.block_size} "
          f"tokens, up to {args.max_num_seqs} sequences, {args.max_num_batched_tokens} tokens a step)",
          file=sys.stderr, flush=True)
    try:
        run_server(app, host=args.host, port=args.port)
    finally:
        engine.shutdown()
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching, paged KV cache)",
        description="Serve a checkpoint at /v1/completions, /v1/chat/completions, /v1/models, /health and "
                    "/metrics (Prometheus), with any number of LoRA adapters beside it. Binds to 127.0.0.1 unless "
                    "--host says otherwise.",
        conflict_handler="resolve")  # --adapter below replaces add_model_args' one-adapter option
    add_model_args(p)
    p.add_argument("--adapter", action="append", default=None, metavar="DIR",
                   help="NAME=DIR or DIR: a LoRA adapter in PEFT's format served unmerged beside the base model, "
                        "as model NAME (DIR alone: named after its last component); repeat for several. A request's "
                        "`model` picks the base model (--name) or an adapter; one batch mixes them")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: no key)")
    p.add_argument("--name", default=None, help="the model name clients use (default: the directory's name)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="running sequences at most (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step, prefill chunks and decodes together (default 512)")
    p.add_argument("--kv-memory", default="1GiB", help="memory for the paged KV cache (default 1GiB)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429 (default 256)")
    p.add_argument("--attention-backend", default=None,
                   help="paged attention: reference, padded, mixed or triton (default: triton on CUDA, else mixed)")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not share KV blocks between prompts")
    p.set_defaults(func=cmd_serve)


__all__ = ["register"]
