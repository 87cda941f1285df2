"""dbrx: Databricks' DBRX mixture-of-experts LLM in plain PyTorch, with training, inference and tools.

Layout (each module's docstring says what it may import; tests/test_layout.py checks that nothing imports in a
cycle):
    tokens, devices, fsutil, compat      facts and helpers with no dbrx imports
    config                               the model config, presets, the override grammar, the FLOP formula
    kernels/, moe, model                 the single-device model
    hf_checkpoint                        Hugging Face checkpoints (weights I/O), the transformers adapter
    tokenizer, sampling                  cl100k + DBRX specials, chat template; SamplingParams
    parallel/                            activation checkpointing, compile, FSDP, sharded init: from outside
    quant/, lora/                        weight-only int8/int4 and LoRA adapters, applied to a built model
    loading, gguf_export                 load any checkpoint (float or quantized); GGUF files for llama.cpp
    serve/                               the serving engine (paged KV, scheduler) and the OpenAI-compatible API
    generate                             generate_ids / stream_text ...: the Python API, a client of the engine
    eval/                                log-likelihood scoring, ICL tasks, Gauntlet, HumanEval, lm-eval adapter
    train/                               data, trainer, training-state checkpoints, metrics
    bench, memory                        benchmarks and memory estimates
    cli/                                 the `dbrx` command (nothing imports it)
"""

from .config import PRESETS, DbrxConfig
from .generate import generate_ids, generate_text, stream_ids, stream_text
from .loading import load_pretrained
from .model import DbrxForCausalLM
from .sampling import SamplingParams
from .tokenizer import Tokenizer, get_tokenizer

__version__ = "0.1.0"
__all__ = [
    "DbrxConfig", "PRESETS", "DbrxForCausalLM", "load_pretrained", "Tokenizer", "get_tokenizer",
    "SamplingParams", "generate_ids", "generate_text", "stream_ids", "stream_text", "__version__",
]
