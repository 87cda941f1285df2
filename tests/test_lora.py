"""LoRA: adapters from outside the model, per-expert factors on the grouped kernels, PEFT's format both ways, merged
checkpoints, the trainer (adapters only in checkpoints, exact resume), and one-line errors for bad input.

References are written here: a per-token, per-expert dense loop for the adapted experts, and peft + transformers
for the adapter format. peft 0.21's `target_parameters` cannot run transformers 5.x's DBRX forward unmerged
(DbrxExperts reads `self.mlp.w1` from outside the wrapped module), so expert adapters are compared through peft's
own `merge_and_unload`, which applies the same `get_delta_weight`; attention-only adapters also through peft's
unmerged forward.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see test_experts.py)

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import make_hf_model, randomize_, tiny_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dbrx import DbrxConfig  # noqa: E402
from dbrx.cli import main  # noqa: E402
from dbrx.hf_checkpoint import state_dict_to_transformers  # noqa: E402
from dbrx.kernels import experts as expert_kernels  # noqa: E402
from dbrx.lora import (  # noqa: E402
    LoraConfig,
    LoraExperts,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_checkpoint,
    merge_lora,
    save_adapter,
)
from dbrx.lora.peft_format import read_peft  # noqa: E402
from dbrx.model import DbrxForCausalLM  # noqa: E402
from dbrx.moe import Experts  # noqa: E402
from dbrx.train import train_checkpoint as ckpt_lib  # noqa: E402
from dbrx.train.config import TrainConfig, from_dict, load_config  # noqa: E402
from dbrx.train.trainer import build_optimizer  # noqa: E402

ALL = ["Wqkv", "out_proj", "router", "w1", "v1", "w2"]
HAS_GMM = expert_kernels._gmm is not None


def _triton_works() -> bool:
    if torch.cuda.is_available() or not expert_kernels.triton_supported(torch.empty(0)):
        return False
    try:
        a, b = torch.ones(4, 16), torch.ones(1, 16, 8)
        return torch.equal(expert_kernels._tg().gmm_rows(a, b, torch.tensor([0, 4], dtype=torch.int32))[0], a @ b[0])
    except Exception:  # noqa: BLE001 - an interpreter that fails is one we cannot test with
        return False


BACKENDS = [pytest.param("grouped_mm", marks=pytest.mark.skipif(not HAS_GMM, reason="no torch._grouped_mm")),
            "loop", "dense",
            pytest.param("triton", marks=[pytest.mark.slow,  # minutes in the interpreter
                                          pytest.mark.skipif(not _triton_works(), reason="no Triton interpreter")])]


def base_model(cfg=None, seed: int = 0) -> DbrxForCausalLM:
    return randomize_(DbrxForCausalLM.from_config(cfg or tiny_config()), seed).eval()


@torch.no_grad()
def randomize_B_(model, seed: int = 1, std: float = 0.1):
    """Non-zero B factors (a fresh adapter's are zero), so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def ids(n: int = 2, t: int = 12, seed: int = 0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---- the adapters ------------------------------------------------------------------------------------------
def test_fresh_adapters_leave_the_model_exactly_unchanged():
    model = base_model()
    x = ids()
    before = model(x)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL, dropout=0.1))
    assert torch.equal(model(x), before)
    names = set(lora_state_dict(model))
    assert "transformer.blocks.0.norm_attn_norm.attn.Wqkv.lora_A" in names
    assert "transformer.blocks.1.ffn.experts.lora_B.w2" in names
    B = model.transformer.blocks[0].ffn.experts.lora_B["w1"]
    A = model.transformer.blocks[0].ffn.experts.lora_A["w1"]
    assert B.shape == (8, 96, 4) and A.shape == (8, 4, 64) and not B.any()
    assert A.abs().max() <= 1 / 64**0.5 and A.std() > 0.5 / (3 * 64) ** 0.5  # PEFT's kaiming-uniform bound


