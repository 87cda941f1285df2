import json

import pytest

from dbrx.config import PRESETS, DbrxConfig


def test_presets_exist_and_unknown_name_lists_them():
    for name in ("dbrx-132b", "dbrx-73b", "dbrx-35b", "dbrx-18b", "dbrx-9b", "dbrx-demo", "dbrx-tiny"):
        assert name in PRESETS
    with pytest.raises(ValueError) as e:
        DbrxConfig.from_preset("dbrx-1t")
    assert "dbrx-132b" in str(e.value) and "dbrx-tiny" in str(e.value)


def test_132b_matches_reference_facts():
    c = DbrxConfig.from_preset("dbrx-132b")
    assert (c.d_model, c.n_heads, c.n_layers, c.max_seq_len, c.vocab_size) == (6144, 48, 40, 32768, 100352)
    assert (c.attn_config.clip_qkv, c.attn_config.kv_n_heads, c.attn_config.rope_theta) == (8, 8, 500000)
    f = c.ffn_config
    assert (f.ffn_hidden_size, f.moe_num_experts, f.moe_top_k, f.moe_loss_weight) == (10752, 16, 4, 0.05)
    n = c.num_params()
    assert abs(n["total"] / 131.6e9 - 1) < 0.01
    assert abs(n["active"] / 36e9 - 1) < 0.03
    assert abs(n["experts"] / 126.8e9 - 1) < 0.01
    assert c.kv_cache_bytes_per_token(2) == 160 * 1024


def test_family_presets_follow_llm_foundry_shapes():
    for name, (d, h, L) in {"dbrx-9b": (2048, 16, 24), "dbrx-18b": (3072, 24, 22), "dbrx-35b": (4096, 32, 24),
                            "dbrx-73b": (5120, 40, 32)}.items():
        c = DbrxConfig.from_preset(name)
        assert (c.d_model, c.n_heads, c.n_layers, c.max_seq_len) == (d, h, L, 4096)
        assert c.ffn_config.ffn_hidden_size == d * 7 // 4 and c.attn_config.kv_n_heads == 8


def test_overrides_top_level_and_nested():
    c = DbrxConfig.from_preset("dbrx-132b", n_layers=2, moe_top_k=2, clip_qkv=None)
    assert c.n_layers == 2 and c.ffn_config.moe_top_k == 2 and c.attn_config.clip_qkv is None
    assert DbrxConfig.from_preset("dbrx-132b").n_layers == 40  # presets are not mutated
    with pytest.raises(ValueError, match="unknown config field"):
        DbrxConfig.from_preset("dbrx-tiny", n_layer=3)
    dotted = DbrxConfig.from_preset("dbrx-132b", **{"ffn_config.ffn_hidden_size": 448, "attn_config.kv_n_heads": 4})
    assert dotted.ffn_config.ffn_hidden_size == 448 and dotted.attn_config.kv_n_heads == 4
    merged = DbrxConfig.from_preset("dbrx-9b", ffn_config={"moe_top_k": 2})  # updates the section, keeps the rest
    assert merged.ffn_config.moe_top_k == 2 and merged.ffn_config.ffn_hidden_size == 3584
    with pytest.raises(ValueError, match="ffn_config.top_k"):
        DbrxConfig.from_preset("dbrx-9b", ffn_config={"top_k": 2})
    for bad in ("ffn_config.n_layers", "mlp_config.moe_top_k", "attn_config."):
        with pytest.raises(ValueError, match="unknown config field"):
            DbrxConfig.from_preset("dbrx-tiny", **{bad: 1})


@pytest.mark.parametrize("bad, field", [
    (dict(n_heads=5), "divisible"), (dict(kv_n_heads=3), "kv_n_heads"), (dict(moe_top_k=9), "moe_top_k"),
    (dict(clip_qkv=-1.0), "clip_qkv"), (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(n_layers=0), "n_layers"),
])
def test_invalid_values_are_rejected_with_the_field_name(bad, field):
    with pytest.raises(ValueError, match=field):
        DbrxConfig.from_preset("dbrx-tiny", **bad)


def test_hf_json_round_trip_and_rope_parameters(tmp_path):
    c = DbrxConfig.from_preset("dbrx-tiny", rope_theta=12345.0, moe_normalize_expert_weights=None)
    c.save(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "dbrx" and d["architectures"] == ["DbrxForCausalLM"]
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 12345.0}
    assert d["attn_config"]["rope_theta"] == 12345.0
    assert DbrxConfig.load(tmp_path / "config.json") == c


def test_non_dbrx_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="llama"):
        DbrxConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        DbrxConfig.load(tmp_path / "config.json")


def test_flops_per_token_matches_the_baseline_formula():
    c = DbrxConfig.from_preset("dbrx-132b", n_layers=2)
    d, f, E, k, V, L, T = 6144, 10752, 16, 4, 100352, 2, 2048
    active = L * (d * (d + 2 * 1024) + d * d) + L * k * 3 * d * f + L * d * E + V * d
    assert c.flops_per_token(T) == pytest.approx(6 * active + 6 * L * d * T)
    assert c.flops_per_token(T, training=False) == pytest.approx(2 * active + 2 * L * d * T)
