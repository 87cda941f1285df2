"""`dbrx bench train|prefill`: throughput, model TFLOP/s, MFU and peak memory, optionally against transformers.

Model FLOPs (DbrxConfig.flops_per_token, the one formula) follow ../shared/tools/hf_dbrx_baseline.py so that
numbers compare with REFERENCE.md:
  active matmul params P = attention + router + top-k experts + lm head (the embedding lookup is free)
  train    6 * P + 6 * n_layers * d_model * T per token (fwd + bwd, causal attention)
  prefill  2 * P per token (as the baseline); `tflops_with_attention` adds 2 * n_layers * d_model * T
A training step is forward + backward of `compute_loss` (no optimizer step, as in the baseline). Peak memory is
CUDA's max_memory_allocated (null on the CPU). MFU is against the device's dense bf16 peak (null when unknown).
With `--compare transformers`, `logits_rel_err` is |ours - theirs| / |theirs| over the last 8 positions' logits of
the benchmark's tokens (about 1e-2 in bf16 when both compute the same function); if transformers runs out of
memory, its entry says so and ours stands. `--estimate-memory` runs nothing: it traces the eager step on fake
tensors and reports its estimated peak memory (dbrx/memory.py), for any size on any machine; `--optimizer adamw`
adds the optimizer's state. `--lora RANK` benchmarks (or estimates) the step of LoRA adapters on the frozen model;
`--qlora 8|4` with it quantizes that frozen base first as `dbrx quantize` does (QLoRA: attention and experts by
default, `--quant-targets` for more; int4 in groups of `--group-size`), on the CPU as the trainer's QLoRA runs.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import statistics
import time

import torch

from .devices import parse_dtype, peak_flops, resolve_device
from .hf_checkpoint import state_dict_to_transformers, transformers_config
from .loading import cpu_decoding_layout


def peak_tflops(device: torch.device) -> float | None:
    peak = peak_flops(device)
    return peak / 1e12 if peak else None


def active_matmul_params(cfg) -> int:
    """Weights multiplied per token (dbrx.config: the one FLOP formula)."""
    return cfg.active_matmul_params()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `steps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(kind: str, step, cfg, batch: int, seq_len: int, steps: int, warmup: int, device, peak) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _time(step, steps, warmup, device)
    tokens = batch * seq_len
    # train: the config's training FLOPs (attention included); prefill: 2 * P as the baseline, and with attention
    per_token = cfg.flops_per_token(seq_len, training=True) if kind == "train" else 2 * cfg.active_matmul_params()
    out = dict(seconds_per_step=seconds, tokens_per_s=tokens / seconds, tflops=per_token * tokens / seconds / 1e12)
    if kind == "prefill":
        out["tflops_with_attention"] = cfg.flops_per_token(seq_len, training=False) * tokens / seconds / 1e12
    out["mfu"] = out["tflops"] / peak if peak else None
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return out


def _step_fn(kind: str, model, ids: torch.Tensor, hf: bool = False):
    if kind == "train":
        def step():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss if hf else model.compute_loss(ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False) if hf else model(ids)
    return step


def _last_logits(kind: str, forward) -> torch.Tensor:
    """The last 8 positions' logits (B, 8, V) as fp32 on the CPU, in the grad mode that the timed steps used."""
    with torch.set_grad_enabled(kind == "train"):  # same mode as the steps: no recompilation of compiled blocks
        return forward()[:, -8:].detach().float().cpu()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def transformers_model(model, device: torch.device, dtype: torch.dtype):
    """transformers' DbrxForCausalLM with our model's config and a copy of its weights (hf_checkpoint's adapter)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--compare transformers needs the `transformers` package") from None
    hf_cfg = transformers_config(model.config)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device), _default_dtype(dtype):
        hf = transformers.DbrxForCausalLM(hf_cfg)
    hf.load_state_dict(state_dict_to_transformers(model.state_dict()), strict=True)
    # Built under the default dtype, the parameters are already `dtype`; no `hf.to(dtype)`, which would also round
    # the rotary `inv_freq` buffers (fp32 in transformers) to bf16 and shift the logits at long positions.
    return hf


def run_bench(
    kind: str,
    preset: str = "dbrx-tiny",
    overrides: dict | None = None,
    batch: int = 1,
    seq_len: int = 128,
    dtype: str = "bf16",
    compile: bool = False,
    checkpointing: str = "none",
    steps: int = 5,
    warmup: int = 2,
    backend: str = "auto",
    device: str | None = None,
    compare: str | None = None,
    peak: float | None = None,
    seed: int = 0,
    estimate_memory: bool = False,
    lora=None,
    optimizer: str | None = None,
    qlora: int | None = None,
    group_size: int | None = None,
    quant_targets=None,
) -> dict:
    """Benchmark one `train` step or one `prefill`; returns the report (see the module docstring).

    With `estimate_memory`, nothing runs: the step is traced on fake tensors and its peak memory estimated
    (dbrx.memory), for any size on any machine. `lora` (a dbrx.lora.LoraConfig): the step of LoRA adapters on the
    frozen model. `optimizer` ('adamw' or 'lionw', estimates only): add the optimizer's fp32 state of the trainable
    parameters (two tensors each for AdamW, one for LionW), which lives through the step. `qlora` (8 or 4, with
    `lora`): QLoRA, the base quantized by dbrx.quant.quantize_model (`group_size`, `quant_targets` as there; default
    attention and experts, what `dbrx quantize` writes) before the adapters are applied; measured on the CPU only.
    """
    from .config import DbrxConfig
    from .kernels.experts import resolve_backend
    from .model import DbrxForCausalLM
    from .parallel.activation_checkpoint import MODES, apply_activation_checkpointing
    from .parallel.compile import compile_blocks

    if kind not in ("train", "prefill"):
        raise ValueError(f"bench kind must be 'train' or 'prefill', got {kind!r}")
    if compare not in (None, "transformers"):
        raise ValueError(f"--compare supports only 'transformers', got {compare!r}")
    if checkpointing not in MODES:
        raise ValueError(f"--checkpointing must be one of {', '.join(MODES)}, got {checkpointing!r}")
    for name, value in (("batch", batch), ("seq-len", seq_len), ("steps", steps)):
        if value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    cfg = DbrxConfig.from_preset(preset, **(overrides or {}))
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    torch_dtype = parse_dtype(dtype)
    if optimizer not in (None, "adamw", "lionw"):
        raise ValueError(f"--optimizer must be adamw or lionw, got {optimizer!r}")
    if lora is not None:
        lora.validate()
        if compare:
            raise ValueError("--lora cannot be compared with transformers (drop --compare)")
    quant = _qlora_spec(cfg, lora, qlora, group_size, quant_targets, compile)
    if estimate_memory:
        if compare or compile:
            raise ValueError("--estimate-memory traces our eager step only: drop --compare and --compile")
        return _estimate(kind, cfg, preset, overrides, batch, seq_len, dtype, torch_dtype, checkpointing, backend,
                         lora, optimizer, quant)
    if optimizer:
        raise ValueError("--optimizer adds optimizer state to memory estimates only (with --estimate-memory)")
    dev = resolve_device(device)
    if quant is not None and dev.type != "cpu":
        raise ValueError(f"--qlora runs on the CPU only (torch's weight-only kernels, as the trainer's QLoRA), got "
                         f"device {dev}: add --device cpu, or estimate with --estimate-memory")
    peak = peak if peak is not None else peak_tflops(dev)

    model = DbrxForCausalLM.from_config(cfg, device=dev, dtype=torch_dtype, seed=seed)
    model.train(kind == "train")
    w1 = model.transformer.blocks[0].ffn.experts.mlp.w1
    if quant is not None:  # QLoRA: quantized, then adapted (the trainer loads the quantized base, then applies LoRA)
        from .quant import quantize_model

        quantize_model(model, quant.bits, quant.group_size, quant.targets)
        model.train(kind == "train")
    if lora is not None:
        from .lora import apply_lora

        apply_lora(model, lora)
    expert_backend = resolve_backend(backend, torch.empty(1, cfg.d_model, dtype=torch_dtype, device=dev), w1)
    for block in model.transformer.blocks:
        block.ffn.backend = backend
    apply_activation_checkpointing(model, checkpointing)
    if compile:
        compile_blocks(model, fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=dev, generator=torch.Generator().manual_seed(seed)
                        ) if dev.type == "cpu" else torch.randint(0, cfg.vocab_size, (batch, seq_len), device=dev)

    report = dict(
        bench=kind, preset=preset, overrides=overrides or {}, batch=batch, seq_len=seq_len, dtype=dtype,
        device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__, date=datetime.date.today().isoformat(), compile=compile,
        checkpointing=checkpointing, backend=backend, expert_backend=expert_backend, steps=steps, warmup=warmup,
        lora=_lora_report(lora), qlora=_qlora_report(quant),
        params_total=cfg.num_params()["total"], active_matmul_params=active_matmul_params(cfg), peak_tflops=peak,
    )
    report.update(_measure(kind, _step_fn(kind, model, ids), cfg, batch, seq_len, steps, warmup, dev, peak))

    if compare == "transformers":
        import transformers

        ours = _last_logits(kind, lambda: model(ids))  # the same weights and tokens must give the same logits
        hf = transformers_model(model, dev, torch_dtype)
        del model, w1  # the comparison runs alone on the device, so that its peak memory is its own
        if compile:
            torch._dynamo.reset()  # compiled code and its caches may still hold our blocks
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        hf.train(kind == "train")
        hf_ckpt = checkpointing == "full" and kind == "train"
        if hf_ckpt:
            hf.gradient_checkpointing_enable()
        try:
            theirs = _measure(kind, _step_fn(kind, hf, ids, hf=True), cfg, batch, seq_len, steps, warmup, dev, peak)
            ref = _last_logits(kind, lambda: hf(input_ids=ids, use_cache=False).logits)
        except torch.OutOfMemoryError as e:  # ours is measured already: report theirs as failed, keep ours
            theirs, ref = dict(error="out of memory", detail=str(e).splitlines()[0][:300]), None
        theirs.update(version=transformers.__version__, checkpointing="full" if hf_ckpt else "none", compile=False)
        report["transformers"] = theirs
        if ref is not None:
            report["logits_rel_err"] = float((ours - ref).norm() / ref.norm())  # bf16: about 1e-2 when both agree
            report["ratio_tokens_per_s"] = report["tokens_per_s"] / theirs["tokens_per_s"]
            if report["peak_memory_gb"] and theirs["peak_memory_gb"]:
                report["ratio_peak_memory"] = report["peak_memory_gb"] / theirs["peak_memory_gb"]
    return report


def _lora_report(lora) -> dict | None:
    return None if lora is None else dict(rank=lora.rank, alpha=lora.alpha, targets=list(lora.targets))


def _qlora_spec(cfg, lora, bits, group_size, targets, compile):
    """The dbrx.quant.QuantSpec of `--qlora BITS [--group-size G] [--quant-targets ...]`, or None without --qlora."""
    if bits is None:
        if group_size is not None or targets is not None:
            raise ValueError("--group-size and --quant-targets set how --qlora quantizes the base: add --qlora BITS")
        return None
    if lora is None:
        raise ValueError("--qlora quantizes the frozen base of a LoRA step: add --lora RANK")
    if compile:
        raise ValueError("--qlora cannot be compiled: in a training step the quantized experts run one pair of kernel "
                         "calls per expert on its routed rows, whose counts are read on the host (data-dependent "
                         "shapes), and compile_blocks needs one whole graph per block (compiled quantized decoding "
                         "works: `dbrx bench decode --bits 8|4 --compile`)")
    from .quant import DEFAULT_TARGETS, QuantSpec

    return QuantSpec.make(cfg, bits, group_size, DEFAULT_TARGETS if targets is None else targets)


def _qlora_report(quant) -> dict | None:
    return None if quant is None else dict(bits=quant.bits, group_size=quant.group_size, targets=list(quant.targets))


def _quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes of the quantized modules' tensors (codes, scales, zeros; in the layouts the kernels read)."""
    from .quant.layers import QuantEmbedding, QuantExperts, QuantLinear

    return sum(b.numel() * b.element_size() for m in model.modules()
               if isinstance(m, (QuantLinear, QuantEmbedding, QuantExperts)) for b in m.buffers())


