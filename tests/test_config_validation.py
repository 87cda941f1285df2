"""Config validation: every DbrxConfig field (config.json and preset overrides), the one override grammar, and the
training config's floats, sample section and section types. Every mistake is a one-line ValueError naming the field."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbrx.config import PRESETS, AttnConfig, DbrxConfig, FFNConfig, parse_overrides, parse_value
from dbrx.train.config import CONFIG_DIR, SampleSection, load_config, load_yaml

NAN, INF = math.nan, math.inf


def tiny() -> dict:
    return json.loads(json.dumps(PRESETS["dbrx-tiny"]))  # deep copy


def with_field(d: dict, path: str, value) -> dict:
    """`d` with the dotted field `path` ("attn_config.kv_n_heads", "resid_pdrop") set to `value`."""
    section, dot, name = path.partition(".")
    if not dot:
        d[section] = value
    elif isinstance(d.get(section), dict):
        d[section] = {**d[section], name: value}  # a copy: the section may be a value hypothesis shares (sampled_from)
    return d


def yaml_text(value) -> str:
    """`value` as an override writes it: JSON is YAML flow, except YAML spells nan and inf `.nan` and `.inf`."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    return json.dumps(value)


def raises_one_line(fn, field: str) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert field in msg, msg
    assert "\n" not in msg, msg
    return msg


# ---- DbrxConfig ------------------------------------------------------------------------------------------------
BAD_MODEL_FIELDS = [
    ("attn_config", "garbage"), ("attn_config", [1, 2]), ("attn_config", 3), ("ffn_config", None),
    ("ffn_config", "x"), ("ffn_config.ffn_act_fn", "gelu"), ("ffn_config.ffn_act_fn", {"name": "gelu"}),
    ("ffn_config.ffn_act_fn", ["silu"]), ("attn_config.kv_n_heads", 2.0), ("attn_config.kv_n_heads", True),
    ("attn_config.kv_n_heads", "2"), ("n_layers", "2"), ("n_layers", 2.0), ("d_model", None), ("vocab_size", -1),
    ("ffn_config.moe_top_k", 2.0), ("ffn_config.ffn_hidden_size", 0), ("resid_pdrop", "a"), ("resid_pdrop", 1.0),
    ("emb_pdrop", -0.1), ("emb_pdrop", NAN), ("attn_config.attn_pdrop", INF), ("attn_config.rope_theta", NAN),
    ("attn_config.rope_theta", INF), ("attn_config.rope_theta", 0), ("attn_config.rope_theta", "500000"),
    ("attn_config.clip_qkv", NAN), ("attn_config.clip_qkv", -INF), ("attn_config.clip_qkv", False),
    ("initializer_range", NAN), ("initializer_range", 0.0), ("ffn_config.moe_loss_weight", NAN),
    ("ffn_config.moe_loss_weight", -1), ("ffn_config.moe_loss_weight", None), ("ffn_config.moe_jitter_eps", INF),
    ("ffn_config.moe_jitter_eps", 1.5), ("ffn_config.moe_normalize_expert_weights", NAN),
    ("ffn_config.moe_normalize_expert_weights", 0), ("ffn_config.moe_normalize_expert_weights", [1]),
    ("tie_word_embeddings", "false"), ("tie_word_embeddings", 0), ("tie_word_embeddings", None),
]


@pytest.mark.parametrize("path, value", BAD_MODEL_FIELDS)
def test_bad_field_in_config_json_names_the_field(path, value, tmp_path):
    raises_one_line(lambda: DbrxConfig.from_hf_dict(with_field(tiny(), path, value)), path)
    (tmp_path / "config.json").write_text(json.dumps(with_field(tiny(), path, value)))  # nan, inf as NaN, Infinity
    msg = raises_one_line(lambda: DbrxConfig.load(tmp_path / "config.json"), path)
    assert msg.startswith(str(tmp_path / "config.json"))


@pytest.mark.parametrize("path, value", BAD_MODEL_FIELDS)
def test_bad_field_in_preset_overrides_names_the_field(path, value):
    overrides = parse_overrides([f"{path}={yaml_text(value)}"])
    raises_one_line(lambda: DbrxConfig.from_preset("dbrx-tiny", **overrides), path)
    short = path.rpartition(".")[2]  # kv_n_heads=... finds its section too
    raises_one_line(lambda: DbrxConfig.from_preset("dbrx-tiny", **parse_overrides([f"{short}={yaml_text(value)}"])),
                    short)