def test_a_gradient_step_changes_only_adapter_tensors():
    model = base_model().train()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL))
    randomize_B_(model)  # so that A gets a gradient too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 2 * 6
    from dbrx.train.config import OptimSection

    opt = build_optimizer(model, OptimSection(name="adamw", lr=1e-2))
    model.compute_loss(ids()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    assert len(opt.state) == len(trainable)  # no optimizer state for the frozen base
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n


def _reference_experts(x, weights, idx, w1, v1, w2, ad):
    """Token by token, each routed expert with its own low-rank update x @ A_e^T @ B_e^T, in fp64."""
    x, weights = x.double(), weights.double()
    w1, v1, w2 = w1.double(), v1.double(), w2.double()
    ad = {k: (A.double(), B.double(), s) for k, (A, B, s) in ad.items()}

    def proj(name, a, w_e, e):  # a @ W_e^T (+ s * a @ A_e^T @ B_e^T); W_e given as (out, in)
        y = a @ w_e.T
        if name in ad:
            A, B, s = ad[name]
            y = y + s * (a @ A[e].T) @ B[e].T
        return y

    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            h = F.silu(proj("w1", x[n], w1[e], e)) * proj("v1", x[n], v1[e], e)  # (F,)
            acc = acc + weights[n, k] * proj("w2", h, w2[e].T, e)  # (D,)
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_per_expert_adapters_match_a_dense_per_expert_reference(backend, recompute):
    cfg = tiny_config()
    E, K, D = cfg.ffn_config.moe_num_experts, cfg.ffn_config.moe_top_k, cfg.d_model
    experts = randomize_(Experts(cfg)).requires_grad_(False)  # a frozen base, as apply_lora leaves it
    module = randomize_B_(LoraExperts(experts, {"w1": 4, "v1": 4, "w2": 8}, {"w1": 2.0, "v1": 0.5, "w2": 1.5}))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, E, generator=g)
    logits[:, 5] = -1e9  # an expert without tokens
    weights, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    x = torch.randn(20, D, generator=g)
    leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
    y = module(leaves[0], leaves[1], idx, backend=backend, recompute=recompute)
    dy = torch.randn(y.shape, generator=g)
    (y * dy).sum().backward()

    ref_leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
    ad = {n: (module.lora_A[n].detach().clone().requires_grad_(), module.lora_B[n].detach().clone().requires_grad_(),
              module.scaling[n]) for n in module.lora_A}
    mlp = experts.mlp
    ref = _reference_experts(*ref_leaves, idx, mlp.w1.detach(), mlp.v1.detach(), mlp.w2.detach(), ad)
    (ref * dy.double()).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, ref.float(), **tol)
    torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad, **tol)
    torch.testing.assert_close(leaves[1].grad, ref_leaves[1].grad, **tol)
    for n, (A, B, _) in ad.items():
        torch.testing.assert_close(module.lora_A[n].grad, A.grad, **tol)
        torch.testing.assert_close(module.lora_B[n].grad, B.grad, **tol)
    assert mlp.w1.grad is None and mlp.w2.grad is None


def test_grouped_path_is_used_and_unaligned_ranks_fall_back():
    from dbrx.kernels.lora_experts import lora_backend

    x, w = torch.zeros(3, 64), torch.zeros(8, 96, 64)
    if HAS_GMM:
        assert lora_backend("auto", x, w, [4, 8]) == "grouped_mm"
    assert lora_backend("auto", x, w, [3]) == "loop"
    if HAS_GMM:
        with pytest.raises(ValueError, match="multiple of 4") as e:
            lora_backend("grouped_mm", x, w, [3])
        one_line(e)


