"""Wan's CLIP image encoder against transformers' CLIPVisionModel, on tiny random ViTs at ViT-H's token count.

Each model is a random transformers-layout state dict (post-norm and
projection included, as clip_vision_h.safetensors holds), written as a real
file and loaded by our loader; transformers loads the very same file with
its own `from_pretrained`, so the two agree on the on-disk names too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from engine.gguf import write_gguf
from engine.wan.clip import (
    CLIP_VIT_H_14,
    HEAD_COUNT_KEY,
    ClipVisionConfig,
    ClipVisionEncoder,
    ClipVisionError,
    encode_image,
    infer_config,
    load_clip_vision,
    preprocess,
)
from engine.wan.convert.clip import (
    TINY_CLIP_CONFIG,
    clip_vision_file_shapes,
    open_clip_state_dict,
    tiny_clip_vision_state_dict,
    write_clip_vision_safetensors,
)

# Float32 on both sides, the same ops in the same order: differences are rounding only (measured: 0).
ORACLE_ATOL = 1e-5
# Preprocessing: the same float32 ops, written independently; an HF processor's rescale rounds differently.
PREPROCESS_ATOL = 1e-5


def hf_config(config: ClipVisionConfig, hidden_act: str = "gelu") -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        patch_size=config.patch_size, image_size=config.image_size,
        hidden_act=hidden_act, layer_norm_eps=config.layer_norm_eps,
    )


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return tiny_clip_vision_state_dict(seed=0)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny_state: dict[str, torch.Tensor]) -> Path:
    """The tiny model as a transformers model folder: model.safetensors (ours) and config.json."""
    folder = tmp_path_factory.mktemp("clip")
    write_clip_vision_safetensors(tiny_state, folder / "model.safetensors", num_heads=TINY_CLIP_CONFIG.num_heads)
    hf_config(TINY_CLIP_CONFIG).save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def tiny_encoder(tiny_file: Path) -> ClipVisionEncoder:
    return load_clip_vision(tiny_file)


@pytest.fixture(scope="module")
def hf_outputs(tiny_file: Path) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Pixels and transformers' hidden states for them, the model loaded from our file by from_pretrained."""
    model, info = CLIPVisionModel.from_pretrained(tiny_file.parent, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels, output_hidden_states=True)
    return pixels, out.hidden_states


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the model against transformers -------------------------------------------------------------------

def test_features_match_transformers_penultimate_hidden_state(tiny_encoder, hf_outputs):
    pixels, hidden_states = hf_outputs
    assert len(hidden_states) == TINY_CLIP_CONFIG.num_layers + 1  # embeddings, then one per layer
    with torch.no_grad():
        ours = tiny_encoder(pixels)
    assert ours.dtype == torch.float32
    assert ours.shape == (2, 257, TINY_CLIP_CONFIG.hidden_size)
    assert max_diff(ours, hidden_states[-2]) <= ORACLE_ATOL
    # The features respond to the input: the two images' tokens are far apart.
    assert max_diff(ours[0], ours[1]) > 0.5


def test_oracle_tells_penultimate_from_last_layer(tiny_encoder, hf_outputs):
    pixels, hidden_states = hf_outputs
    with torch.no_grad():
        ours = tiny_encoder(pixels)
    assert max_diff(ours, hidden_states[-1]) > 1000 * ORACLE_ATOL


