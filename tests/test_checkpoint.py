"""Checkpoint I/O: save/load round trips, sharding, the split expert layout, conversion, dtypes, errors."""

from __future__ import annotations

import argparse
import json
import re
import time

import pytest
import torch
from conftest import randomize_, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.cli.model import register
from dbrx.hf_checkpoint import (
    convert_checkpoint,
    detect_layout,
    parse_size,
)

load_pretrained = DbrxForCausalLM.from_pretrained


def save_pretrained(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)

WTE = "transformer.wte.weight"
W1 = "transformer.blocks.0.ffn.experts.mlp.w1"


def _model(seed=0, **overrides) -> DbrxForCausalLM:
    return randomize_(DbrxForCausalLM.from_config(tiny_config(**overrides)), seed=seed).eval()


def _ids(seed=0):
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


def _assert_same_model(a: DbrxForCausalLM, b: DbrxForCausalLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        torch.testing.assert_close(a(_ids()), b(_ids()), atol=0, rtol=0)


def _all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _split_state(model: DbrxForCausalLM, transpose_w2=lambda layer: True) -> dict[str, torch.Tensor]:
    """The community per-expert layout, written by hand from our (stacked) state dict."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.fullmatch(r"(transformer\.blocks\.(\d+)\.ffn\.experts)\.mlp\.(w1|v1|w2)", k)
        if not m:
            out[k] = v.clone()
            continue
        for e in range(v.shape[0]):
            t = v[e]  # (F, D)
            if m.group(3) == "w2" and transpose_w2(int(m.group(2))):
                t = t.T  # nn.Linear(F, D).weight: [D, F]
            out[f"{m.group(1)}.mlp_experts.{e}.{m.group(3)}.weight"] = t.contiguous()
    return out


# ---- round trips ----------------------------------------------------------------------------------------
def test_save_load_round_trip_single_file(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert cfg["dtype"] == "float32"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice(W1).get_shape() == [8 * 96, 64]  # stacked HF layout [E*F, D]
    _assert_same_model(model, DbrxForCausalLM.from_pretrained(tmp_path))


def test_sharded_round_trip_and_index(tmp_path):
    model = _model(seed=1)
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", p.name) for p in shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    tensors = _all_tensors(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for p in shards:  # each shard under the limit unless it holds a single tensor
        ts = load_file(p)
        assert len(ts) == 1 or sum(t.numel() * 4 for t in ts.values()) <= 200_000
    _assert_same_model(model, load_pretrained(tmp_path))

    save_pretrained(model, tmp_path)  # re-saving as one file removes the old shards and index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_model(model, load_pretrained(tmp_path))


@pytest.mark.parametrize("ffn", [96, 64], ids=["F!=D", "F==D"])
def test_split_layout_loads_to_identical_model(tmp_path, ffn):
    model = _model(seed=2, ffn_hidden_size=ffn)
    model.config.save(tmp_path / "config.json")
    # layer 0: w2 as nn.Linear(F, D) [D, F]; layer 1: w2 as [F, D] (only distinguishable when F != D)
    state = _split_state(model, transpose_w2=lambda layer: layer == 0 or ffn == 64)
    if ffn == 96:
        assert state["transformer.blocks.0.ffn.experts.mlp_experts.3.w2.weight"].shape == (64, 96)
        assert state["transformer.blocks.1.ffn.experts.mlp_experts.3.w2.weight"].shape == (96, 64)
    save_file(state, tmp_path / "model.safetensors")
    assert detect_layout(state) == "split"
    _assert_same_model(model, load_pretrained(tmp_path))


def test_split_layout_with_a_single_expert(tmp_path):
    model = _model(seed=5, moe_num_experts=1, moe_top_k=1)  # one key per expert tensor, as in the stacked layout
    model.config.save(tmp_path / "config.json")
    save_file(_split_state(model), tmp_path / "model.safetensors")
    _assert_same_model(model, load_pretrained(tmp_path))


def test_convert_stacked_split_stacked_preserves_tensors(tmp_path, capsys):
    model = _model(seed=3)
    model.save_pretrained(tmp_path / "a")
    names = convert_checkpoint(tmp_path / "a", tmp_path / "split", layout="split", max_shard_bytes=100_000)
    assert len(names) > 1 and (tmp_path / "split" / "model.safetensors.index.json").is_file()
    split = _all_tensors(tmp_path / "split")
    assert detect_layout(split) == "split"
    assert split["transformer.blocks.1.ffn.experts.mlp_experts.5.w2.weight"].shape == (64, 96)  # [D, F]
    assert torch.equal(split["transformer.blocks.1.ffn.experts.mlp_experts.5.w2.weight"],
                       model.transformer.blocks[1].ffn.experts.mlp.w2[5].T)
    _assert_same_model(model, load_pretrained(tmp_path / "split"))

    # back to stacked through the CLI verb
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["convert", str(tmp_path / "split"), str(tmp_path / "b"), "--layout", "stacked"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().err
    a, b = _all_tensors(tmp_path / "a"), _all_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_conversion(tmp_path):
    model = _model(seed=4)
    model.save_pretrained(tmp_path / "fp32")
    bf = load_pretrained(tmp_path / "fp32", dtype="bf16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert torch.equal(bf.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))

    save_pretrained(model, tmp_path / "fp16", dtype=torch.float16)
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in _all_tensors(tmp_path / "fp16").values()} == {torch.float16}
    half = load_pretrained(tmp_path / "fp16")  # default: the checkpoint's dtype
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert all(not p.is_meta and p.requires_grad for p in half.parameters())

    convert_checkpoint(tmp_path / "fp16", tmp_path / "back", dtype="fp32")
    back = load_pretrained(tmp_path / "back")
    assert back.lm_head.weight.dtype == torch.float32
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.half().float())


def test_meta_build_of_full_size_is_instant_with_the_published_counts():
    t0 = time.perf_counter()
    model = DbrxForCausalLM.from_config(DbrxConfig.from_preset("dbrx-132b"), device="meta")
    assert time.perf_counter() - t0 < 5.0
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * 4 // 16
    assert abs(total / 131.6e9 - 1) < 0.01, total
    assert abs(active / 36e9 - 1) < 0.03, active


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = _model(seed=5)
    model.save_pretrained(tmp_path / "ck")
    return tmp_path / "ck", model


def test_missing_directory_config_and_weights(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    path, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(path)


def test_pickle_only_checkpoint_is_refused(saved):
    path, _ = saved
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*only safetensors"):
        load_pretrained(path)


def test_non_dbrx_config(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*llama"):
        load_pretrained(path)


def test_missing_shard(tmp_path):
    _model(seed=6).save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = index["weight_map"][WTE]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim) + r".*transformer\."):
        load_pretrained(tmp_path)


def test_index_lists_tensor_absent_from_shard(tmp_path):
    _model(seed=6).save_pretrained(tmp_path, max_shard_bytes=200_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][WTE])
    index["weight_map"][WTE] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(other) + r".*transformer\.wte\.weight"):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(saved):
    path, model = saved
    state = load_file(path / "model.safetensors")
    del state[W1]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensors " + re.escape(W1)):
        load_pretrained(path)
    state[W1] = model.state_dict()[W1].reshape(-1, 64)
    state["transformer.blocks.0.extra.weight"] = torch.zeros(3)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensors transformer\.blocks\.0\.extra"):
        load_pretrained(path)


def test_wrong_shape(saved):
    path, _ = saved
    state = load_file(path / "model.safetensors")
    state[WTE] = torch.zeros(100, 64)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*transformer\.wte\.weight.*\[100, 64\].*\[128, 64\]"):
        load_pretrained(path)


def test_wrong_expert_shape_in_split_layout(tmp_path):
    model = _model(seed=7)
    model.config.save(tmp_path / "config.json")
    state = _split_state(model)
    key = "transformer.blocks.1.ffn.experts.mlp_experts.2.v1.weight"
    state[key] = torch.zeros(64, 96)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(key) + r".*\[64, 96\], expected \[96, 64\]"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("shard_bytes", [200_000, 2**30], ids=["sharded", "single"])
def test_corrupt_safetensors(tmp_path, damage, shard_bytes):
    _model(seed=8).save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    shard = sorted(tmp_path.glob("model*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 8)
    with pytest.raises(ValueError, match=re.escape(shard.name) + ".*(truncated or corrupt)"):
        load_pretrained(tmp_path)


def test_convert_rejects_bad_layout_and_same_directory(saved, tmp_path):
    path, _ = saved
    with pytest.raises(ValueError, match="layout"):
        convert_checkpoint(path, tmp_path / "out", layout="diagonal")
    with pytest.raises(ValueError, match="differ"):
        convert_checkpoint(path, path)
