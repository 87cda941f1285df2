"""Full fine-tuning vs LoRA (experts targeted, attention only) vs QLoRA on the demo chat set, one command.

    python benchmarks/lora_vs_full.py [--model runs/demo/final] [--steps 60] [--json out.json]

Each variant is `dbrx finetune`'s trainer (dbrx/configs/finetune-demo.yaml: the bundled chat set, batch 8 x 256,
LionW, cosine schedule; here the batch is accumulated over micro-batches of --micro-batch rows, 1 by default, so
that the (rows, 256, 100352) logits of the demo's vocabulary do not dominate every variant's peak alike) from the
same base for the same number of steps, in its own process so that its peak memory is its own. Reported per variant:

- loss: the final model's mean next-token cross-entropy over every assistant token of the whole demo chat set
  (token-weighted, each conversation scored alone, the same tokenization as the training data);
- peak_rss_gb: the process's peak resident set size (ru_maxrss, what the trainer logs as `mem_gb` on the CPU);
- above_baseline_gb: that peak minus the peak RSS just before the trainer starts (Python, torch and dbrx imported,
  nothing built): the memory the fine-tuning itself took. The ratios to full fine-tuning are of this number;
- dynamo_import_gb: the part of it that is torch._dynamo's code, which torch.optim imports on building the first
  optimizer (its methods are wrapped in `torch._disable_dynamo`), imported here just after the baseline so that it
  can be shown apart; the same in every variant;
- state_gb: the training state, counted tensor by tensor: weights and buffers, gradients of the trainable
  parameters, optimizer state (what LoRA saves; the activations, alike for every variant, are not in it);
- trainable parameters and wall time.

Full fine-tuning uses the config's learning rate (1e-4); the adapters a larger one (--lora-lr, 1e-3), as LoRA
usually wants. The targets: loss within 10 % of full fine-tuning, memory at most half (issue 13).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "full": None,
    "lora-experts": ["Wqkv", "w1", "v1", "w2"],
    "lora-attn": ["Wqkv", "out_proj"],
    "qlora-int8-experts": ["Wqkv", "w1", "v1", "w2"],
}


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _own_gb(r: dict) -> float:
    """Peak RSS above the baseline less torch._dynamo's import: the fine-tuning's own memory."""
    return r["above_baseline_gb"] - r["dynamo_import_gb"]


def child(spec: dict) -> dict:
    """One fine-tuning run in this process; returns its numbers."""
    import torch
    import torch.nn.functional as F

    from dbrx.tokenizer import get_tokenizer
    from dbrx.train.config import load_config
    from dbrx.train.sft import load_chat_jsonl
    from dbrx.train.trainer import Trainer

    overrides = [f"model.checkpoint={spec['model']}", f"run_dir={spec['run_dir']}", f"train.steps={spec['steps']}",
                 f"optim.warmup_steps={max(1, spec['steps'] // 10)}", "checkpoint.interval=0",
                 f"log.interval={spec['steps']}", f"log.expert_load_interval={spec['steps']}",
                 f"train.num_threads={spec['threads']}", f"train.micro_batch={spec['micro_batch']}"]
    if spec["targets"] is not None:
        overrides += [f"lora.rank={spec['rank']}", f"lora.alpha={2 * spec['rank']}",
                      f"lora.targets=[{','.join(spec['targets'])}]", f"optim.lr={spec['lora_lr']}"]
    cfg = load_config(None, overrides, default="finetune-demo")
    baseline = _peak_rss_gb()
    import torch._dynamo  # noqa: F401  (what torch.optim's first optimizer would import: counted, shown apart)

    dynamo = _peak_rss_gb() - baseline
    t0 = time.perf_counter()
    trainer = Trainer(cfg, task="finetune")
    try:
        trainer.fit()
        peak = _peak_rss_gb()
        wall = time.perf_counter() - t0
        model = trainer.unsharded_model().eval()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        opt_state = sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values()
                        for v in st.values() if torch.is_tensor(v))
        tok = get_tokenizer()
        from dbrx.train.config import resolve_path

        convs = [c for p in cfg.data.sft for c in load_chat_jsonl(resolve_path(p))]
        total, count = 0.0, 0
        with torch.no_grad():
            for conv in convs:
                ids, mask = tok.encode_chat(conv, add_generation_prompt=False, system_prompt=cfg.data.system_prompt)
                ids = torch.tensor(ids)[None]
                keep = torch.tensor(mask[1:])
                logits = model(ids[:, :-1])[0].float()  # (T, V)
                total += F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum").item()
                count += int(keep.sum())
    finally:
        trainer.close()
    return dict(loss=total / count, tokens=count, peak_rss_gb=peak, baseline_rss_gb=baseline,
                above_baseline_gb=peak - baseline, dynamo_import_gb=dynamo, trainable_params=trainable, wall_s=wall,
                state_gb=(weights + grads + opt_state) / 2**30, weights_gb=weights / 2**30, grads_gb=grads / 2**30,
                optimizer_state_gb=opt_state / 2**30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/final", help="the base checkpoint (default runs/demo/final)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps of every variant (default 60)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="the adapters' learning rate (default 1e-3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="rows per micro-batch (default 1: the global batch of 8 accumulated over 8 micro-batches)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated among {', '.join(VARIANTS)}")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model = args.model
            if name.startswith("qlora-int8"):
                model = os.path.join(tmp, "base-int8")
                if not os.path.isdir(model):
                    q = subprocess.run([sys.executable, "-m", "dbrx", "quantize", args.model, model, "--bits", "8"],
                                       capture_output=True, text=True)
                    if q.returncode:
                        raise SystemExit(f"dbrx quantize failed: {q.stderr.strip()[-2000:]}")
            spec = dict(model=model, run_dir=os.path.join(tmp, name), steps=args.steps, targets=VARIANTS[name],
                        rank=args.rank, lora_lr=args.lora_lr, threads=args.threads,
                        micro_batch=args.micro_batch)
            print(f"[{name}] fine-tuning {args.steps} steps ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                sys.stderr.write(out.stderr[-3000:])
                raise SystemExit(f"{name}: the run failed (exit {out.returncode})")
            results[name] = json.loads(line[len("RESULT "):])
    full = results.get("full")
    print(f"\n{'variant':<20} {'params trained':>14} {'loss':>8} {'vs full':>8} {'peak RSS GB':>12} "
          f"{'above base GB':>14} {'vs full':>8} {'no dynamo':>10} {'state GB':>9} {'vs full':>8} {'wall s':>7}")
    for name, r in results.items():
        rel_loss = f"{r['loss'] / full['loss'] - 1:+.1%}" if full else "-"
        rel_mem = f"{r['above_baseline_gb'] / full['above_baseline_gb']:.2f}x" if full else "-"
        rel_own = f"{_own_gb(r) / _own_gb(full):.2f}x" if full else "-"
        rel_state = f"{r['state_gb'] / full['state_gb']:.2f}x" if full else "-"
        print(f"{name:<20} {r['trainable_params']:>14,} {r['loss']:>8.4f} {rel_loss:>8} {r['peak_rss_gb']:>12.3f} "
              f"{r['above_baseline_gb']:>14.3f} {rel_mem:>8} {rel_own:>10} {r['state_gb']:>9.3f} {rel_state:>8} "
              f"{r['wall_s']:>7.1f}")
    report = dict(model=args.model, steps=args.steps, rank=args.rank, lora_lr=args.lora_lr,
                  micro_batch=args.micro_batch, results=results)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
