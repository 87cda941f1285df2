"""Weight-only quantization on the CPU: expert paths, and greedy batch-1 decoding fp32 vs int8 vs int4.

    python benchmarks/quant_decode.py                       # both parts, dbrx-demo and the mid-size model
    python benchmarks/quant_decode.py --part experts --rounds 7
    python benchmarks/quant_decode.py --part decode --models mid --tokens 64

experts: one MoE layer of the mid-size model (d_model 1024, ffn 1792, 16 experts choose 4), N tokens routed at
random: dbrx.quant.layers.QuantExperts ("loop": one kernel call per active expert and matrix) against two
contenders kept here only, "gather" (the chosen experts' int8 weights gathered per routed row and dequantized,
batched matmuls) and "dequant" (each active expert dequantized to fp32, fp32 matmuls), beside the float experts.
decode: greedy decoding at batch 1 through the model's own KV cache (forward with cache_pos), timing only the
decode steps after a 16-token prompt. Contenders alternate within each round; the median over rounds is printed.
Random weights (seed 0); "+head" also quantizes the LM head. Mid-size: dbrx-demo with d_model 1024, 16 heads (8 KV),
ffn 1792, 4 layers (the issue-11 shape).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.kernels.experts import expert_glu
from dbrx.quant import quantize_model
from dbrx.quant.apply import QuantSpec, quantize_weight
from dbrx.quant.layers import QuantExperts

MODELS = {
    "demo": dict(),
    "mid": dict(d_model=1024, n_heads=16, kv_n_heads=8, ffn_hidden_size=1792, n_layers=4),
}


def _median_rounds(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():  # alternating contenders
            times[k].append(f())
    return {k: statistics.median(v) for k, v in times.items()}


def _timed(f, reps: int):
    def run():
        f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps
    return run


# ---- experts --------------------------------------------------------------------------------------------------
def _dequant_loop(q: QuantExperts, x, weights, idx):
    """Contender: per active expert, dequantize its int8 weights to fp32 and run fp32 matmuls."""
    N, K = idx.shape
    y = torch.zeros(N, q.d_model)
    for e in idx.unique().tolist():
        n, k = (idx == e).nonzero(as_tuple=True)
        w13 = q.w13.qweight[e].float() * q.w13.weight_scale[e].float()[:, None]  # (2F, D)
        w2 = q.w2.qweight[e].float() * q.w2.weight_scale[e].float()[:, None]  # (D, F)
        gu = x[n] @ w13.T
        h = F.silu(gu[:, : q.ffn]) * gu[:, q.ffn:]
        y.index_add_(0, n, (h @ w2.T) * weights[n, k][:, None])
    return y


def _gather(q: QuantExperts, x, weights, idx):
    """Contender (int8): gather the chosen experts' weights per routed row, dequantize, batched matmuls (no host
    sync, so compilable; but it copies R x 3 x F x D weights)."""
    N, K = idx.shape
    sel = idx.reshape(-1)  # (R,)
    xs = x[:, None].expand(N, K, q.d_model).reshape(N * K, q.d_model, 1)  # (R, D, 1)
    gu = torch.bmm(q.w13.qweight[sel].float(), xs)[..., 0] * q.w13.weight_scale[sel].float()  # (R, 2F)
    h = F.silu(gu[:, : q.ffn]) * gu[:, q.ffn:]  # (R, F)
    y = torch.bmm(q.w2.qweight[sel].float(), h[..., None])[..., 0] * q.w2.weight_scale[sel].float()  # (R, D)
    return (y.view(N, K, -1) * weights[..., None]).sum(1)


def bench_experts(rounds: int) -> list[dict]:
    D, Fh, E, K = 1024, 1792, 16, 4
    g = torch.Generator().manual_seed(0)
    w1, v1, w2 = (torch.randn(E, Fh, D, generator=g) * 0.02 for _ in range(3))
    cfg = DbrxConfig.from_preset("dbrx-demo", d_model=D)
    built = {}
    for bits in (8, 4):
        spec = QuantSpec.make(cfg, bits, None, ("experts",))
        t = [quantize_weight(w, k, spec) for w, k in ((w1, "stack"), (v1, "stack"), (w2, "stack_t"))]
        built[bits] = QuantExperts.from_quantized(bits, spec.group_size, *[(a[""], a["_scale"], a.get("_zero"))
                                                                           for a in t])
    out = []
    for N in (1, 4, 16, 128):
        x = torch.randn(N, D, generator=g)
        weights, idx = torch.softmax(torch.randn(N, E, generator=g), -1).topk(K, -1)
        reps = max(1, 64 // N)

        fns = {
            "fp32 loop": lambda: expert_glu(x, weights, idx, w1, v1, w2, backend="loop"),
            "int8 loop": lambda: built[8](x, weights, idx), "int8 gather": lambda: _gather(built[8], x, weights, idx),
            "int8 dequant": lambda: _dequant_loop(built[8], x, weights, idx),
            "int4 loop": lambda: built[4](x, weights, idx),
        }
        if N > 16:
            fns.pop("int8 gather")  # copies R x 3 x F x D weights: hopeless at this size
        with torch.no_grad():
            med = _median_rounds({k: _timed(f, reps) for k, f in fns.items()}, rounds)
        row = {"N": N, **{k: round(v * 1e3, 3) for k, v in med.items()}}
        print(json.dumps({"experts_ms": row}), flush=True)
        out.append(row)
    return out


# ---- decode ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n_new: int) -> tuple[list[int], float]:
    """Greedy tokens and the seconds of the n_new - 1 decode steps after the prefill."""
    T0 = prompt.shape[1]
    model.setup_cache(1, T0 + n_new)
    mask = torch.ones(1, T0 + n_new, dtype=torch.long)
    tok = model(prompt, attention_mask=mask, cache_pos=torch.arange(T0))[:, -1].argmax(-1)  # (1,)
    out = [int(tok)]
    t = time.perf_counter()
    for i in range(n_new - 1):
        logits = model(tok[:, None], attention_mask=mask, cache_pos=torch.tensor([T0 + i]))  # (1, 1, V)
        tok = logits[:, -1].argmax(-1)
        out.append(int(tok))
    dt = time.perf_counter() - t
    model.clear_cache()
    return out, dt


def bench_decode(name: str, tokens: int, rounds: int) -> dict:
    cfg = DbrxConfig.from_preset("dbrx-demo", **MODELS[name])
    base = DbrxForCausalLM.from_config(cfg, seed=0).eval()
    models = {"fp32": base}
    for bits in (8, 4):
        g = None if bits == 8 else min(128, cfg.d_model)
        models[f"int{bits}"] = quantize_model(copy.deepcopy(base), bits, g)
        models[f"int{bits}+head"] = quantize_model(copy.deepcopy(base), bits, g, ("attn", "experts", "lm_head"))
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    ref, _ = greedy(base, prompt, tokens)
    same = {k: sum(a == b for a, b in zip(greedy(m, prompt, tokens)[0], ref)) / tokens for k, m in models.items()}
    fns = {k: (lambda m=m: greedy(m, prompt, tokens)[1]) for k, m in models.items()}
    med = _median_rounds(fns, rounds)
    row = {"model": name, "tokens": tokens, "rounds": rounds,
           "tok_per_s": {k: round((tokens - 1) / v, 1) for k, v in med.items()},
           "greedy_tokens_equal_to_fp32": same}
    print(json.dumps({"decode": row}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "experts", "decode"), default="all")
    ap.add_argument("--models", default="demo,mid")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "date": time.strftime("%Y-%m-%d")}))
    if args.part in ("all", "experts"):
        bench_experts(args.rounds)
    if args.part in ("all", "decode"):
        for name in args.models.split(","):
            bench_decode(name, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
