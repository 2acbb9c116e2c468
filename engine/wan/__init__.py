from engine.wan.vae import VAEError, WanVAE, WanVAEConfig, load_vae, tiny_vae_state_dict, write_vae_safetensors
from engine.wan.dit import (WAN_CONFIGS, ModelConfigError, WanConfig, WanModel, community_qtype, config_name, infer_config,
                            load_dit, write_dit_gguf)
from engine.wan.t5 import (UMT5_XXL, TextEncoderError, UMT5Config, UMT5Encoder, encode_text, load_text_encoder,
                           write_umt5_gguf)
from engine.wan.tokenizer import Tokenizer, TokenizerError, clean_prompt, train_tiny_tokenizer
