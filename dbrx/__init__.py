"""dbrx: Databricks' DBRX mixture-of-experts LLM in plain PyTorch, with training, inference and tools."""

from .config import PRESETS, DbrxConfig
from .generate import SamplingParams, generate_ids, generate_text, stream_text
from .model import DbrxForCausalLM
from .tokenizer import Tokenizer, get_tokenizer

__version__ = "0.1.0"
__all__ = [
    "DbrxConfig", "PRESETS", "DbrxForCausalLM", "Tokenizer", "get_tokenizer",
    "SamplingParams", "generate_ids", "generate_text", "stream_text", "__version__",
]