# ---- merging ------------------------------------------------------------------------------------------------
def test_merged_checkpoint_equals_the_adapted_model(tmp_path):
    cfg = tiny_config()
    base = base_model(cfg)
    base.save_pretrained(tmp_path / "base")
    model = randomize_B_(apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=6, targets=ALL)))
    save_adapter(model, tmp_path / "adapter", LoraConfig(rank=4, alpha=6, targets=ALL))
    x = ids()
    with torch.no_grad():
        want = model(x)
        assert (want - base(x)).abs().max() > 1e-2  # the adapter does something
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = DbrxForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merge_lora(model)(x), want, rtol=0, atol=1e-5)  # in memory, unwrapped
    assert not lora_state_dict(model)
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "cli")]) == 0
    a, b = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- PEFT's format ------------------------------------------------------------------------------------------
def _hf_twin(model: DbrxForCausalLM):
    """transformers' DbrxForCausalLM with the same (base) weights as our plain `model`."""
    hf = make_hf_model(model.config)
    hf.load_state_dict(state_dict_to_transformers(model.state_dict()))
    return hf


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loaded_by_peft_gives_our_logits(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    base = base_model()
    hf = _hf_twin(base)
    cfg = LoraConfig(rank=4, alpha=8, targets=ALL, rslora=rslora)
    model = randomize_B_(apply_lora(copy.deepcopy(base), cfg))
    save_adapter(model, tmp_path / "ad", cfg)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"]
    assert config["rank_pattern"]["ffn.experts.mlp.w1"] == 8 * 4  # E * r, block-diagonal lora_B
    x = ids()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).merge_and_unload()
        theirs = merged(input_ids=x).logits
        ours = model(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - base(x)).abs().max() > 1e-2

    # read back by dbrx: the same factors exactly (per-expert rank 4 again)
    again = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    assert again.transformer.blocks[1].ffn.experts.lora_A["w2"].shape == (8, 4, 96)
    mine, back = lora_state_dict(model), lora_state_dict(again)
    assert mine.keys() == back.keys() and all(torch.equal(mine[k], back[k]) for k in mine)


def test_attention_adapter_matches_peft_unmerged_forward(tmp_path):
    peft = pytest.importorskip("peft")
    base = base_model()
    cfg = LoraConfig(rank=3, alpha=5, rslora=True, targets=["Wqkv", "out_proj", "router"])
    model = randomize_B_(apply_lora(copy.deepcopy(base), cfg))
    save_adapter(model, tmp_path / "ad", cfg)
    x = ids()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_hf_twin(base), str(tmp_path / "ad")).eval()(input_ids=x).logits
        torch.testing.assert_close(model(x), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("targets", [ALL, ["v1", "w2"]])
def test_an_adapter_made_by_peft_gives_peft_logits_in_dbrx(tmp_path, targets):
    peft = pytest.importorskip("peft")
    base = base_model()
    modules = [{"Wqkv": "Wqkv", "out_proj": "out_proj", "router": "router.layer"}[t] for t in targets
               if t in ("Wqkv", "out_proj", "router")]
    params = [f"ffn.experts.mlp.{t}" for t in targets if t in ("w1", "v1", "w2")]
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=modules, target_parameters=params,
                             init_lora_weights=False)  # random A and B: B is dense, not block-diagonal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_hf_twin(base), config)
        pm.save_pretrained(str(tmp_path / "peft"))
        x = ids()
        with torch.no_grad():
            theirs = pm.merge_and_unload()(input_ids=x).logits
    model = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - base(x)).abs().max() > 1e-2
    experts = model.transformer.blocks[0].ffn.experts
    assert sorted(experts.lora_A) == sorted(t for t in targets if t in ("w1", "v1", "w2"))
    assert experts.lora_A["w2"].shape == (8, 3, 96)  # per-expert rank 3, lora_A shared by every expert


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=["Wqkv", "q_proj"]), "unknown target 'q_proj'"),
    (dict(targets=[]), "lora.targets"),
    (dict(rank=0), "lora.rank must be a positive integer"),
    (dict(alpha=-1.0), "lora.alpha"),
    (dict(dropout=1.0), "lora.dropout"),
    (dict(rank=9, targets=["router"]), "lora.rank 9 is larger than a dimension of router"),
    (dict(rank=65, targets=["Wqkv"]), "larger than a dimension of Wqkv"),
])
def test_bad_lora_configs_are_one_line_errors(kwargs, match):
    model = base_model()
    with pytest.raises(ValueError, match=match) as e:
        apply_lora(model, LoraConfig(**kwargs))
    one_line(e)
    assert not lora_state_dict(model)  # nothing changed


