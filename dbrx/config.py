"""Model configuration: one typed dataclass mirroring the Hugging Face DBRX `config.json`, plus named presets.

Presets (numbers from ../shared/REFERENCE.md):
- ``dbrx-132b``: DBRX Base / Instruct (databricks/dbrx-base `config.json`).
- ``dbrx-73b``, ``dbrx-35b``, ``dbrx-18b``, ``dbrx-9b``: llm-foundry's DBRX-family "gauntlet" shapes
  (16 experts, top-4, ffn = 1.75 * d_model, 8 KV heads, clip_qkv 8, 4096 context).
- ``dbrx-demo``: a CPU-sized model trained by ``dbrx pretrain`` on the bundled corpus.
- ``dbrx-tiny``: the test size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .tokens import PADDED_VOCAB_SIZE

VOCAB_SIZE = PADDED_VOCAB_SIZE  # cl100k_base ids (100280 used) padded to a multiple of 256
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB; refuse anything over 1 MiB


@dataclass
class AttnConfig:
    clip_qkv: float | None = 8.0  # clamp Wqkv output to [-clip, clip]; None disables
    kv_n_heads: int = 8
    rope_theta: float = 500000.0
    attn_pdrop: float = 0.0


@dataclass
class FFNConfig:
    ffn_hidden_size: int = 10752
    moe_num_experts: int = 16
    moe_top_k: int = 4
    moe_jitter_eps: float | None = 0.0
    moe_loss_weight: float = 0.05
    moe_normalize_expert_weights: float | None = 1.0  # p of the p-norm dividing the top-k weights; None: no division
    ffn_act_fn: dict = field(default_factory=lambda: {"name": "silu"})


@dataclass
class DbrxConfig:
    d_model: int = 6144
    n_heads: int = 48
    n_layers: int = 40
    max_seq_len: int = 32768
    vocab_size: int = VOCAB_SIZE
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    ffn_config: FFNConfig = field(default_factory=FFNConfig)
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.attn_config, dict):
            self.attn_config = AttnConfig(**_known(AttnConfig, self.attn_config))
        if isinstance(self.ffn_config, dict):
            self.ffn_config = FFNConfig(**_known(FFNConfig, self.ffn_config))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def qkv_dim(self) -> int:
        return self.d_model + 2 * self.attn_config.kv_n_heads * self.head_dim

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field: its type (from the annotation), then its range.
        Ints given for float fields are stored as floats."""
        _check_types(self)
        a, f = self.attn_config, self.ffn_config
        if self.d_model % self.n_heads:
            raise ValueError(f"config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")
        if self.n_heads % a.kv_n_heads:
            raise ValueError(f"config: n_heads ({self.n_heads}) must be a multiple of kv_n_heads ({a.kv_n_heads})")
        if not f.moe_top_k <= f.moe_num_experts:
            raise ValueError(
                f"config: ffn_config.moe_top_k ({f.moe_top_k}) must be between 1 and moe_num_experts "
                f"({f.moe_num_experts})"
            )
        for name, value in (("attn_config.attn_pdrop", a.attn_pdrop), ("resid_pdrop", self.resid_pdrop),
                            ("emb_pdrop", self.emb_pdrop), ("ffn_config.moe_jitter_eps", f.moe_jitter_eps)):
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"config: {name} must be in [0, 1), got {value}")
        for name, value in (("attn_config.clip_qkv", a.clip_qkv), ("attn_config.rope_theta", a.rope_theta),
                            ("initializer_range", self.initializer_range),
                            ("ffn_config.moe_normalize_expert_weights", f.moe_normalize_expert_weights)):
            if value is not None and not value > 0:
                raise ValueError(f"config: {name} must be positive, got {value}")
        if f.moe_loss_weight < 0:
            raise ValueError(f"config: ffn_config.moe_loss_weight must be >= 0, got {f.moe_loss_weight}")
        if f.ffn_act_fn.get("name") != "silu":
            raise ValueError(f'config: ffn_config.ffn_act_fn must be {{"name": "silu"}} (DBRX uses silu), '
                             f"got {_show(f.ffn_act_fn)}")
        if self.tie_word_embeddings:
            raise ValueError("config: tie_word_embeddings=true is not supported by DBRX (the head is untied)")

    # ---- parameter counts ----------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts by part, plus `total` and `active` (parameters touched per token)."""
        d, f = self.d_model, self.ffn_config
        attn = self.n_layers * (d * self.qkv_dim + d * d)
        norms = self.n_layers * 2 * d + d
        router = self.n_layers * f.moe_num_experts * d
        experts = self.n_layers * 3 * f.moe_num_experts * f.ffn_hidden_size * d
        embed = 2 * self.vocab_size * d  # wte + untied lm_head
        total = attn + norms + router + experts + embed
        active = total - experts + experts * f.moe_top_k // f.moe_num_experts
        return dict(attention=attn, norms=norms, router=router, experts=experts, embeddings=embed,
                    total=total, active=active)

    def active_matmul_params(self) -> int:
        """Weights multiplied per token: attention, router, the top-k experts and the lm head (the embedding
        lookup is free)."""
        n = self.num_params()
        return n["active"] - n["norms"] - self.vocab_size * self.d_model

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token: 2 * active matmul params (+ causal attention), times 3 for training.

        The one FLOP formula of the package (training MFU, `dbrx bench`, `dbrx info`)."""
        attn = 2 * self.n_layers * seq_len * self.d_model  # QK^T and PV, causal (half of 2 * 2 * T * d)
        fwd = 2 * self.active_matmul_params() + attn
        return 3 * fwd if training else fwd

    def kv_cache_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        return 2 * self.n_layers * self.attn_config.kv_n_heads * self.head_dim * bytes_per_elem

    # ---- Hugging Face config.json --------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            architectures=["DbrxForCausalLM"],
            model_type="dbrx",
            # transformers 5.x builds RoPE from this top-level field and ignores attn_config.rope_theta.
            rope_parameters={"rope_type": "default", "rope_theta": self.attn_config.rope_theta},
            torch_dtype="bfloat16",
            use_cache=True,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> DbrxConfig:
        """A config from a parsed config.json; keys that are not DbrxConfig fields are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {_show(d)}")
        if d.get("model_type", "dbrx") != "dbrx":
            raise ValueError(f"{source}: model_type is {_show(d.get('model_type'))}, not 'dbrx'")
        missing = [k for k in ("d_model", "n_heads", "n_layers") if k not in d]
        if missing:
            raise ValueError(f"{source}: not a DBRX config (missing {', '.join(missing)})")
        try:
            return cls(**_known(cls, d))
        except ValueError as e:
            raise ValueError(f"{source}: {str(e).removeprefix('config: ')}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_hf_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DbrxConfig:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: over 1 MiB, too large for a config.json")
        try:
            d = json.loads(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"{path}: invalid JSON (nested too deeply)") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, /, **overrides: Any) -> DbrxConfig:
        """A named preset with overrides of any field, top-level or nested: `n_layers=2`, `moe_top_k=2` or
        `ffn_config.moe_top_k=2`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        d = json.loads(json.dumps(PRESETS[name]))  # deep copy
        sections = {"attn_config": AttnConfig, "ffn_config": FFNConfig}
        items = []
        for key, value in overrides.items():  # a section given as a dict updates the preset's, field by field
            if key in sections and not isinstance(value, dict):
                raise ValueError(f"config: {key} must be a mapping, got {_show(value)}")
            if key in sections:
                items += [(f"{key}.{field}", v) for field, v in value.items()]
            else:
                items.append((key, value))
        for key, value in items:
            section, dot, field = key.partition(".")
            if dot:  # an explicit section
                if section not in sections or field not in {f.name for f in dataclasses.fields(sections[section])}:
                    raise ValueError(f"unknown config field {key!r} in overrides")
                d.setdefault(section, {})[field] = value
            elif key in d or key in {f.name for f in dataclasses.fields(cls)}:
                d[key] = value
            elif key in {f.name for f in dataclasses.fields(AttnConfig)}:
                d.setdefault("attn_config", {})[key] = value
            elif key in {f.name for f in dataclasses.fields(FFNConfig)}:
                d.setdefault("ffn_config", {})[key] = value
            else:
                raise ValueError(f"unknown config field {key!r} in overrides")
        return cls(**d)


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# ---- field checks ----------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short."""
    try:
        r = repr(value)
    except ValueError:  # an int beyond Python's int-to-str digit limit
        r = "a huge integer"
    return r if len(r) <= 80 else r[:77] + "..."


