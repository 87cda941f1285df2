"""Held-out perplexity of a trained checkpoint, float against int8 and int4 (dbrx.quant), on the demo corpus.

    dbrx pretrain && python benchmarks/quant_perplexity.py runs/demo/final

The held-out documents are the trainer's (split_documents with the demo config's eval fraction 0.02 and seed 0, over
the prepared text and code streams in ~/.cache/dbrx/prepared); each stream is cut into --windows windows of
--seq-len tokens (documents packed, attention within documents). Quantized: --targets (default attention, experts
and the LM head); int4 in each --groups size that divides d_model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dbrx import DbrxForCausalLM
from dbrx.kernels import cpu_matvec
from dbrx.quant import quantize_model
from dbrx.train.data import PackedSequences, TokenDataset, split_documents


@torch.no_grad()
def perplexity(model, windows) -> float:
    total, n = 0.0, 0
    for tokens, doc_ids in windows:
        ids, docs = torch.as_tensor(tokens)[None].long(), torch.as_tensor(doc_ids)[None].long()  # (1, T+1)
        logits = model(ids[:, :-1], doc_ids=docs[:, :-1])  # (1, T, V)
        keep = docs[0, 1:] == docs[0, :-1]  # no target across a document boundary
        loss = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")[keep]
        total, n = total + float(loss.sum()), n + int(keep.sum())
    return math.exp(total / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a float checkpoint directory (e.g. runs/demo/final)")
    ap.add_argument("--streams", nargs="+", default=None,
                    help="prepared stream directories (default: every one in ~/.cache/dbrx/prepared)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--targets", default="attn,experts,lm_head", help="quantized parts (dbrx.quant.TARGETS)")
    ap.add_argument("--groups", default="32,64,128", help="int4 group sizes to try")
    ap.add_argument("--ours-from", type=int, default=None, metavar="K",
                    help="run every quantized matrix with at least K inputs (a multiple of 32) on dbrx's CPU kernels "
                         "(dbrx.kernels.cpu_matvec; default its MIN_QUANT_IN_FEATURES, which the demo's 64-wide "
                         "layers are below): with 32 the demo's attention, gate/up and head run on them")
    args = ap.parse_args()
    if args.ours_from is not None:
        cpu_matvec.MIN_QUANT_IN_FEATURES = args.ours_from
    targets = tuple(args.targets.split(","))
    torch.set_num_threads(1)
    base = DbrxForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    d = base.config.d_model
    models = {"fp32": base, "int8": quantize_model(copy.deepcopy(base), 8, None, targets)}
    for g in map(int, args.groups.split(",")):
        if d % g == 0:
            models[f"int4 g{g}"] = quantize_model(copy.deepcopy(base), 4, g, targets)
    out = {}
    for stream in map(Path, args.streams or sorted(p for p in (Path.home() / ".cache/dbrx/prepared").glob("*-*")
                                             if not p.name.startswith("."))):
        ds = TokenDataset(stream)
        _, held = split_documents(ds.num_documents, 0.02, 0)
        packed = PackedSequences(ds, args.seq_len + 1, seed=0, documents=held)
        windows = [packed.next() for _ in range(args.windows)]
        ppl = {k: perplexity(m, windows) for k, m in models.items()}
        out[stream.name] = {k: {"ppl": round(v, 3), "rise_pct": round(100 * (v / ppl["fp32"] - 1), 2)}
                            for k, v in ppl.items()}
        kernels = {k: sorted({"ours" if getattr(mod, "matvec", False) else "torch" for mod in m.modules()
                              if hasattr(mod, "qweight")}) for k, m in models.items() if k != "fp32"}
        print(json.dumps({stream.name: out[stream.name], "targets": list(targets), "kernels": kernels}), flush=True)


if __name__ == "__main__":
    main()