def _balanced_routing(cfg, tokens: int):
    """The values of the host reads of a QLoRA step, for a trace on fake tensors (which hold none): each expert's
    count of routed rows (an int32 tensor of E counts, read by the quantized experts' per-expert loop), taken as
    balanced, tokens * top_k / E each; and dbrx.quant.grad's check that torch's int4 layout permutes its codes (it
    does). Any other read is an error."""
    E, K = cfg.ffn_config.moe_num_experts, cfg.ffn_config.moe_top_k
    rows = tokens * K

    def scalar(t: torch.Tensor):
        if t.dtype == torch.bool:
            return False
        if t.dtype == torch.int32 and t.untyped_storage().nbytes() == 4 * E:  # element e of the (E,) counts
            e = t.storage_offset()
            return rows // E + (e < rows % E)
        raise ValueError(f"--estimate-memory: the step reads a {t.dtype} value on the host, which a trace on fake "
                         f"tensors cannot give")

    return scalar


@contextlib.contextmanager
def _fresh_int4_layout_cache():
    """dbrx.quant.grad caches, per int4 matrix shape, where torch's kernel layout puts each code; traced on fake
    tensors, the step must start from an empty cache, as a new process does (and count the permutations it makes),
    and leave no fake tensors in the real one."""
    from .quant import grad

    cached = grad._int4_kernel_order
    grad._int4_kernel_order = functools.lru_cache(maxsize=cached.cache_info().maxsize)(cached.__wrapped__)
    try:
        yield
    finally:
        grad._int4_kernel_order = cached


