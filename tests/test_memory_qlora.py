"""`dbrx bench train --estimate-memory --lora R --qlora 8|4`: the QLoRA step traced on fake tensors.

The quantized weights' bytes are checked against arithmetic on the config (the kernels' layouts, dbrx.quant.formats):
int8 (out, in) codes and a bf16 scale per row; int4 in torch's CPU kernel layout, the output dim padded to 16 and
the input dim to whole groups, half a byte per code and a bf16 (scale, zero) pair per group and row; the embedding
keeps the checkpoint layout (ceil(in / 2) bytes a row for int4).
"""

from __future__ import annotations

import json

import pytest
import torch

from dbrx.bench import run_bench
from dbrx.cli import main
from dbrx.config import DbrxConfig
from dbrx.kernels import experts
from dbrx.lora import LoraConfig
from dbrx.memory import estimate_peak

# one layer, 4 experts: a few seconds per traced step (the quantized experts run one expert at a time)
SMALL = {"vocab_size": 512, "n_layers": 1, "moe_num_experts": 4}
EST = dict(batch=1, seq_len=16, estimate_memory=True, checkpointing="full", optimizer="adamw")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def quantized_bytes(cfg: DbrxConfig, bits: int, group: int | None, targets) -> int:
    L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    F, E = cfg.ffn_config.ffn_hidden_size, cfg.ffn_config.moe_num_experts
    qkv = D + 2 * cfg.attn_config.kv_n_heads * (D // cfg.n_heads)

    def matrix(out: int, k: int) -> int:  # a quantized matmul's weight, as its kernel reads it
        if bits == 8:
            return out * k + 2 * out
        n, ng = _ceil(out, 16) * 16, _ceil(k, group)
        return n * ng * group // 2 + ng * n * 2 * 2

    def rows(n: int, k: int) -> int:  # the embedding: the checkpoint layout
        return n * k + 2 * n if bits == 8 else n * _ceil(k, 2) + n * _ceil(k, group) * 2 * 2

    total = 0
    if "attn" in targets:
        total += L * (matrix(qkv, D) + matrix(D, D))
    if "experts" in targets:
        total += L * E * (matrix(2 * F, D) + matrix(D, F))  # gate and up fused (2F, D); down as (D, F)
    if "lm_head" in targets:
        total += matrix(V, D)
    if "embedding" in targets:
        total += rows(V, D)
    return total


def quantized_params(cfg: DbrxConfig, targets) -> int:
    """Float parameters that quantization replaces."""
    L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    F, E = cfg.ffn_config.ffn_hidden_size, cfg.ffn_config.moe_num_experts
    qkv = D + 2 * cfg.attn_config.kv_n_heads * (D // cfg.n_heads)
    return (L * (qkv * D + D * D) * ("attn" in targets) + L * 3 * E * F * D * ("experts" in targets)
            + V * D * ("lm_head" in targets) + V * D * ("embedding" in targets))


@pytest.mark.parametrize("bits, group, targets", [
    (8, None, None),
    (4, 32, None),
    (4, 64, ("attn", "experts", "lm_head", "embedding")),
    (8, None, ("experts", "lm_head", "embedding")),
])
def test_qlora_estimate_counts_the_quantized_weights_exactly(bits, group, targets):
    cfg = DbrxConfig.from_preset("dbrx-tiny", **SMALL)
    lora = LoraConfig(rank=4, alpha=8)
    r = run_bench("train", "dbrx-tiny", overrides=SMALL, lora=lora, qlora=bits, group_size=group,
                  quant_targets=targets, dtype="fp32", **EST)
    used = targets or ("attn", "experts")  # `dbrx quantize`'s default
    assert r["qlora"] == {"bits": bits, "group_size": group, "targets": list(used)}
    assert r["quantized_weights_gb"] * 1e9 == pytest.approx(quantized_bytes(cfg, bits, group, used), abs=0.5)
    # the float parameters left (norms, router, what is not quantized) and the adapters, in fp32
    float_params = cfg.num_params()["total"] - quantized_params(cfg, used) + r["trainable_params"]
    assert r["params_gb"] * 1e9 == pytest.approx(4 * float_params, abs=0.5)
    assert r["optimizer_state_gb"] * 1e9 == pytest.approx(8 * r["trainable_params"], abs=0.5)
    floor = r["params_gb"] + r["quantized_weights_gb"] + r["optimizer_state_gb"]
    assert floor < r["estimated_peak_memory_gb"] < floor + 0.01  # plus the step's activations (small here)
    assert "balanced" in r["estimate"]


@pytest.mark.skipif(experts._gmm is None, reason="the float step is traced through torch._grouped_mm")
def test_qlora_below_lora_below_full_fine_tuning():
    # wide enough for the weights to outweigh the quantized path's fp32 temporaries
    kw = dict(overrides={**SMALL, "n_layers": 2, "d_model": 128, "ffn_hidden_size": 256}, **EST)
    full = run_bench("train", "dbrx-tiny", **kw)["estimated_peak_memory_gb"]
    lora = run_bench("train", "dbrx-tiny", lora=LoraConfig(rank=8, alpha=16), **kw)  # rank 8: 16-byte aligned
    q8 = run_bench("train", "dbrx-tiny", lora=LoraConfig(rank=8, alpha=16), qlora=8, **kw)
    assert q8["trainable_params"] == lora["trainable_params"]
    assert q8["estimated_peak_memory_gb"] < lora["estimated_peak_memory_gb"] < full, (q8, lora, full)


def test_a_measured_qlora_step_on_the_cpu():
    r = run_bench("train", "dbrx-tiny", overrides=SMALL, batch=1, seq_len=16, dtype="fp32", steps=1, warmup=0,
                  device="cpu", lora=LoraConfig(rank=4, alpha=8, targets=["Wqkv", "out_proj"]), qlora=4,
                  group_size=32)
    assert r["qlora"] == {"bits": 4, "group_size": 32, "targets": ["attn", "experts"]} and r["tokens_per_s"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(qlora=8), "--qlora quantizes the frozen base of a LoRA step: add --lora"),
    (dict(qlora=3, lora=LoraConfig()), "bits must be 8 or 4, got 3"),
    (dict(group_size=32), "add --qlora BITS"),
    (dict(qlora=8, group_size=32, lora=LoraConfig()), "int4 only"),
    (dict(qlora=4, group_size=48, lora=LoraConfig()), "32, 64, 128, 256"),
    (dict(qlora=8, quant_targets=("router",), lora=LoraConfig()), "quantization targets"),
    (dict(qlora=8, lora=LoraConfig(), compile=True), "cannot be compiled"),
])
def test_qlora_user_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        run_bench("train", "dbrx-tiny", overrides=SMALL, steps=1, warmup=0, **kwargs)
    assert "\n" not in str(e.value)


