"""GGUF weights: memory-mapped reading, torch dequantization, quantized linear layers."""
from engine.gguf.dequant import DEQUANTIZERS, UnsupportedQuantType, dequantize
from engine.gguf.reader import GGUFFile, GGUFFormatError, TensorInfo
from engine.gguf.writer import write_gguf

__all__ = [
    "DEQUANTIZERS",
    "GGUFFile",
    "GGUFFormatError",
    "TensorInfo",
    "UnsupportedQuantType",
    "dequantize",
    "write_gguf",
]
