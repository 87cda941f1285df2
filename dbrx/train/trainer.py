"""The training loop shared by `dbrx pretrain` and `dbrx finetune`.

One optimizer step: the loader's global batch, this rank's slice (`loader.shard`), micro batches with gradient
accumulation, each micro batch's LM loss weighted by its share of the global batch's loss-carrying tokens (so
any split over micro batches and ranks gives the single-process result), the load-balancing and z losses averaged
over micro batches, gradient clipping over the (possibly sharded) parameters, a non-finite check that skips the
step, then the optimizer with the scheduled learning rate. Around it: checkpoints, metrics, evaluation on a
held-out split, Ctrl-C handling, and at the end the Hugging Face-format export, the loss plot and a sample.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from dbrx import fsutil
from dbrx.config import DbrxConfig
from dbrx.model import DbrxForCausalLM
from dbrx.parallel import fsdp
from dbrx.parallel.activation_checkpoint import apply_activation_checkpointing
from dbrx.parallel.compile import compile_blocks

from . import train_checkpoint as ckpt_lib
from .config import OptimSection, TrainConfig, resolve_path
from .metrics import MetricsLogger, detect_peak_flops, memory_gb, progress_line


class TrainingError(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); the message says why and where to resume."""


# ---- optimizer ----------------------------------------------------------------------------------------------
class LionW(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay.

    Per step, with gradient g and momentum m:
        p <- p * (1 - lr * wd)
        p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"LionW lr must be positive, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LionW betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def no_decay(name: str) -> bool:
    """Norm weights and the input embedding are not weight-decayed."""
    return "norm" in name or name.endswith("wte.weight")


def build_optimizer(model: nn.Module, o: OptimSection) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not no_decay(n)]
    other = [p for n, p in model.named_parameters() if p.requires_grad and no_decay(n)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if o.name == "lionw":
        return LionW(groups, lr=o.lr, betas=tuple(o.betas))
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_at(step: int, steps: int, o: OptimSection) -> float:
    """Learning rate of (0-based) `step`: linear warmup, then cosine / linear decay to lr * min_lr_ratio."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
    if o.schedule == "cosine":
        scale = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        scale = 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * scale)


# ---- helpers ------------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig) -> DbrxConfig:
    if cfg.model.checkpoint:
        path = resolve_path(cfg.model.checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"model.checkpoint: {path} is not a checkpoint directory")
        return DbrxConfig.load(path / "config.json")
    try:
        return DbrxConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.overrides: {e}") from None


def seed_everything(seed: int, rank: int | None = None, step: int = 0) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's `random` with `seed`, or with `rank`: that rank's own stream,
    derived from (seed, rank, step), so that ranks draw different dropout and jitter noise, reproducibly."""
    if rank is not None:
        seed = int(np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1, np.uint64)[0])
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS (CPU training only).

    Each step allocates and frees logits of tokens x 100352 floats (hundreds of MB); by default glibc serves such
    blocks with fresh mmaps, so every step pays page faults to zero them again (measured on the demo: 1.0-1.2 s a
    step -> 0.78-0.85 s). A no-op where glibc's mallopt is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 2**31 - 1)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError):
        pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("DBRX_CACHE", Path.home() / ".cache" / "dbrx")) / "prepared"