def _estimate(kind, cfg, preset, overrides, batch, seq_len, dtype, torch_dtype, checkpointing, backend, lora=None,
              optimizer=None, quant=None) -> dict:
    from .kernels.experts import resolve_backend
    from .memory import estimate_peak
    from .model import DbrxForCausalLM
    from .parallel.activation_checkpoint import apply_activation_checkpointing

    float_experts = quant is None or "experts" not in quant.targets
    w = torch.empty(1, 1, 1, dtype=torch_dtype).expand(1, cfg.ffn_config.ffn_hidden_size, cfg.d_model)  # (E, F, D)
    if float_experts and resolve_backend(backend, torch.empty(1, cfg.d_model, dtype=torch_dtype), w) == "loop":
        raise ValueError("--estimate-memory traces the grouped expert path, which needs torch >= 2.8 "
                         "(torch._grouped_mm), 16-byte aligned d_model and ffn_hidden_size, and --backend auto "
                         "or grouped_mm; the loop reference reads group sizes on the host and cannot be traced")

    sizes = dict(quantized=0)

    def build():
        with _default_dtype(torch_dtype):  # built in the dtype: `.to()` cannot swap fake parameters
            model = DbrxForCausalLM(cfg)
        if quant is not None:  # QLoRA: the real quantization, on fake weights, before the adapters
            from .quant import quantize_model

            quantize_model(model, quant.bits, quant.group_size, quant.targets)
            sizes["quantized"] = _quantized_bytes(model)
        model.train(kind == "train")
        if lora is not None:  # before checkpointing, as the trainer applies it
            from .lora import apply_lora

            apply_lora(model, lora)
        for block in model.transformer.blocks:
            block.ffn.backend = backend
        apply_activation_checkpointing(model, checkpointing)
        return model, (torch.zeros(batch, seq_len, dtype=torch.long),)

    def step(model, ids):
        if kind == "train":
            model.compute_loss(ids).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(ids)

    if quant is None:
        est = estimate_peak(build, step)
        how = "fake tensors, eager step (see dbrx/memory.py)"
    else:
        with _fresh_int4_layout_cache():
            est = estimate_peak(build, step, scalar=_balanced_routing(cfg, batch * seq_len))
        how = ("fake tensors, eager step (see dbrx/memory.py); the base quantized by dbrx.quant.quantize_model on fake "
               "weights, the quantized layers traced through torch's CPU weight-only kernels; expert routing taken "
               "as balanced (the quantized experts read their row counts on the host)")
    gb = 1e9
    trainable = est["trainable_params"]
    optim_bytes = trainable * 4 * {None: 0, "adamw": 2, "lionw": 1}[optimizer] if kind == "train" else 0
    report = dict(
        bench=kind, preset=preset, overrides=overrides or {}, batch=batch, seq_len=seq_len, dtype=dtype,
        checkpointing=checkpointing, backend=backend, torch=torch.__version__, lora=_lora_report(lora),
        qlora=_qlora_report(quant), estimate=how, params_gb=est["params"] / gb,
        trainable_params=trainable, optimizer=optimizer, optimizer_state_gb=optim_bytes / gb,
        estimated_peak_memory_gb=(est["peak"] + optim_bytes) / gb,
        largest_at_peak=[f"{t['bytes'] / gb:.2f} GB {t['tensor']}" for t in est["at_peak"]],
    )
    if quant is not None:  # the frozen base's quantized tensors (buffers, not parameters); in the peak
        report["quantized_weights_gb"] = sizes["quantized"] / gb
    return report