@pytest.mark.parametrize("item", ["rope_theta=nan", "rope_theta=inf", "clip_qkv=-inf", "resid_pdrop=.nan"])
def test_nan_and_inf_overrides_are_refused(item):
    raises_one_line(lambda: DbrxConfig.from_preset("dbrx-tiny", **parse_overrides([item])), item.partition("=")[0])


def test_a_section_replaced_then_updated_is_an_error_not_a_crash():
    raises_one_line(lambda: DbrxConfig.from_preset("dbrx-tiny", **parse_overrides(["attn_config=x", "kv_n_heads=1"])),
                    "attn_config")


def test_valid_config_json_keeps_unknown_keys_ignored_and_ints_become_floats():
    d = tiny() | {"architectures": ["DbrxForCausalLM"], "torch_dtype": "bfloat16", "model_type": "dbrx",
                  "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "use_cache": True}
    d["attn_config"] |= {"rope_theta": 500000, "clip_qkv": 8, "model_type": ""}
    d["ffn_config"] |= {"moe_loss_weight": 0, "ffn_act_fn": {"name": "silu"}, "moe_normalize_expert_weights": 1}
    c = DbrxConfig.from_hf_dict(d)
    assert c.attn_config.rope_theta == 500000.0 and isinstance(c.attn_config.rope_theta, float)
    assert isinstance(c.attn_config.clip_qkv, float) and isinstance(c.ffn_config.moe_loss_weight, float)
    assert isinstance(c.ffn_config.moe_normalize_expert_weights, float)
    c2 = DbrxConfig.from_preset("dbrx-tiny", **parse_overrides(["rope_theta=500000", "clip_qkv=null"]))
    assert isinstance(c2.attn_config.rope_theta, float) and c2.attn_config.clip_qkv is None


def test_model_type_check_and_unknown_override_stay():
    raises_one_line(lambda: DbrxConfig.from_hf_dict(tiny() | {"model_type": "llama"}), "model_type")
    raises_one_line(lambda: DbrxConfig.from_preset("dbrx-tiny", **parse_overrides(["n_layer=2"])), "n_layer")
    raises_one_line(lambda: DbrxConfig.from_hf_dict(["not", "a", "dict"]), "JSON object")


def test_config_json_over_one_mib_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny() | {"padding": "x" * (1 << 20)}))
    raises_one_line(lambda: DbrxConfig.load(path), "1 MiB")
    path.write_text("[" * 500_000 + "]" * 500_000)  # under 1 MiB, too deep for the JSON parser
    raises_one_line(lambda: DbrxConfig.load(path), "invalid JSON")


# ---- the override grammar -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("1e-2", 0.01), ("3e-4", 3e-4), ("1E5", 1e5), (".5", 0.5), ("-2.5e+3", -2500.0), ("1.", 1.0), ("2", 2),
    ("-3", -3), ("null", None), ("true", True), ("[1, 2]", [1, 2]), ("{name: silu}", {"name": "silu"}),
    ("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("abc", "abc"), ("", ""), (".inf", INF), ("-.inf", -INF),
])
def test_parse_value_reads_yaml_with_yaml_1_2_floats(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)
    assert math.isnan(parse_value(".nan"))


def test_parse_overrides():
    assert parse_overrides(["n_layers=2", "ffn_config.moe_top_k=1", "clip_qkv=null"]) == {
        "n_layers": 2, "ffn_config.moe_top_k": 1, "clip_qkv": None}
    for bad in ("x", "=2"):
        msg = raises_one_line(lambda: parse_overrides([bad]), repr(bad))
        assert msg == f"override {bad!r} must look like key=value"
    for bad in ("n_layers=[1", "n_layers=!!bool x", "n_layers=a: b: c"):
        raises_one_line(lambda: parse_overrides([bad]), "not valid YAML")


# ---- training config ------------------------------------------------------------------------------------------
def packaged_with(tmp_path, path: str, value):
    """The packaged pretrain-demo config with one dotted field set, written back as YAML."""
    raw = load_yaml("pretrain-demo")
    *sections, name = path.split(".")
    node = raw
    for s in sections:
        node = node[s]
    node[name] = value
    out = tmp_path / "cfg.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def test_yaml_file_and_command_line_read_1e_2_as_a_float(tmp_path):
    text = (CONFIG_DIR / "pretrain-demo.yaml").read_text()
    assert "  lr: 3.0e-3\n" in text
    (tmp_path / "cfg.yaml").write_text(text.replace("  lr: 3.0e-3\n", "  lr: 1e-2\n"))
    from_file = load_config(tmp_path / "cfg.yaml").optim.lr
    from_override = load_config(None, ["optim.lr=1e-2"]).optim.lr
    assert from_file == from_override == 0.01 and isinstance(from_file, float)