# ---- trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Build everything from a TrainConfig (validated first), then `fit()`."""

    def __init__(self, cfg: TrainConfig, task: str = "pretrain", resume: str | None = None,
                 overwrite: bool = False) -> None:
        assert task in ("pretrain", "finetune")
        self.cfg, self.task = cfg, task
        self.dist = fsdp.init_distributed()
        cfg.validate(self.dist.world, task)
        self.mcfg = model_config(cfg)
        t = cfg.train
        if t.seq_len > self.mcfg.max_seq_len:
            raise ValueError(f"train.seq_len ({t.seq_len}) exceeds the model's max_seq_len ({self.mcfg.max_seq_len})")
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = cfg.checkpoint_dir
        # one writer per run directory, for the trainer's whole life (the ranks of one torchrun job are one
        # writer: rank 0 holds it); taken before anything in the run directory is looked at or changed
        self._lock = (fsutil.lock_dir(self.run_dir, f"run directory {self.run_dir}", inside=True)
                      if self.dist.is_main else None)
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: str | None, overwrite: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        self._check_run_dir(resume, overwrite)
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()
            torch.set_num_threads(t.num_threads or max(1, _cpu_count() // self.dist.local_world))
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.accum = t.global_batch // (t.micro_batch * self.dist.world)
        self.log = MetricsLogger(self.run_dir, self.dist.is_main, cfg.log.tensorboard, cfg.log.mlflow, cfg.to_dict())

        seed_everything(t.seed)
        self.loader, self.eval_sets = self._build_data()
        self.icl = self._icl_tasks()
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        seed_everything(t.seed, self.dist.rank)  # after the model's initialisation, which every rank shares
        self.peak_flops = detect_peak_flops(self.device, cfg.log.peak_flops)
        self.flops_per_token = self.mcfg.flops_per_token(t.seq_len)
        self.start_step = 0
        self.resumed_from: str | None = None
        if resume is not None:
            self._resume(resume)
        self._stop_signal: int | None = None
        self._stop_time = 0.0

    # ---- setup --------------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: str | None, overwrite: bool) -> None:
        """A fresh run (no --resume) must not mix with the output of an earlier one: refuse, or with --overwrite
        delete it (checkpoints, metrics, the exported model, the pictures)."""
        earlier = [p for p in (self.run_dir / "metrics.jsonl", self.run_dir / "final") if p.exists()]
        if ckpt_lib.list_checkpoints(self.ckpt_dir):
            earlier.insert(0, self.ckpt_dir)
        if resume is None and earlier and not overwrite:
            raise ValueError(f"{self.run_dir} already holds the output of an earlier run ({earlier[0]}); pass "
                             f"--resume to continue it, --overwrite to start again, or choose another run_dir")
        if overwrite and resume is None and self.dist.is_main:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            shutil.rmtree(self.run_dir / "final", ignore_errors=True)
            for name in ("metrics.jsonl", "loss.png", "expert_load.png", "icl.png"):
                (self.run_dir / name).unlink(missing_ok=True)
        fsdp.barrier()

    def _build_data(self):
        t, e = self.cfg.train, self.cfg.eval
        if self.task == "finetune":
            return self._build_sft()
        from .data import MixtureLoader, PackedSequences, TokenDataset, split_documents

        streams, eval_sets = {}, {}
        for name, s in self.cfg.data.streams.items():
            ds = TokenDataset(self._prepared_dir(name, s))
            docs = None
            if e.fraction > 0:
                docs, held = split_documents(ds.num_documents, e.fraction, t.seed)
                eval_sets[name] = (ds, held)
            streams[name] = PackedSequences(ds, t.seq_len, seed=t.seed, documents=docs)
        schedule = self.cfg.data.schedule or [{"until": 1.0, "weights": {n: 1.0 for n in streams}}]
        loader = MixtureLoader(streams, schedule, t.steps, t.global_batch, seed=t.seed)
        return loader, eval_sets

    def _prepared_dir(self, name: str, s) -> Path:
        if s.prepared:
            return resolve_path(s.prepared)
        from .data import prepare

        paths = [resolve_path(p) for p in s.paths]
        key = json.dumps([[str(p.resolve()) for p in paths], s.format, s.text_field, s.split])
        cache = Path(self.cfg.data.cache_dir).expanduser() if self.cfg.data.cache_dir else default_cache_dir()
        out = cache / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        if self.dist.is_main:
            start = time.perf_counter()
            res = prepare(paths, out, fmt=s.format, text_field=s.text_field, split=s.split,
                          workers=self.cfg.data.workers)
            self.log.print(f"data stream {name}: {res['documents']:,} documents, {res['tokens']:,} tokens "
                           f"({res['status']}, {time.perf_counter() - start:.1f} s) in {out}")
        fsdp.barrier()
        return out

    def _build_sft(self):
        from dbrx.tokenizer import DEFAULT_SYSTEM_PROMPT

        from .sft import SFTLoader, load_chat_jsonl

        t, e, d = self.cfg.train, self.cfg.eval, self.cfg.data
        convs = [c for p in d.sft for c in load_chat_jsonl(resolve_path(p))]
        system = DEFAULT_SYSTEM_PROMPT if d.system_prompt == "default" else d.system_prompt
        held: list = []
        if e.fraction > 0:
            order = np.random.default_rng([t.seed, 0x5F7E]).permutation(len(convs))
            n_val = max(1, round(e.fraction * len(convs)))
            if n_val >= len(convs):
                raise ValueError(f"eval.fraction {e.fraction} leaves no training conversations (of {len(convs)})")
            held = [convs[i] for i in sorted(order[:n_val])]
            convs = [convs[i] for i in sorted(order[n_val:])]
        loader = SFTLoader(convs, t.seq_len, t.global_batch, seed=t.seed, system_prompt=system)
        self.sft_system = system
        return loader, ({"chat": held} if held else {})

    def _build_model(self) -> nn.Module:
        from dbrx.parallel.init import init_weights

        t = self.cfg.train
        loaded = bool(self.cfg.model.checkpoint)
        if loaded and self._quantized_base():  # QLoRA: the quantized layers stay quantized (CPU kernels)
            from dbrx.quant import load_quantized

            model = load_quantized(resolve_path(self.cfg.model.checkpoint), dtype=torch.float32, device="cpu")
        elif loaded:
            model = DbrxForCausalLM.from_pretrained(resolve_path(self.cfg.model.checkpoint), dtype=torch.float32,
                                                    device="cpu")
        else:  # nothing allocated yet: each rank materialises only its own shards, after sharding
            model = DbrxForCausalLM.from_config(self.mcfg, device="meta")
        if self.cfg.lora is not None:  # adapters (the same on every rank: seeded alike) on the frozen base
            from dbrx.lora import apply_lora

            apply_lora(model, self.cfg.lora)
        apply_activation_checkpointing(model, t.activation_checkpointing)
        if t.compile:
            compile_blocks(model)  # after activation checkpointing: the checkpoint sits inside the compiled region
        if self.dist.distributed:
            fsdp.shard_model(model, bf16=self.bf16)  # a loaded model's shards move to this rank's device
        if not loaded:
            model.to_empty(device=self.device)
            # the same full weights for any number of ranks (and devices): each block of values has its own seed
            init_weights(model, t.seed, self.mcfg.initializer_range)
        elif not self.dist.distributed:
            model.to(self.device)
        model.train()
        return model

    def _quantized_base(self) -> bool:
        """Whether model.checkpoint was written by `dbrx quantize`: trainable with LoRA only (QLoRA), on one CPU
        process (the quantized kernels are torch's CPU ones); ValueError otherwise."""
        from dbrx.hf_checkpoint import quantization_config

        if quantization_config(resolve_path(self.cfg.model.checkpoint)) is None:
            return False
        if self.cfg.lora is None:
            raise ValueError("model.checkpoint is quantized: it can only be fine-tuned with LoRA adapters (QLoRA: "
                             "set lora.rank / lora.targets), or fully from its float checkpoint")
        if self.dist.distributed or self.device.type != "cpu":
            raise ValueError(f"QLoRA (a quantized model.checkpoint) runs in one CPU process (torch's CPU quantized "
                             f"kernels); got {self.dist.world} process(es) on {self.device}")
        return True

    def _resume(self, resume: str) -> None:
        ckpt = ckpt_lib.resolve_resume(resume, self.ckpt_dir)
        state = ckpt_lib.apply_checkpoint(ckpt, self.model, self.optimizer, self.cfg.optim.name)
        self.loader.load_state_dict(state["loader"])
        self.start_step = int(state["step"])
        if not ckpt_lib.restore_rng(ckpt):
            seed_everything(self.cfg.train.seed, self.dist.rank, self.start_step)
            self.log.print(f"note: {ckpt['path']} was written by {state.get('world', 1)} process(es), this run has "
                           f"{self.dist.world}: each rank's random state is reseeded from (seed, rank, step)")
        self.resumed_from = str(ckpt["path"])
        self.log.resume_at(self.start_step)  # the steps after the checkpoint are run again: drop their records
        self.log.print(f"resumed from {ckpt['path']} at step {self.start_step}")
        self.log.log({"event": "resume", "step": self.start_step, "path": str(ckpt["path"])})

    # ---- one step -----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.bf16 and not self.dist.distributed:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self, local: dict[str, torch.Tensor]):
        mb = self.cfg.train.micro_batch
        for i in range(self.accum):
            yield i, {k: v[i * mb : (i + 1) * mb].to(self.device, non_blocking=True) for k, v in local.items()}

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimizer step `step` (0-based) and return its metrics."""
        t, world = self.cfg.train, self.dist.world
        start = time.perf_counter()
        batch = self.loader.batch(step)
        n_global = max(int((batch["labels"] != -100).sum()), 1)
        # router statistics count real tokens only: each micro batch's load-balancing and z losses (and expert
        # load) weigh by its share of the global batch's real tokens, so padding, even a whole micro batch of
        # it, changes nothing
        mask = batch.get("attention_mask")
        real_global = max(int(mask.sum()) if mask is not None else batch["input_ids"].numel(), 1)
        local = self.loader.shard(batch, self.dist.rank, world)
        L = self.mcfg.n_layers
        parts = torch.zeros(3 + L, device=self.device)  # lm (token-weighted), lb, z, per-layer balance
        load = torch.zeros(L, self.mcfg.ffn_config.moe_num_experts, device=self.device)  # (L, E)
        moe_w = self.mcfg.ffn_config.moe_loss_weight
        poison = (step + 1) in t.debug_nan_steps
        for i, mb in self._micro_batches(local):
            if self.dist.distributed:
                self.model.set_requires_gradient_sync(i == self.accum - 1)
            with self._autocast():
                out = self.model.compute_loss(mb["input_ids"], mb["labels"], attention_mask=mb.get("attention_mask"),
                                              doc_ids=mb["doc_ids"], shift=False, z_loss_weight=t.z_loss_weight,
                                              load_balancing=t.load_balancing)
            lm = out.lm_loss * (out.n_tokens / n_global)
            share = out.n_routed / real_global  # this micro batch's share of the real tokens
            obj = lm + (moe_w * out.lb_loss + t.z_loss_weight * out.z_loss) * share
            if poison:
                obj = obj * float("nan")
            (obj * world).backward()  # FSDP averages gradients over ranks: scale back to a sum
            parts += torch.cat([lm.detach()[None], torch.stack([out.lb_loss.detach(), out.z_loss.detach()]) * share,
                                out.lb_per_layer.float() * share])
            load += out.expert_load.float() * share
        fsdp.all_reduce_sum(parts)
        fsdp.all_reduce_sum(load)
        lr = lr_at(step, t.steps, self.cfg.optim)
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lm_loss, lb_loss, z_loss, *lb_layers = parts.tolist()
        if poison:
            lm_loss = float("nan")
        loss = lm_loss + moe_w * lb_loss + t.z_loss_weight * z_loss
        grad_norm = float(grad_norm)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - start
        tokens = t.global_batch * t.seq_len
        tps = tokens / dt
        mfu = self.flops_per_token * tps / (self.peak_flops * world) if self.peak_flops else None
        return {
            "step": step + 1, "loss": loss, "lm_loss": lm_loss, "lb_loss": lb_loss, "z_loss": z_loss, "lr": lr,
            "grad_norm": grad_norm, "skipped": not finite, "tokens": (step + 1) * tokens, "step_time": dt,
            "tokens_per_s": tps, "mfu": mfu, "mem_gb": memory_gb(self.device),
            "lb_per_layer": lb_layers,  # each layer's E * sum_e f_le * P_le (1.0 = balanced)
            "expert_load_max": load.max(-1).values.tolist(), "expert_load_min": load.min(-1).values.tolist(),
            "_expert_load": load,
        }

    # ---- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted LM loss on each held-out set (the same windows every time)."""
        t, world = self.cfg.train, self.dist.world
        rows = t.micro_batch * world
        results = {}
        self.model.eval()
        for name, held in self.eval_sets.items():
            sums = torch.zeros(2, device=self.device)  # summed loss, tokens
            for batch in self._eval_batches(held, rows):
                local = self.loader.shard(batch, self.dist.rank, world)
                mb = {k: v.to(self.device) for k, v in local.items()}
                with self._autocast():
                    out = self.model.compute_loss(mb["input_ids"], mb["labels"], doc_ids=mb["doc_ids"], shift=False,
                                                  attention_mask=mb.get("attention_mask"))
                sums += torch.stack([out.lm_loss.float() * out.n_tokens, out.n_tokens.float()])
            fsdp.all_reduce_sum(sums)
            results[name] = float(sums[0] / sums[1].clamp_min(1))
        fsdp.reshard_all(self.model)
        self.model.train()
        return results

    def _eval_batches(self, held, rows: int):
        t, n = self.cfg.train, self.cfg.eval.batches
        if self.task == "finetune":
            from .sft import SFTLoader

            loader = SFTLoader(held, t.seq_len, rows, seed=t.seed, system_prompt=self.sft_system)
            for i in range(n):
                yield loader.batch(i)
            return
        from .data import PackedSequences, _to_batch

        ds, docs = held
        seqs = PackedSequences(ds, t.seq_len, seed=t.seed, documents=docs)
        for _ in range(n):
            tokens, doc_ids = zip(*(seqs.next() for _ in range(rows)))
            yield _to_batch(np.stack(tokens), np.stack(doc_ids))

    # ---- the loop -----------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            # a second Ctrl-C stops now; one within a second is the same request delivered twice (e.g. a SIGTERM
            # from SLURM to every process, then the same one forwarded by torchrun to its workers)
            if time.monotonic() - self._stop_time > 1.0:
                raise KeyboardInterrupt
            return
        self._stop_signal, self._stop_time = signum, time.monotonic()
        self.log.print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)")

    def save(self, step: int) -> Path:
        extra = {"task": self.task, "config": self.cfg.to_dict(), "model_config": self.mcfg.to_hf_dict()}
        path = ckpt_lib.save_checkpoint(self.ckpt_dir, step, self.model, self.optimizer, self.loader.state_dict(),
                                        extra=extra, keep=self.cfg.checkpoint.keep)
        self._last_save = (step, path)
        self.log.log({"event": "checkpoint", "step": step, "path": str(path)})
        return path

    def fit(self) -> dict[str, Any]:
        """Train from `start_step` to `train.steps`; returns a summary (final loss, interrupted, paths)."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        n = self.mcfg.num_params()
        self.log.log({"event": "start", "step": self.start_step, "task": self.task, "world": self.dist.world,
                      "device": str(self.device), "bf16": self.bf16, "params": n["total"], "active": n["active"],
                      "peak_flops": self.peak_flops, "flops_per_token": self.flops_per_token})
        self.log.print(f"{self.task}: {n['total'] / 1e6:.1f}M parameters ({n['active'] / 1e6:.1f}M active), "
                       f"{t.steps} steps x {t.global_batch} x {t.seq_len} tokens, {self.dist.world} process(es) on "
                       f"{self.device.type}{' bf16' if self.bf16 else ' fp32'}, accumulation {self.accum}; "
                       f"run dir {self.run_dir}")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        start, nan_streak, last = time.perf_counter(), 0, None
        last_saved = self.start_step
        try:
            for step in range(self.start_step, t.steps):
                m = self.train_step(step)
                load = m.pop("_expert_load")
                done = step + 1
                if m["skipped"]:
                    nan_streak += 1
                    self.log.print(f"step {done}: non-finite loss {m['loss']} / grad norm {m['grad_norm']}: "
                                   f"step skipped ({nan_streak} in a row)")
                    self.log.log({"event": "nan_skip", "step": done, "loss": m["loss"], "grad_norm": m["grad_norm"]})
                    if nan_streak >= t.max_nan_skips:
                        saved = ckpt_lib.list_checkpoints(self.ckpt_dir)
                        where = f"; the last good checkpoint is {saved[-1]}" if saved else ""
                        raise TrainingError(f"stopping at step {done}: {nan_streak} non-finite steps in a row "
                                            f"(train.max_nan_skips = {t.max_nan_skips}){where}")
                else:
                    nan_streak = 0
                    last = m
                if done % cfg.log.expert_load_interval == 0 or done == t.steps:
                    m["expert_load"] = load.tolist()
                if done % cfg.log.interval == 0 or done == t.steps:
                    if hasattr(self.loader, "realised"):
                        m["mix"] = self.loader.realised()
                    self.log.print(progress_line(done, t.steps, m, time.perf_counter() - start, self.start_step))
                self.log.log(m)
                if (self.eval_sets or self.icl) and cfg.eval.interval and done % cfg.eval.interval == 0 \
                        and done < t.steps:
                    self._log_eval(done)
                stop = self._should_stop()
                periodic = cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and not nan_streak
                if periodic or stop:
                    self.save(done)
                    last_saved = done
                if stop:
                    self.log.print(f"interrupted: checkpoint saved at step {done} in {self.ckpt_dir}; continue with "
                                   f"--resume")
                    self.log.log({"event": "interrupted", "step": done})
                    return {"interrupted": True, "step": done, "run_dir": str(self.run_dir)}
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        if cfg.checkpoint.interval and last_saved != t.steps and self.start_step < t.steps:
            self.save(t.steps)
        summary = {"interrupted": False, "step": t.steps, "run_dir": str(self.run_dir),
                   "wall_s": time.perf_counter() - start, "final": last}
        if self.eval_sets or self.icl:
            summary["eval"] = self._log_eval(t.steps)
        self.log.log({"event": "end", "step": t.steps, "wall_s": summary["wall_s"]})
        return summary

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.device)
        return bool(fsdp.all_reduce_max(flag).item())

    def _log_eval(self, step: int) -> dict[str, float]:
        res = self.evaluate()
        icl = self.evaluate_icl() if self.icl else {}
        self.log.log({"event": "eval", "step": step, **{f"eval_loss_{k}": v for k, v in res.items()}, **icl})
        self.log.print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in {**res, **icl}.items()
                                                             if not k.startswith("icl/task/")))
        return {**res, **icl}

    def _icl_tasks(self):
        """eval.icl_tasks, read and checked now: a bad task file stops the run before it starts."""
        if not self.cfg.eval.icl_tasks:
            return None
        from dbrx.eval import icl

        specs = icl.select_tasks(self.cfg.eval.icl_tasks)
        checked = icl.check_tasks(specs)
        if checked[1]:
            raise ValueError(f"eval.icl_tasks: {checked[1][0].error}")
        return specs, checked

    @torch.no_grad()
    def evaluate_icl(self) -> dict[str, float]:
        """The ICL tasks' accuracies and Gauntlet scores: icl/task/<label>, icl/<category>, icl/overall."""
        from dbrx.eval import gauntlet, icl
        from dbrx.tokenizer import get_tokenizer

        specs, checked = self.icl
        # under FSDP every rank scores every item (the same calls on every rank keep the gathers in step)
        with self._autocast(), fsdp.root_gathered(self.model):
            report = icl.run_tasks(self.model, get_tokenizer(), specs, limit=self.cfg.eval.icl_limit,
                                   checked=checked)
        self.model.train()
        for f in report.failures:
            self.log.print(f"ICL task {f.label} failed: {f.error}")
        res = gauntlet.score(report.results)
        out = {f"icl/task/{k}": r["accuracy"] for k, r in res["tasks"].items()}
        out.update({f"icl/{c}": v["score"] for c, v in res["categories"].items()})
        out["icl/overall"] = res["overall"]
        return out

    # ---- the end ------------------------------------------------------------------------------------------
    def export(self, out: str | os.PathLike | None = None) -> Path | None:
        """Write the trained model in the Hugging Face layout (with LoRA: the adapter, in PEFT's format); returns
        `out` (None on ranks other than 0).

        Under FSDP (call on every rank) nothing is gathered: the ranks write a sharded checkpoint of this step
        (unless the last save was of it) and rank 0 converts it tensor by tensor. With checkpoints off
        (checkpoint.interval 0) that checkpoint is removed again.
        """
        out = Path(out) if out else self.run_dir / "final"
        self._full = None
        if self.cfg.lora is not None:  # the adapter in PEFT's format (gathered from the ranks), not a model
            from dbrx.lora import save_adapter

            save_adapter(self.model, out, self.cfg.lora, base_model=str(resolve_path(self.cfg.model.checkpoint)),
                         write=self.dist.is_main)
            fsdp.barrier()
        elif not self.dist.distributed:
            self.model.save_pretrained(out)
        else:
            step = self.loader.step
            last = getattr(self, "_last_save", None)
            reuse = last is not None and last[0] == step
            path = last[1] if reuse else self.save(step)
            temporary = not reuse and not self.cfg.checkpoint.interval

            def convert() -> None:
                if self.dist.is_main:
                    ckpt_lib.export_hf(path, out, config=self.mcfg)
                    if temporary:
                        shutil.rmtree(path)

            ckpt_lib.everywhere(convert)
            if temporary:
                self._last_save = None
        self._exported = out
        self.log.print(f"saved the {'adapter' if self.cfg.lora is not None else 'model'} to {out}")
        return out if self.dist.is_main else None

    def unsharded_model(self) -> DbrxForCausalLM | None:
        """The model itself (single process) or, under FSDP, a full CPU copy on rank 0 read back from the export
        (call `export()` first; None on the other ranks)."""
        if not self.dist.distributed:
            return self.model
        if not self.dist.is_main:
            return None
        if getattr(self, "_full", None) is None:
            if getattr(self, "_exported", None) is None:
                raise RuntimeError("unsharded_model() of a sharded model needs export() first")
            if self.cfg.lora is not None:  # the base with the exported adapter
                from dbrx.lora import load_adapter

                base = DbrxForCausalLM.from_pretrained(resolve_path(self.cfg.model.checkpoint), dtype=torch.float32)
                self._full = load_adapter(base, self._exported).eval()
            else:
                self._full = DbrxForCausalLM.from_pretrained(self._exported, dtype=torch.float32, device="cpu")
        return self._full

    def sample(self) -> str | None:
        """A sample from the trained model (rank 0; call after export under FSDP)."""
        if not self.dist.is_main:
            return None
        from dbrx.generate import generate_text
        from dbrx.sampling import SamplingParams
        from dbrx.tokenizer import get_tokenizer

        s = self.cfg.sample
        model = self.unsharded_model()
        params = SamplingParams(temperature=s.temperature, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                                seed=self.cfg.train.seed)
        if self.task == "finetune":  # the same chat template (and system prompt) as the training data
            return generate_text(model, get_tokenizer(), s.prompt, params, chat=True, system_prompt=self.sft_system)
        return generate_text(model, get_tokenizer(), s.prompt, params)

    def close(self) -> None:
        """Close the metrics and release the run directory (also after a failed __init__; safe to repeat)."""
        if hasattr(self, "log"):
            self.log.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


__all__ = ["Trainer", "TrainingError", "LionW", "build_optimizer", "lr_at", "no_decay", "model_config"]
