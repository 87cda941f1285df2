"""Shared test helpers: tiny configs, non-trivial random weights, and `transformers` reference models.

The helpers are plain functions (importable as `from conftest import ...`) and also exposed as fixtures.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dbrx import DbrxConfig

# transformers 5.x calls `clamp(min=None, max=None)` when clip_qkv is None and crashes; a clip this large never
# binds, so the HF side of a "no clipping" case runs with it while our model uses None.
HF_NO_CLIP = 1e9


def tiny_config(**overrides) -> DbrxConfig:
    """A small DBRX config (2 layers, d 64, 8 experts top-2, vocab 128); any field may be overridden."""
    base = dict(vocab_size=128, max_seq_len=64)
    base.update(overrides)
    return DbrxConfig.from_preset("dbrx-tiny", **base)


def hf_config(cfg: DbrxConfig):
    """The equivalent `transformers.DbrxConfig` (theta also as top-level `rope_parameters`, see REFERENCE.md)."""
    transformers = pytest.importorskip("transformers")
    d = copy.deepcopy(cfg.to_hf_dict())
    if d["attn_config"]["clip_qkv"] is None:
        d["attn_config"]["clip_qkv"] = HF_NO_CLIP
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.attn_config.rope_theta}
    d.pop("torch_dtype", None)
    d["dtype"] = "float32"
    return transformers.DbrxConfig(**d)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Re-initialise every parameter: normal(0, std), LayerNorm weights around 1 (so norm mistakes show)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name.rsplit(".", 2)[-2]:
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(std * noise)
    return model


def make_hf_model(cfg: DbrxConfig, seed: int = 0, std: float = 0.05):
    """A `transformers.DbrxForCausalLM` in fp32, eval mode, with non-trivial random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.DbrxForCausalLM(hf_config(cfg)).float().eval()
    return randomize_(model, seed, std)


def save_hf_checkpoint(cfg: DbrxConfig, path: str | Path, seed: int = 0, std: float = 0.05):
    """Build a random transformers DBRX model, `save_pretrained` it (safetensors) to `path`; returns the model."""
    model = make_hf_model(cfg, seed, std)
    model.save_pretrained(str(path))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(cfg, seed=0, name='hf') -> (directory, transformers model)."""

    def make(cfg: DbrxConfig, seed: int = 0, name: str = "hf", std: float = 0.05):
        path = tmp_path / name
        return path, save_hf_checkpoint(cfg, path, seed, std)

    return make
