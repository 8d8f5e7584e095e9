"""Weight quantization for memory-light fine-tuning: NF4 (QLoRA), FP4 and per-row int8.

Plain PyTorch (no bitsandbytes at runtime), identical on CPU and CUDA. NF4 codes, absmax
and double-quantization state are bit-identical to bitsandbytes' CPU `quantize_4bit`.
"""

from lorakit.quant.int8 import Int8Tensor, quantize_int8
from lorakit.quant.linear import (Int8Linear, NF4Linear, QuantizedLinear, is_conv1d, is_linear,
                                  quantize_model_linears)
from lorakit.quant.fp4 import FP4_CODE
from lorakit.quant.nf4 import NF4_CODE, NF4Tensor, quantize_4bit, quantize_fp4, quantize_nf4

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "Int8Linear",
    "Int8Tensor",
    "NF4Linear",
    "NF4Tensor",
    "QuantizedLinear",
    "is_conv1d",
    "is_linear",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_int8",
    "quantize_model_linears",
    "quantize_nf4",
]
