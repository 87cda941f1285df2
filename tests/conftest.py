"""Shared test helpers: tiny configs, non-trivial random weights, and `transformers` reference models.

The helpers are plain functions (importable as `from conftest import ...`) and also exposed as fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dbrx import DbrxConfig
from dbrx.hf_checkpoint import transformers_config


def tiny_config(**overrides) -> DbrxConfig:
    """A small DBRX config (2 layers, d 64, 8 experts top-2, vocab 128); any field may be overridden."""
    base = dict(vocab_size=128, max_seq_len=64)
    base.update(overrides)
    return DbrxConfig.from_preset("dbrx-tiny", **base)


def hf_config(cfg: DbrxConfig):
    """The equivalent `transformers.DbrxConfig` in fp32 (the package's one adapter, dbrx.hf_checkpoint)."""
    pytest.importorskip("transformers")
    return transformers_config(cfg, dtype="float32")


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