def test_an_adapter_for_another_base_is_refused(tmp_path):
    small = tiny_config(d_model=32, ffn_hidden_size=64)
    other = randomize_B_(apply_lora(base_model(small), LoraConfig(rank=4, targets=["Wqkv", "w1"])))
    save_adapter(other, tmp_path / "ad")
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \[\d+, 32\], expected \[\d+, 64\]") as e:
        load_adapter(base_model(), tmp_path / "ad")
    one_line(e)
    deeper = randomize_B_(apply_lora(base_model(tiny_config(n_layers=3)), LoraConfig(rank=4, targets=["Wqkv"])))
    save_adapter(deeper, tmp_path / "deep")
    with pytest.raises(ValueError, match="layer 2, but the base model has 2 layers") as e:
        read_peft(tmp_path / "deep", tiny_config())
    one_line(e)
    base = tmp_path / "base"
    base_model().save_pretrained(base)
    assert main(["merge-lora", str(base), str(tmp_path / "ad"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_lora_section_of_the_training_config():
    cfg = load_config("finetune-demo", ["lora.rank=16", "lora.targets=[Wqkv,w1,v1,w2]"])
    assert cfg.lora.rank == 16 and cfg.lora.targets == ["Wqkv", "w1", "v1", "w2"] and cfg.lora.alpha == 32
    cfg.validate(task="finetune")
    assert load_config("finetune-demo").lora is None
    for overrides, match in ((["lora.targets=[Wqkv,foo]"], "unknown target 'foo'"),
                             (["lora.rank=0"], "lora.rank"), (["lora.ranks=4"], "unknown config key lora.ranks"),
                             (["lora.rank=4", "model.checkpoint=null"], "set model.checkpoint")):
        with pytest.raises(ValueError, match=match) as e:
            load_config("finetune-demo", overrides).validate(task="finetune")
        one_line(e)


# ---- the trainer ----------------------------------------------------------------------------------------------
def _finetune_config(tmp_path, run: str) -> TrainConfig:
    base = tmp_path / "base"
    if not base.exists():
        cfg = DbrxConfig.from_preset("dbrx-tiny", d_model=32, ffn_hidden_size=64)  # the tokenizer's vocabulary
        DbrxForCausalLM.from_config(cfg, seed=0).save_pretrained(base)
        with open(tmp_path / "chat.jsonl", "w") as f:
            for q, a in [("What do bees make?", "Bees make honey."), ("Name a colour.", "Red is a colour."),
                         ("Capital of France?", "Paris.")] * 3:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
    return from_dict(TrainConfig, {
        "run_dir": str(tmp_path / run),
        "model": {"checkpoint": str(base)},
        "data": {"sft": [str(tmp_path / "chat.jsonl")], "system_prompt": None},
        "train": {"steps": 4, "global_batch": 4, "micro_batch": 2, "seq_len": 32, "num_threads": 1},
        "optim": {"name": "adamw", "lr": 1e-2, "schedule": "cosine", "warmup_steps": 1, "weight_decay": 0.01},
        "log": {"interval": 2, "peak_flops": None},
        "checkpoint": {"interval": 2, "keep": 2},
        "sample": {"max_new_tokens": 4},
        "lora": {"rank": 4, "alpha": 8, "targets": ["Wqkv", "w1", "v1", "w2"], "dropout": 0.05},
    })


def test_lora_finetune_checkpoints_adapters_only_and_resumes_exactly(tmp_path):
    from test_trainer import step_records, train

    cfg = _finetune_config(tmp_path, "full")
    trainer, _ = train(cfg, task="finetune")
    out = trainer.export()
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ckpt = ckpt_lib.read_checkpoint(cfg.checkpoint_dir / "step_00000002")
    stored = [k for k in ckpt["metadata"].state_dict_metadata if k.startswith("model/")]
    assert stored and all(".lora_" in k for k in stored)  # the frozen base is not in the checkpoint
    assert trainer.sample() is not None
    # `dbrx export` of a LoRA run's checkpoint: that step's adapter, the same as final/ for the last step
    assert main(["export", str(cfg.run_dir), "--step", "4", str(tmp_path / "step4")]) == 0
    a, b = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "step4" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    resumed_cfg = _finetune_config(tmp_path, "resumed")
    resumed, _ = train(resumed_cfg, task="finetune", resume=str(cfg.checkpoint_dir / "step_00000002"))
    resumed_out = resumed.export()
    first, second = step_records(cfg.run_dir), step_records(resumed_cfg.run_dir)
    assert [r["loss"] for r in first[2:]] == [r["loss"] for r in second]
    a, b = load_file(out / "adapter_model.safetensors"), load_file(resumed_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the adapter trained: the base with it differs from the base
    base = DbrxForCausalLM.from_pretrained(cfg.model.checkpoint, dtype=torch.float32).eval()
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(load_adapter(copy.deepcopy(base), out)(x), base(x))


@pytest.mark.slow
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7), reason="FSDP2 on the CPU")
def test_lora_finetune_under_fsdp_matches_one_process_and_resumes_on_one(tmp_path):
    import yaml
    from test_distributed import torchrun
    from test_trainer import step_records, train

    cfg = _finetune_config(tmp_path, "one")
    cfg.lora.dropout = 0.0  # the ranks draw their own dropout masks: compare without
    train(cfg, task="finetune")[0].export()
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torchrun(["finetune", str(config), f"run_dir={tmp_path / 'dist'}", "--no-sample"], tmp_path)
    one, dist = step_records(cfg.run_dir), step_records(tmp_path / "dist")
    assert [r["loss"] for r in dist] == pytest.approx([r["loss"] for r in one], rel=1e-5, abs=1e-5)
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "dist" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    ckpt = tmp_path / "dist" / "checkpoints" / "step_00000002"
    resumed_cfg = _finetune_config(tmp_path, "resumed")
    resumed_cfg.lora.dropout = 0.0
    train(resumed_cfg, task="finetune", resume=str(ckpt))
    assert [r["loss"] for r in step_records(resumed_cfg.run_dir)] == pytest.approx(
        [r["loss"] for r in one[2:]], rel=1e-5, abs=1e-5)


@pytest.mark.skipif(not HAS_GMM, reason="the estimator traces the grouped expert path (torch._grouped_mm)")
def test_memory_estimate_of_a_lora_step():
    from dbrx.bench import run_bench

    kw = dict(overrides={"vocab_size": 512, "n_layers": 2}, batch=2, seq_len=64, estimate_memory=True,
              checkpointing="full", optimizer="adamw")
    full = run_bench("train", "dbrx-tiny", **kw)
    lora = run_bench("train", "dbrx-tiny", lora=LoraConfig(rank=8, alpha=16), **kw)
    assert lora["trainable_params"] < full["trainable_params"] / 5  # tiny model: rank 8 is large next to it
    assert full["optimizer_state_gb"] == pytest.approx(full["trainable_params"] * 8 / 1e9)
    assert lora["estimated_peak_memory_gb"] < 0.6 * full["estimated_peak_memory_gb"]
    assert lora["lora"] == {"rank": 8, "alpha": 16, "targets": ["Wqkv", "out_proj", "w1", "v1", "w2"]}
    with pytest.raises(ValueError, match="unknown target") as e:
        run_bench("train", "dbrx-tiny", lora=LoraConfig(targets=["nope"]), **kw)
    one_line(e)
