"""What several verbs share: the one-line-error argument parser, model config resolution, device options."""

from __future__ import annotations

import argparse
import os


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_override_args(items: list[str] | None) -> dict:
    """--override k=v items -> a dict (dbrx.config.parse_overrides: the one override grammar)."""
    from dbrx.config import parse_overrides

    return parse_overrides(items or [])


def resolve_config(name_or_dir: str, overrides: dict | None = None):
    """A preset name or a checkpoint directory (its config.json) -> DbrxConfig."""
    from dbrx.config import PRESETS, DbrxConfig

    if name_or_dir in PRESETS:
        return DbrxConfig.from_preset(name_or_dir, **(overrides or {}))
    if os.path.isdir(name_or_dir):
        cfg = DbrxConfig.load(os.path.join(name_or_dir, "config.json"))
        if overrides:
            raise ValueError("overrides apply to presets only, not to a checkpoint directory")
        return cfg
    raise ValueError(f"{name_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model DIR, --device, --dtype, --allow-nonfinite, --adapter DIR: loading a checkpoint for inference."""
    p.add_argument("--model", required=required, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or infinity (refused by default)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (as `dbrx finetune` with lora.* writes it), applied "
                        "unmerged on top of --model (float or quantized)")


def load_model(args):
    """The model of `add_model_args` (float or quantized), in eval mode; the device is checked before anything is
    read."""
    from dbrx.loading import load_pretrained

    return load_pretrained(args.model, device=args.device, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite,
                           adapter=getattr(args, "adapter", None))
