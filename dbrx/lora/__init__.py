"""LoRA fine-tuning applied from outside the model: per-expert adapters on the stacked experts (run by the grouped
expert kernels), PEFT-format adapters for transformers' DbrxForCausalLM, merged checkpoints.

- `layers`: LoraConfig, the adapter modules (LoraLinear wraps any linear-like module, LoraExperts the experts),
  apply_lora / merge_lora / lora_state_dict;
- `peft_format`: save_adapter / load_adapter in PEFT's format (experts through `target_parameters`), and
  merge_checkpoint (BASE + ADAPTER -> a merged Hugging Face checkpoint, tensor by tensor).

Imports: config, fsutil, hf_checkpoint, kernels (never the model module, dbrx.train or dbrx.cli).
"""

from .layers import LoraConfig, LoraExperts, LoraLinear, apply_lora, has_lora, lora_state_dict, merge_lora
from .peft_format import load_adapter, merge_checkpoint, read_peft, save_adapter

__all__ = ["LoraConfig", "LoraLinear", "LoraExperts", "apply_lora", "merge_lora", "lora_state_dict", "has_lora",
           "save_adapter", "load_adapter", "merge_checkpoint", "read_peft"]
