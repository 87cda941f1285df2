"""The training verbs: `pretrain`, `finetune`, `plot` and `export` (dbrx.train does the work).

    dbrx pretrain                                  the demo: dbrx-demo on the bundled corpus, a few minutes on CPU
    dbrx pretrain my.yaml optim.lr=1e-3 train.steps=50
    torchrun --nproc_per_node 8 -m dbrx pretrain my.yaml
    dbrx pretrain --resume                         continue the run from its latest checkpoint
    dbrx finetune --model runs/demo/final --data chat.jsonl train.steps=100
    dbrx plot runs/demo
    dbrx export runs/demo --step 100 out/          a training checkpoint as a Hugging Face checkpoint
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from dbrx.train.config import load_config


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG] [key=value ...] -> (config or None, overrides)."""
    config = None
    overrides = []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            config = item
        else:
            raise ValueError(f"{item!r}: expected key=value (only the first argument may name a config file)")
    return config, overrides


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] KEY=VALUE",
                   help="a YAML config (default: the packaged demo config) then overrides with dotted keys, "
                        "e.g. train.steps=50 optim.lr=1e-3 model.preset=dbrx-tiny (options go before these)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the run (or from the given checkpoint directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again, deleting the run's old checkpoints, metrics, final model and pictures")
    p.add_argument("--no-sample", action="store_true", help="do not print a sample at the end")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="train a model (no arguments: the demo model on the bundled corpus)",
        description="Pre-train a DBRX model from a YAML config with key=value overrides. With no arguments: the "
                    "dbrx-demo preset on the bundled text + code corpus (a few minutes on a CPU). Writes "
                    "RUN_DIR/metrics.jsonl, checkpoints, RUN_DIR/final (Hugging Face layout) and RUN_DIR/loss.png. "
                    "Runs under torchrun unchanged (FSDP2).")
    _add_common(p)
    p.set_defaults(func=run_pretrain)

    p = subparsers.add_parser(
        "finetune", help="supervised fine-tuning on chat JSONL (loss on assistant tokens only)",
        description="Fine-tune a Hugging Face-format DBRX checkpoint on chat JSONL ({\"messages\": [...]}) or "
                    "prompt/response JSONL, rendered with the DBRX chat template, loss on assistant tokens only.")
    p.add_argument("--model", default=None, help="checkpoint directory to start from (model.checkpoint)")
    p.add_argument("--data", action="append", default=None, metavar="JSONL",
                   help="chat or prompt/response JSONL file (repeatable; data.sft)")
    _add_common(p)
    p.set_defaults(func=run_finetune)

    p = subparsers.add_parser(
        "plot", help="draw the loss and expert-load pictures of a run (PNG)",
        description="Draw RUN_DIR/loss.png (loss, LM loss, held-out losses, load-balancing loss) and "
                    "RUN_DIR/expert_load.png (share of routed tokens per expert and layer) from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", help="a training run directory (holding metrics.jsonl)")
    p.set_defaults(func=run_plot)

    p = subparsers.add_parser(
        "export", help="write a training checkpoint's model as a Hugging Face checkpoint",
        description="Write the model of a (sharded) training checkpoint of RUN_DIR as a Hugging Face-format "
                    "checkpoint in OUT, tensor by tensor (the whole model is never held in memory). RUN_DIR may also "
                    "be a checkpoint directory or one step_* checkpoint. OUT is replaced whole once complete.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (its checkpoints/), a checkpoint "
                                                      "directory, or one step_* checkpoint")
    p.add_argument("out", metavar="OUT", help="the Hugging Face checkpoint directory to write")
    p.add_argument("--step", type=int, default=None, help="the step to export (default: the newest usable checkpoint)")
    p.set_defaults(func=run_export)


def _resume_arg(args: argparse.Namespace) -> list[str]:
    """`--resume train.steps=50` or `--resume my.yaml` means resume the latest: give the argument back."""
    r = args.resume
    if r and r != "latest" and not Path(r).is_dir() and ("=" in r or Path(r).suffix in (".yaml", ".yml")):
        args.resume = "latest"
        return [r]
    return []


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    extra = _resume_arg(args)
    if extra and "=" not in extra[0]:  # the config file that --resume took: it comes first
        return _split_args(extra + args.args)
    return _split_args(args.args + extra)


def run_pretrain(args: argparse.Namespace) -> int:
    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, overrides, default="pretrain-demo")
    return _train(cfg, "pretrain", args)


def run_finetune(args: argparse.Namespace) -> int:
    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, overrides, default="finetune-demo")
    if args.model:
        cfg.model.checkpoint = args.model  # as given: not parsed as YAML like a key=value override
    if args.data:
        cfg.data.sft = list(args.data)
    return _train(cfg, "finetune", args)


def _train(cfg, task: str, args: argparse.Namespace) -> int:
    from dbrx.parallel import fsdp
    from dbrx.train.plot import plot_run
    from dbrx.train.trainer import Trainer, TrainingError

    trainer = None
    try:
        trainer = Trainer(cfg, task=task, resume=args.resume, overwrite=args.overwrite)
        try:
            summary = trainer.fit()
        except TrainingError as e:
            print(f"dbrx {task}: error: {e}", file=sys.stderr)
            return 1
        if summary["interrupted"]:
            return 130
        out = trainer.export()
        if trainer.dist.is_main:
            pictures = plot_run(trainer.run_dir)
            final = summary["final"] or {}
            print(f"done: {summary['step']} steps in {summary['wall_s']:.0f} s, final loss "
                  f"{final.get('loss', float('nan')):.4f}; {'adapter' if cfg.lora else 'model'} in {out}"
                  + (f"; plots {', '.join(str(p) for p in pictures)}" if pictures else ""), file=sys.stderr)
            if not args.no_sample:
                text = trainer.sample()
                print(f"--- sample ---\n{cfg.sample.prompt}{text}")
        fsdp.barrier()  # the ranks leave together (only on success: after a failure the others may never come)
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        # release the sharded model (its process-group references and pending work) before the process group
        # itself: gloo can abort the process at exit when they outlive it
        trainer = None
        gc.collect()
        fsdp.destroy()


def run_plot(args: argparse.Namespace) -> int:
    from dbrx.train.plot import plot_run

    written = plot_run(args.run_dir)
    for p in written:
        print(p)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from dbrx.train.train_checkpoint import export_hf

    ckpt = export_hf(args.run_dir, args.out, step=args.step)
    print(f"exported {ckpt} to {args.out}", file=sys.stderr)
    return 0


__all__ = ["register", "run_pretrain", "run_finetune", "run_plot", "run_export"]
