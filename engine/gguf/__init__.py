"""GGUF weights: memory-mapped reading, torch dequantization, quantized linear layers."""
from engine.gguf.dequant import DEQUANTIZERS, UnsupportedQuantType, dequantize
from engine.gguf.linear import QuantizedLinear, WeightPolicy, load_gguf_into
from engine.gguf.reader import GGUFFile, GGUFFormatError, TensorInfo
from engine.gguf.writer import write_gguf

__all__ = [
    "DEQUANTIZERS",
    "GGUFFile",
    "GGUFFormatError",
    "QuantizedLinear",
    "TensorInfo",
    "UnsupportedQuantType",
    "WeightPolicy",
    "dequantize",
    "load_gguf_into",
    "write_gguf",
]
