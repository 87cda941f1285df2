"""Shared test helpers: tiny configs, non-trivial random weights, `transformers` reference models, and a random
tiny model served by `dbrx serve`'s app (`serve_model`, the `served` fixture).

The helpers are plain functions (importable as `from conftest import ...`) and also exposed as fixtures.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.hf_checkpoint import transformers_config

SERVED_NAME = "tiny"  # the model name the `served` server answers to


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


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int, vocab_limit: int | None = None) -> list[int]:
    """n greedy tokens by recomputing the whole sequence every step (no KV cache, no engine): the independent
    reference for dbrx.generate and the serving engine. Like them it never picks an id at or above vocab_limit
    (default: min(model vocab, REAL_VOCAB_SIZE)) or one of UNUSED_IDS, and ignores stop ids."""
    from dbrx.tokens import REAL_VOCAB_SIZE, UNUSED_IDS

    limit = min(model.config.vocab_size, REAL_VOCAB_SIZE) if vocab_limit is None else vocab_limit
    unused = [i for i in UNUSED_IDS if i < limit]
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids], device=device))[0, -1, :limit].float()  # (V,) of the next token
        logits[unused] = -float("inf")
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


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
def one_thread():
    """torch at one intra-op thread for the test (tiny models on a shared 2-core machine), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(cfg, seed=0, name='hf') -> (directory, transformers model)."""

    def make(cfg: DbrxConfig, seed: int = 0, name: str = "hf", std: float = 0.05):
        path = tmp_path / name
        return path, save_hf_checkpoint(cfg, path, seed, std)

    return make


@contextmanager
def serve_model(model: torch.nn.Module, name: str = SERVED_NAME) -> Iterator[tuple[str, object]]:
    """Serve `model` through the real engine and `dbrx serve`'s app (uvicorn, a free local port, a thread).

    Yields (base url, the AsyncEngine); the server and the engine stop on exit.
    """
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from dbrx.serve.api import create_app
    from dbrx.serve.engine import AsyncEngine, Engine, EngineConfig
    from dbrx.tokenizer import get_tokenizer

    front = AsyncEngine(Engine(model, EngineConfig(block_size=8, num_blocks=400, max_num_seqs=32,
                                                   max_num_batched_tokens=256)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(front, get_tokenizer(), name), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started:
            assert time.monotonic() < deadline, "the server did not start within 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", front
    finally:
        srv.should_exit = True
        thread.join(10)
        front.shutdown()
        sock.close()


@pytest.fixture(scope="module")
def served():
    """A random dbrx-tiny with the full vocabulary (text prompts tokenize), served as SERVED_NAME.

    Yields (model, base url, AsyncEngine)."""
    cfg = DbrxConfig.from_preset("dbrx-tiny", max_seq_len=256)
    model = randomize_(DbrxForCausalLM.from_config(cfg), seed=5, std=0.08).eval()
    with serve_model(model) as (url, front):
        yield model, url, front
