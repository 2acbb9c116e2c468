"""Writers of the original Wan file layouts: state dicts out to .safetensors and .gguf files."""