def test_oracle_tells_gelu_from_quick_gelu(tiny_file, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    quick = CLIPVisionModel.from_pretrained(tiny_file.parent, hidden_act="quick_gelu").eval()
    with torch.no_grad():
        mistaken = quick(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        ours = tiny_encoder(pixels)
    assert max_diff(ours, mistaken) > 1000 * ORACLE_ATOL


def test_oracle_tells_a_missing_pre_layernorm(tiny_file, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    no_pre_norm = CLIPVisionModel.from_pretrained(tiny_file.parent).eval()
    no_pre_norm.pre_layrnorm = torch.nn.Identity()
    with torch.no_grad():
        mistaken = no_pre_norm(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        ours = tiny_encoder(pixels)
    assert max_diff(ours, mistaken) > 1000 * ORACLE_ATOL


def test_published_vit_h_config_is_inferred_from_its_shapes():
    shapes = clip_vision_file_shapes(CLIP_VIT_H_14)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1280)
    assert shapes["visual_projection.weight"] == (1024, 1280)
    assert infer_config(shapes) == CLIP_VIT_H_14  # 16 heads from 1280 / 80
    assert CLIP_VIT_H_14.head_dim == 80 and CLIP_VIT_H_14.num_layers == 32
    with torch.device("meta"):  # shapes only: the full-size forward gives Wan's 257 x 1280 context
        assert ClipVisionEncoder(CLIP_VIT_H_14)(torch.empty(1, 3, 224, 224)).shape == (1, 257, 1280)


def test_forward_refuses_pixels_of_the_wrong_size(tiny_encoder):
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, 224, 224\]"):
        tiny_encoder(torch.zeros(1, 3, 200, 200))


# --- preprocessing ---------------------------------------------------------------------------------------

def official_clip_visual_preprocess(img: torch.Tensor) -> torch.Tensor:
    """wan/modules/clip.py `CLIPModel.visual`'s preprocessing, for the [3, H, W] image image2video.py gives it."""
    videos = [img[:, None, :, :]]  # image2video.py: self.clip.visual([img[:, None, :, :]])
    videos = torch.cat([
        F.interpolate(u.transpose(0, 1), size=(224, 224), mode="bicubic", align_corners=False) for u in videos
    ])
    videos = videos.mul_(0.5).add_(0.5)
    # torchvision's T.Normalize on a tensor: in place sub of mean, div by std, per channel.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return videos.sub_(mean).div_(std)


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_preprocess_matches_the_official_expression():
    image = random_image(480, 832, seed=2)
    ours = preprocess(image)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert max_diff(ours, official_clip_visual_preprocess(image.clone())) <= PREPROCESS_ATOL


@pytest.mark.parametrize("mistake", ["normalise before the shift", "antialias", "align_corners", "bilinear"])
def test_preprocess_check_rejects_a_mistaken_preprocessing(mistake):
    image = random_image(480, 832, seed=2)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    resize = dict(size=(224, 224), mode="bicubic", align_corners=False)
    if mistake == "antialias":
        resize["antialias"] = True
    if mistake == "align_corners":
        resize["align_corners"] = True
    if mistake == "bilinear":
        resize["mode"] = "bilinear"
    x = F.interpolate(image[None], **resize)
    x = ((x - mean) / std) * 0.5 + 0.5 if mistake == "normalise before the shift" else (x * 0.5 + 0.5 - mean) / std
    assert max_diff(x, official_clip_visual_preprocess(image.clone())) > 1000 * PREPROCESS_ATOL


def test_preprocess_matches_clip_image_processor_on_a_224_image():
    # At 224x224 both resizes are the identity and HF's centre crop keeps everything,
    # so Wan's [-1, 1] -> [0, 1] shift must equal HF's rescale by 1/255.
    pixels = np.random.default_rng(3).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    hf = CLIPImageProcessorPil()(Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    assert max_diff(preprocess(image), hf) <= PREPROCESS_ATOL
    assert max_diff(preprocess(image.flip(-1)), hf) > 1.0  # the comparison sees the pixels


def test_encode_image_gives_wan_context_of_the_image(tiny_encoder):
    image = random_image(480, 832, seed=4)
    context = encode_image(tiny_encoder, image)
    assert context.shape == (257, TINY_CLIP_CONFIG.hidden_size) and context.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(context, tiny_encoder(preprocess(image))[0])
    assert max_diff(context, encode_image(tiny_encoder, random_image(480, 832, seed=5))) > 0.5


# --- files -------------------------------------------------------------------------------------------------

def test_safetensors_round_trip_keeps_every_tensor(tiny_encoder, tiny_state):
    assert tiny_encoder.config == TINY_CLIP_CONFIG  # 4 heads from the file's metadata, not 64 / 80
    loaded = tiny_encoder.state_dict()
    ignored = {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"}
    assert set(loaded) == set(tiny_state) - ignored
    for name, tensor in loaded.items():
        assert torch.equal(tensor, tiny_state[name]), name


def test_head_count_argument_overrides_the_file(tiny_file, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    two_heads = load_clip_vision(tiny_file, num_heads=2)
    assert two_heads.config.num_heads == 2
    with torch.no_grad():
        assert max_diff(two_heads(pixels), tiny_encoder(pixels)) > 1e-2


def test_unused_tensors_are_ignored(tmp_path, tiny_state, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    extra = dict(tiny_state)
    extra["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    extra["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(4, 4)
    extra["text_projection.weight"] = torch.zeros(4, 4)
    extra["logit_scale"] = torch.tensor(4.6)
    write_clip_vision_safetensors(extra, tmp_path / "full_clip.safetensors", num_heads=4)
    with torch.no_grad():
        assert torch.equal(load_clip_vision(tmp_path / "full_clip.safetensors")(pixels), tiny_encoder(pixels))


def test_open_clip_layout_loads_the_same_model(tmp_path, tiny_state, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    state = open_clip_state_dict(tiny_state)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state and "visual.proj" in state
    state["text.transformer.0.attn.q.weight"] = torch.zeros(4, 4)  # the XLM-RoBERTa tower: not ours to read
    state["logit_scale"] = torch.tensor(4.6)
    write_clip_vision_safetensors(state, tmp_path / "open_clip.safetensors", num_heads=4)
    model = load_clip_vision(tmp_path / "open_clip.safetensors")
    assert model.config == TINY_CLIP_CONFIG
    with torch.no_grad():
        assert torch.equal(model(pixels), tiny_encoder(pixels))


def test_gguf_file_loads_the_same_model(tmp_path, tiny_state, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    tensors = {name: (t.numpy(), GGMLQuantizationType.F32) for name, t in tiny_state.items()}
    write_gguf(tmp_path / "clip.gguf", "clip", tensors, metadata={HEAD_COUNT_KEY: 4})
    model = load_clip_vision(tmp_path / "clip.gguf")
    assert model.config == TINY_CLIP_CONFIG
    with torch.no_grad():
        assert torch.equal(model(pixels), tiny_encoder(pixels))


def test_bfloat16_weights_give_float32_features_close_to_float32(tiny_file, tiny_encoder, hf_outputs):
    pixels, _ = hf_outputs
    model = load_clip_vision(tiny_file, dtype=torch.bfloat16)
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        features, reference = model(pixels), tiny_encoder(pixels)
    assert features.dtype == torch.float32
    assert max_diff(features, reference) < 0.1 * reference.abs().max().item()


# --- errors ------------------------------------------------------------------------------------------------

def _without(state: dict, *prefixes: str) -> dict:
    return {name: t for name, t in state.items() if not name.startswith(prefixes)}


BAD_FILES = {
    "missing tensor": (
        lambda s: _without(s, "vision_model.encoder.layers.1.layer_norm2.bias"),
        "missing tensor 'vision_model.encoder.layers.1.layer_norm2.bias'"),
    "missing layer": (
        lambda s: _without(s, "vision_model.encoder.layers.1."),
        "missing tensor 'vision_model.encoder.layers.1.layer_norm1.weight'"),
    "unexpected tensor": (
        lambda s: {**s, "vision_model.encoder.layers.0.self_attn.rogue.weight": torch.zeros(2)},
        "unexpected tensor 'vision_model.encoder.layers.0.self_attn.rogue.weight'"),
    "mis-shaped tensor": (
        lambda s: {**s, "vision_model.encoder.layers.2.mlp.fc2.weight": torch.zeros(64, 100)},
        r"tensor 'vision_model.encoder.layers.2.mlp.fc2.weight' has shape \[64, 100\], expected \[64, 128\]"),
    "no square grid": (
        lambda s: {**s, "vision_model.embeddings.position_embedding.weight": torch.zeros(200, 64)},
        "200 positions, not a class token plus a square grid"),
    "unknown layout": (
        lambda s: {"model.diffusion_model.blocks.0.weight": torch.zeros(2)},
        "neither a transformers CLIP vision layout"),
    "bad fused q/k/v": (
        lambda s: {**open_clip_state_dict(s),
                   "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(100, 64)},
        "fused tensor 'visual.transformer.resblocks.0.attn.in_proj_weight' has shape \\[100, 64\\]"),
    "open-clip unknown tensor": (
        lambda s: {**open_clip_state_dict(s), "visual.attn_pool.query": torch.zeros(2)},
        "unexpected tensor 'visual.attn_pool.query'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused_naming_file_and_tensor(tmp_path, tiny_state, case):
    mutate, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    write_clip_vision_safetensors(mutate(tiny_state), path, num_heads=4)
    with pytest.raises(ClipVisionError, match=message) as err:
        load_clip_vision(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_head_count_must_be_known_and_fit(tmp_path, tiny_state):
    path = tmp_path / "no_heads.safetensors"
    write_clip_vision_safetensors(tiny_state, path)  # no head count, and 64 is not a multiple of 80
    with pytest.raises(ClipVisionError, match="pass num_heads"):
        load_clip_vision(path)
    with pytest.raises(ClipVisionError, match="does not split into 5 heads"):
        load_clip_vision(path, num_heads=5)
    assert load_clip_vision(path, num_heads=4).config == TINY_CLIP_CONFIG
    write_clip_vision_safetensors(tiny_state, path, num_heads="four")  # type: ignore[arg-type]
    with pytest.raises(ClipVisionError, match="'four', not a head count"):
        load_clip_vision(path)


def test_pickles_missing_files_and_garbage_are_refused(tmp_path):
    pickle = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ClipVisionError, match="pickled checkpoints"):
        load_clip_vision(pickle)
    with pytest.raises(ClipVisionError, match="no such file"):
        load_clip_vision(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ClipVisionError, match="neither a safetensors nor a GGUF file") as err:
        load_clip_vision(garbage)
    assert "\n" not in str(err.value)