TRAIN_FLOATS = ["optim.lr", "optim.weight_decay", "optim.eps", "optim.grad_clip", "optim.min_lr_ratio",
                "train.z_loss_weight", "eval.fraction", "log.peak_flops", "sample.temperature"]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("field", TRAIN_FLOATS + ["optim.betas"])
def test_nan_and_inf_training_floats_are_refused(field, value, tmp_path):
    betas = field == "optim.betas"
    path = packaged_with(tmp_path, field, [0.9, value] if betas else value)
    assert (".nan" if math.isnan(value) else ".inf") in path.read_text()
    raises_one_line(lambda: load_config(path).validate(), field)
    text = f"[0.9, {yaml_text(value)}]" if betas else yaml_text(value)
    raises_one_line(lambda: load_config(None, [f"{field}={text}"]).validate(), field)


@pytest.mark.parametrize("override, field", [
    ("sample.max_new_tokens=0", "sample.max_new_tokens"), ("sample.temperature=-0.5", "sample.temperature"),
    ("sample.top_k=0", "sample.top_k"), ("sample.top_k=-3", "sample.top_k"),
])
def test_bad_sample_values_are_refused_before_training(override, field):
    cfg = load_config(None, [override])
    raises_one_line(cfg.validate, field)


@pytest.mark.parametrize("sample, field", [
    (SampleSection(prompt=3), "sample.prompt"), (SampleSection(max_new_tokens=2.5), "sample.max_new_tokens"),
    (SampleSection(temperature="hot"), "sample.temperature"), (SampleSection(top_k=True), "sample.top_k"),
])
def test_bad_sample_types_are_refused_by_validate(sample, field):
    cfg = load_config()
    cfg.sample = sample
    raises_one_line(cfg.validate, field)


def test_good_sample_values_pass():
    load_config(None, ["sample.top_k=null", "sample.temperature=0", "sample.prompt=''"]).validate()


@pytest.mark.parametrize("override, field", [
    ("train=3", "train"), ("optim=[1]", "optim"), ("data.streams=x", "data.streams"), ("sample=null", "sample"),
    ("data.streams.text=3", "data.streams.text"), ("sample.prompt=3", "sample.prompt"),
])
def test_wrong_section_types_are_one_line_errors(override, field):
    raises_one_line(lambda: load_config(None, [override]), field)


# ---- fuzz: any JSON-like value in any field is a config or a one-line ValueError ------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
FIELDS = ([f.name for f in dataclasses.fields(DbrxConfig)] + ["model_type"]
          + [f"attn_config.{f.name}" for f in dataclasses.fields(AttnConfig)]
          + [f"ffn_config.{f.name}" for f in dataclasses.fields(FFNConfig)])
# plausible values reach the range checks behind the type checks
VALUES = JSON_VALUES | st.sampled_from([0, 1, 2, 3, 4, 8, 64, 0.0, 0.5, 1.0, 2.0, -1, {"name": "silu"}, {}])


def _accepted_or_one_line_error(make) -> None:
    try:
        cfg = make()
    except ValueError as e:
        assert "\n" not in str(e), str(e)
        return
    cfg.validate()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=4))
def test_fuzz_config_json_fields(changes):
    d = tiny()
    for path, value in changes:
        with_field(d, path, value)
    _accepted_or_one_line_error(lambda: DbrxConfig.from_hf_dict(d))


OVERRIDE_KEYS = FIELDS + [f.name for c in (AttnConfig, FFNConfig) for f in dataclasses.fields(c)] + ["bogus", "a.b"]
OVERRIDE_TEXT = st.text(max_size=12) | VALUES.map(yaml_text) | VALUES.map(json.dumps)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(OVERRIDE_KEYS) | st.text(max_size=6), OVERRIDE_TEXT), min_size=1,
                max_size=4))
def test_fuzz_preset_overrides(items):
    def make():
        return DbrxConfig.from_preset("dbrx-tiny", **parse_overrides([f"{k}={v}" for k, v in items]))

    _accepted_or_one_line_error(make)