# ---- decode -----------------------------------------------------------------------------------------------------
DECODE_DOC = """`dbrx bench decode`: greedy decoding, ms per step, tokens/s and the weight bandwidth it implies.

The model: a preset with overrides (random weights, seed), or a checkpoint directory (float or quantized, through
dbrx.loading); `--bits 8|4` quantizes it in memory (dbrx.quant: attention, experts and the LM head by default).
Each batch size runs a random prompt of --prompt-len tokens through prefill, then --new-tokens greedy decode steps,
timed (prefill excluded), through the model's own contiguous KV cache (`setup_cache`, one forward of (B, 1) tokens
per step with `cache_pos`): at batch 1 on the CPU this direct loop measured faster than the serving engine's paged
step. A step computes the logits of its last position only (the prefill too) and no router statistics. On the CPU an
fp32 LM head is stored column-major (dbrx.loading.column_major_head, as load_pretrained does: same weights, its (V,
D) parameter a view of the contiguous transpose), the faster layout for its batch-1 matmul, and its Linear layers
are dbrx.kernels.cpu_matvec.MatvecLinear (few fp32 rows split over every thread; quantized layers use that module's
int8/int4 kernels where they fit, as everywhere). `--compile` runs the
decode step under torch.compile with static shapes (compiled in the warm-up round, which is not timed); the experts'
batch-1 loop compiles into the graph (`compiled_decode_step`). The median over --rounds is reported. bandwidth_gb_s
= weight bytes read per step / step time, where a step reads every weight once except the experts, of which only the
active ones count (top_k per layer at batch 1; the expected number of distinct experts under uniform routing, E * (1
- (1 - k/E)^B), at batch B), and the embedding, of which B rows count; KV-cache reads are not counted. With
`--compare transformers` (float weights only), transformers' DbrxForCausalLM with the same config and weights runs
`generate` (greedy, the same prompt, KV cache) in the same rounds, alternating with ours; its step time is
(time of 1 + N new tokens - time of 1 new token) / N. `same_tokens` is the share of greedy tokens it agrees on."""


