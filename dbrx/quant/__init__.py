"""Weight-only int8 / int4 quantization, applied to a built model from outside (the model file never learns of it).

  formats     the quantization arithmetic, the checkpoint layout (int4: two codes per byte) and torch's CPU kernel
              layout and calls (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
  layers      QuantLinear, QuantEmbedding, QuantExperts (the stacked experts stay one module)
  apply       which weights are quantized (attention, experts, optionally the head and the embedding; never the
              router), `quantize_model` (in place)
  checkpoint  `save_quantized`, `quantize_checkpoint` (streamed, for `dbrx quantize`), `load_quantized`

Imports: config, devices, hf_checkpoint, model, kernels.experts (sort_by_expert); nothing imports this package but
the CLI.
"""

from .apply import DEFAULT_TARGETS, TARGETS, QuantSpec, is_quantized, quantize_model
from .checkpoint import checkpoint_bytes, load_quantized, quantize_checkpoint, save_quantized
from .formats import INT4_GROUP_SIZES

__all__ = ["quantize_model", "save_quantized", "quantize_checkpoint", "load_quantized", "is_quantized", "QuantSpec",
           "TARGETS", "DEFAULT_TARGETS", "INT4_GROUP_SIZES", "checkpoint_bytes"]