def test_qlora_cli(capsys):
    base = ["bench", "train", "--preset", "dbrx-tiny", "--override", "vocab_size=512", "--override", "n_layers=1",
            "--override", "moe_num_experts=4", "--seq-len", "16", "--estimate-memory", "--optimizer", "adamw"]
    assert main([*base, "--lora", "4", "--qlora", "4", "--group-size", "32", "--quant-targets", "attn,experts"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["qlora"] == {"bits": 4, "group_size": 32, "targets": ["attn", "experts"]}
    assert main([*base, "--qlora", "8"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith("--qlora quantizes the frozen base of a LoRA step: add --lora RANK") and "\n" not in err
    with pytest.raises(SystemExit):
        main([*base, "--lora", "4", "--qlora", "3"])
    assert "choose from 8, 4" in capsys.readouterr().err


def test_host_reads_on_fake_tensors_are_answered_by_scalar():
    def build():
        return torch.nn.Linear(4, 4), (torch.zeros(3, dtype=torch.int32),)

    def step(layer, counts):
        sizes = counts.tolist()  # a host read: fake tensors hold no values
        torch.empty(sum(sizes), 4)

    from torch._subclasses.fake_tensor import DataDependentOutputException

    with pytest.raises(DataDependentOutputException):
        estimate_peak(build, step)
    est = estimate_peak(build, step, scalar=lambda t: 5)
    assert est["peak"] == est["params"] + est["inputs"] + 15 * 4 * 4