def _finite_float(value: Any) -> float | None:
    """`value` (an int or a float, not a bool) as a finite float; None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return x if math.isfinite(x) else None


def _check_types(obj: Any, where: str = "") -> None:
    """Check each field of the dataclass `obj` against its annotation: int (here always positive), float, float |
    None (finite), bool, dict or a nested section. Ints given for float fields are stored as floats."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        value, path = getattr(obj, name), where + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ValueError(f"config: {path} must be a mapping, got {_show(value)}")
            _check_types(value, f"{path}.")
        elif tp is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config: {path} must be a positive integer, got {_show(value)}")
        elif tp in (float, float | None):
            if value is None and tp is not float:
                continue
            x = _finite_float(value)
            if x is None:
                kind = "a finite number" if tp is float else "a finite number or null"
                raise ValueError(f"config: {path} must be {kind}, got {_show(value)}")
            setattr(obj, name, x)
        elif tp in (bool, dict):
            if not isinstance(value, tp):
                kind = "a boolean" if tp is bool else "a mapping"
                raise ValueError(f"config: {path} must be {kind}, got {_show(value)}")
        else:
            raise AssertionError(f"no check for the annotation {tp} of {path}")


# ---- override values: YAML with YAML 1.2 floats ----------------------------------------------------------
class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-2`, `1E5`, `.5` and `-2.5e+3` are floats (YAML 1.1 reads the
    exponent forms as strings); `.nan` and `.inf` are floats, `nan` and `inf` are strings."""


YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9]+[eE][-+]?[0-9]+
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """An override value as a YAML scalar or flow value: `2`, `1e-2`, `null`, `true`, `[1, 2]`, `{name: silu}`;
    anything else is a string. An empty text is the empty string."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"value {text!r} is not valid YAML ({yaml_problem(e)})") from None
    except (ValueError, KeyError, AttributeError) as e:  # PyYAML's reply to a bad explicit tag: `!!int x`, `!!bool x`
        raise ValueError(f"value {text!r} is not valid YAML ({type(e).__name__}: {e})") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where when known."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return " ".join((getattr(e, "problem", None) or str(e)).split()) + where


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['n_layers=2', 'ffn_config.moe_top_k=1', 'clip_qkv=null'] -> {'n_layers': 2, 'ffn_config.moe_top_k': 1,
    'clip_qkv': None}, for `DbrxConfig.from_preset(name, **overrides)`."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        try:
            out[key] = parse_value(text)
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from None
    return out


def _family(d_model: int, n_heads: int, n_layers: int) -> dict[str, Any]:
    """llm-foundry's DBRX-family shape: 16 experts top-4, ffn 1.75 * d, 8 KV heads, 4K context."""
    return dict(
        d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=4096,
        attn_config=dict(clip_qkv=8.0, kv_n_heads=8, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=d_model * 7 // 4, moe_num_experts=16, moe_top_k=4, moe_jitter_eps=0.0,
                        moe_loss_weight=0.05),
    )


PRESETS: dict[str, dict[str, Any]] = {
    "dbrx-132b": dict(
        d_model=6144, n_heads=48, n_layers=40, max_seq_len=32768,
        attn_config=dict(clip_qkv=8.0, kv_n_heads=8, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=10752, moe_num_experts=16, moe_top_k=4, moe_jitter_eps=0.0,
                        moe_loss_weight=0.05),
    ),
    "dbrx-73b": _family(5120, 40, 32),
    "dbrx-35b": _family(4096, 32, 24),
    "dbrx-18b": _family(3072, 24, 22),
    "dbrx-9b": _family(2048, 16, 24),
    # CPU sizes: keep DBRX's structure (fine-grained experts, top-k, GQA, clip_qkv), shrink the widths.
    # dbrx-demo: d_model 64 so that `dbrx pretrain` (300 steps x 1024 tokens) takes a few minutes on 2 CPU cores;
    # the untied 100352-row head dominates its FLOPs (at d_model 128 the same time buys half the tokens).
    "dbrx-demo": dict(
        d_model=64, n_heads=4, n_layers=4, max_seq_len=1024,
        attn_config=dict(clip_qkv=8.0, kv_n_heads=2, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=112, moe_num_experts=16, moe_top_k=4, moe_jitter_eps=0.0,
                        moe_loss_weight=0.05),
    ),
    "dbrx-tiny": dict(
        d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
        attn_config=dict(clip_qkv=8.0, kv_n_heads=2, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=96, moe_num_experts=8, moe_top_k=2, moe_jitter_eps=0.0,
                        moe_loss_weight=0.05),
    ),
}