def _expected_active_experts(n_experts: int, top_k: int, batch: int) -> float:
    return float(top_k) if batch == 1 else n_experts * (1 - (1 - top_k / n_experts) ** batch)


def _module_bytes(module: torch.nn.Module) -> int:
    from .model import KVCache

    total = sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
    total += 0 if isinstance(module, KVCache) else sum(t.numel() * t.element_size()
                                                       for t in module.buffers(recurse=False))
    return total + sum(_module_bytes(m) for m in module.children())


def decode_weight_bytes(model, batch: int) -> dict:
    """Bytes of weights a decode step of `batch` sequences reads (see DECODE_DOC), and the model's weight bytes."""
    cfg = model.config
    f = cfg.ffn_config
    total = _module_bytes(model)
    experts = sum(_module_bytes(b.ffn.experts) for b in model.transformer.blocks)
    wte = _module_bytes(model.transformer.wte)
    active = _expected_active_experts(f.moe_num_experts, f.moe_top_k, batch) / f.moe_num_experts
    per_step = total - experts - wte + experts * active + wte * min(1.0, batch / cfg.vocab_size)
    return dict(weight_bytes=total, weight_bytes_per_step=int(per_step))


def decode_step(model, tok: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One greedy step through the contiguous KV cache: tok (B, T), mask (B, Tmax), pos (T,) -> next ids (B,), from
    the last position's logits only, without router statistics (T > 1: the prefill)."""
    h, _ = model.hidden_states(tok, attention_mask=mask, cache_pos=pos, with_stats=False)  # (B, T, D)
    return model.lm_head(h[:, -1]).argmax(-1)  # (B, V) -> (B,)


def compiled_decode_step(model):
    """`decode_step` of `model` under torch.compile with static shapes (one graph per batch size and cache length).

    Dynamo captures scalar outputs here, so that the experts' batch-1 loop (dbrx.kernels.experts.expert_loop, float
    and quantized) compiles into the graph: the chosen ids become unbacked integers, each chosen expert's weights
    are read in place, and no expert but the chosen runs (without it the float experts would run densely, all E)."""
    step = torch.compile(lambda tok, mask, pos: decode_step(model, tok, mask, pos), dynamic=False)

    def run(tok, mask, pos):
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return step(tok, mask, pos)

    return run


@torch.no_grad()
def decode_greedy(model, prompt: torch.Tensor, new_tokens: int, step=None) -> tuple[torch.Tensor, float]:
    """prompt (B, P) -> greedy tokens (B, new_tokens + 1) (the prefill's, then one per step) and the seconds of the
    `new_tokens` decode steps, through the model's contiguous KV cache; `step` (tok, mask, pos) -> ids replaces
    `decode_step` (e.g. `compiled_decode_step(model)`)."""
    B, P = prompt.shape
    dev = prompt.device
    step = step or (lambda tok, mask, pos: decode_step(model, tok, mask, pos))
    model.setup_cache(B, P + new_tokens + 1)
    try:
        mask = torch.ones(B, P + new_tokens + 1, dtype=torch.long, device=dev)
        tok = decode_step(model, prompt, mask, torch.arange(P, device=dev))  # (B,) the prefill, eager
        out = [tok]
        positions = torch.arange(P, P + new_tokens, device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            tok = step(tok[:, None], mask, positions[i:i + 1])
            out.append(tok)
        _sync(dev)
        seconds = time.perf_counter() - t0
    finally:
        model.clear_cache()
    return torch.stack(out, dim=1), seconds


@torch.no_grad()
def _hf_greedy(hf, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """transformers' generate: (B, new_tokens + 1) tokens and the seconds of `new_tokens` decode steps (the time of
    generating 1 + new_tokens tokens less that of generating 1)."""
    def gen(n):
        _sync(prompt.device)
        t0 = time.perf_counter()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        _sync(prompt.device)
        return out[:, prompt.shape[1]:], time.perf_counter() - t0

    _, t1 = gen(1)
    toks, tn = gen(new_tokens + 1)
    return toks, tn - t1


def run_decode_bench(
    preset: str = "dbrx-tiny",
    overrides: dict | None = None,
    model_dir: str | None = None,
    batches: tuple[int, ...] = (1,),
    prompt_len: int = 16,
    new_tokens: int = 32,
    dtype: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    quant_targets: tuple[str, ...] = ("attn", "experts", "lm_head"),
    threads: int | None = None,
    rounds: int = 3,
    device: str | None = None,
    compare: str | None = None,
    seed: int = 0,
    compile: bool = False,
) -> dict:
    """Benchmark greedy decoding (DECODE_DOC); returns the report."""
    from .config import DbrxConfig
    from .model import DbrxForCausalLM

    if compare not in (None, "transformers"):
        raise ValueError(f"--compare supports only 'transformers', got {compare!r}")
    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"--batch sizes must be positive integers, got {list(batches)}")
    for name, value in (("prompt-len", prompt_len), ("new-tokens", new_tokens), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    if bits is None and group_size is not None:
        raise ValueError("--group-size needs --bits 4")
    if compare and bits is not None:
        raise ValueError("--compare transformers runs on float weights only: drop --bits")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if model_dir is not None:
            from .hf_checkpoint import quantization_config
            from .loading import load_pretrained

            if overrides:
                raise ValueError("overrides apply to presets only, not to a checkpoint directory (--model)")
            quantized_ckpt = quantization_config(model_dir) is not None
            if quantized_ckpt and (bits is not None or compare):
                raise ValueError(f"{model_dir} is a quantized checkpoint: drop --bits and --compare")
            model = load_pretrained(model_dir, device=device, dtype=dtype)
            cfg = model.config
        else:
            cfg = DbrxConfig.from_preset(preset, **(overrides or {}))
            dev = resolve_device(device)
            torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
            model = DbrxForCausalLM.from_config(cfg, device=dev, dtype=torch_dtype, seed=seed).eval()
        dev = model.transformer.norm_f.weight.device
        torch_dtype = model.transformer.norm_f.weight.dtype
        if prompt_len + new_tokens + 1 > cfg.max_seq_len:
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} + 1 exceeds max_seq_len "
                             f"{cfg.max_seq_len}")
        hf = transformers_model(model, dev, torch_dtype).eval() if compare == "transformers" else None
        if bits is not None:
            from .quant import quantize_model
            from .quant.layers import check_device

            check_device(dev)  # the CPU, or CUDA with Triton
            quantize_model(model, bits, group_size, quant_targets)
        spec = getattr(model, "quantization", None)
        layout = cpu_decoding_layout(model)  # as load_pretrained does on the CPU
        report = dict(
            bench="decode", preset=None if model_dir else preset, overrides=overrides or {}, model=model_dir,
            dtype=str(torch_dtype).removeprefix("torch."), device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            quantization=spec.to_json() if spec is not None else None, threads=torch.get_num_threads(),
            prompt_len=prompt_len, new_tokens=new_tokens, rounds=rounds, torch=torch.__version__,
            date=datetime.date.today().isoformat(), loop="direct (contiguous KV cache)", **layout,
            compile=compile, results=[],
        )
        gen = torch.Generator().manual_seed(seed)
        step_fn = compiled_decode_step(model) if compile else None
        for B in batches:
            prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=gen).to(dev)
            contenders = {"ours": lambda: decode_greedy(model, prompt, new_tokens, step_fn)}
            if hf is not None:
                contenders["transformers"] = lambda: _hf_greedy(hf, prompt, new_tokens)
            for fn in contenders.values():  # warm-up round
                fn()
            times: dict[str, list[float]] = {k: [] for k in contenders}
            tokens = {}
            for _ in range(rounds):
                for k, fn in contenders.items():  # alternating
                    tokens[k], t = fn()
                    times[k].append(t)
            wb = decode_weight_bytes(model, B)
            row = dict(batch=B, **wb)
            for k in contenders:
                step = statistics.median(times[k]) / new_tokens
                entry = dict(ms_per_step=step * 1e3, tokens_per_s=B / step,
                             bandwidth_gb_s=wb["weight_bytes_per_step"] / step / 1e9)
                if k == "ours":
                    row.update(entry)
                else:
                    row[k] = entry
            if hf is not None:
                row["ratio_tokens_per_s"] = row["tokens_per_s"] / row["transformers"]["tokens_per_s"]
                row["same_tokens"] = float((tokens["ours"] == tokens["transformers"]).float().mean())
            report["results"].append(row)
        if hf is not None:
            import transformers

            report["transformers_version"] = transformers.__version__
        return report
    finally:
        torch.set_num_threads(old_threads)
