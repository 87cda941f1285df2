"""dbrx: Databricks' DBRX mixture-of-experts LLM in plain PyTorch, with training, inference and tools."""

from .config import PRESETS, DbrxConfig
from .model import DbrxForCausalLM

__version__ = "0.1.0"
__all__ = ["DbrxConfig", "PRESETS", "DbrxForCausalLM", "__version__"]
