"""umT5 text-encoder files as llama.cpp writes them, and the tiny tokenizer of the embedded default model.

`write_umt5_gguf` writes what convert_hf_to_gguf.py + llama-quantize make of an
HF umT5 encoder (architecture "t5encoder", llama.cpp tensor names, the
SentencePiece tokenizer in the `tokenizer.ggml.*` metadata);
`train_tiny_tokenizer` trains the small umT5-like tokenizer the tiny models carry.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES, Keys
from sentencepiece import SentencePieceTrainer
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from torch import Tensor

from engine.gguf import write_gguf
from engine.wan.t5 import TEXT_LEN, TextEncoderError, check_tensors, expected_shapes, hf_to_llama, infer_config
from engine.wan.tokenizer import TokenizerError

_UNUSED_SCORE = -10000.0  # what the converter gives the [PAD{i}] rows beyond the spm vocabulary


def _gguf_type(quant: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[quant.upper()]
    except KeyError:
        raise TextEncoderError(f"unknown GGUF quantization {quant!r}") from None


def write_umt5_gguf(
    state_dict: Mapping[str, Tensor],
    tokenizer_model_proto: bytes,
    path: str | os.PathLike[str],
    quant: str = "Q8_0",
) -> None:
    """Write the encoder as llama.cpp's convert_hf_to_gguf.py + llama-quantize do (arch "t5encoder").

    2-D weights (the token embedding included, as in umt5-xxl-encoder-Q8_0.gguf)
    are quantized to `quant`, falling back to F16 where a row is not a whole
    number of blocks; norms and the relative-position biases stay F32
    (llama-quantize never quantizes `attn_rel_b`). The tokenizer goes into the
    `tokenizer.ggml.*` metadata. Same input -> same bytes.
    """
    qtype = _gguf_type(quant)
    hf = {n: t for n, t in state_dict.items() if not n.startswith(("decoder.", "lm_head."))}
    tied = hf.pop("encoder.embed_tokens.weight", None)
    if tied is not None:
        hf.setdefault("shared.weight", tied)
    config = infer_config({n: tuple(t.shape) for n, t in hf.items()})
    expected = expected_shapes(config)
    check_tensors(Path("<state_dict>"), expected, {n: tuple(t.shape) for n, t in hf.items()}, lambda name: name)

    block_size, _ = GGML_QUANT_SIZES[qtype]
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    # llama.cpp's order: token_embd, the blocks in order, enc.output_norm.
    for name in _ordered(expected):
        array = hf[name].detach().to("cpu", torch.float32).numpy()
        if array.ndim == 2 and "relative_attention_bias" not in name:
            whole_blocks = array.shape[-1] % block_size == 0
            tensors[hf_to_llama(name)] = (array, qtype if whole_blocks else GGMLQuantizationType.F16)
        else:
            tensors[hf_to_llama(name)] = (array, GGMLQuantizationType.F32)

    arch = "t5encoder"
    file_type = LlamaFileType.ALL_F32 if qtype == GGMLQuantizationType.F32 else LlamaFileType[f"MOSTLY_{qtype.name}"]
    metadata: dict[str, Any] = {
        f"{arch}.context_length": TEXT_LEN,
        f"{arch}.embedding_length": config.dim,
        f"{arch}.feed_forward_length": config.ffn_dim,
        f"{arch}.block_count": config.num_layers,
        f"{arch}.attention.head_count": config.heads,
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.attention.layer_norm_epsilon": config.eps,
        f"{arch}.attention.relative_buckets_count": config.num_buckets,
        f"{arch}.attention.layer_norm_rms_epsilon": config.eps,
        "general.file_type": int(file_type),
        **gguf_tokenizer_metadata(tokenizer_model_proto, vocab_size=config.vocab),
    }
    write_gguf(path, arch, tensors, metadata)


def _ordered(names: Iterable[str]) -> list[str]:
    """shared first, blocks by number (not by string), the final norm last."""
    def key(name: str) -> tuple[int, int, str]:
        if name.startswith("shared."):
            return (0, 0, name)
        if name.startswith("encoder.block."):  # encoder.block.<n>.layer...
            return (1, int(name.split(".")[2]), name)
        return (2, 0, name)
    return sorted(names, key=key)


def gguf_tokenizer_metadata(model_proto: bytes, vocab_size: int | None = None) -> dict[str, Any]:
    """The `tokenizer.ggml.*` keys llama.cpp's converter writes for a T5 unigram model.

    Rows of the embedding beyond the SentencePiece vocabulary (umT5: 256384
    rows, 256300 pieces) become UNUSED `[PAD{id}]` tokens, as the converter does.
    """
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.UNIGRAM:
        raise TokenizerError("only unigram SentencePiece models (T5's) are supported")
    pieces = list(proto.pieces)
    vocab_size = len(pieces) if vocab_size is None else vocab_size
    if vocab_size < len(pieces):
        raise TokenizerError(f"the tokenizer has {len(pieces)} pieces but the embedding only {vocab_size} rows")
    tokens = [p.piece for p in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    scores = [p.score for p in pieces] + [_UNUSED_SCORE] * (vocab_size - len(pieces))
    types = [int(p.type) for p in pieces] + [int(sp_pb2.ModelProto.SentencePiece.UNUSED)] * (vocab_size - len(pieces))
    spec = proto.trainer_spec
    metadata: dict[str, Any] = {
        Keys.Tokenizer.MODEL: "t5",
        Keys.Tokenizer.PRE: "default",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.SCORES: scores,
        Keys.Tokenizer.TOKEN_TYPE: types,
        Keys.Tokenizer.ADD_PREFIX: proto.normalizer_spec.add_dummy_prefix,
        Keys.Tokenizer.REMOVE_EXTRA_WS: proto.normalizer_spec.remove_extra_whitespaces,
    }
    if proto.normalizer_spec.precompiled_charsmap:
        # a UINT8 array, as gguf-py's add_precompiled_charsmap writes bytes
        metadata[Keys.Tokenizer.PRECOMPILED_CHARSMAP] = bytes(proto.normalizer_spec.precompiled_charsmap)
    for key, piece_id in ((Keys.Tokenizer.EOS_ID, spec.eos_id), (Keys.Tokenizer.UNK_ID, spec.unk_id),
                          (Keys.Tokenizer.PAD_ID, spec.pad_id)):
        if piece_id >= 0:
            metadata[key] = piece_id
    return metadata


# --- the tiny tokenizer of the embedded default model -----------------------------------

_SUBJECTS = [
    "a red fox", "two astronauts", "an old fisherman", "a tiny robot", "a herd of wild horses",
    "the city skyline", "a golden retriever", "three paper boats", "a jazz pianist", "a hummingbird",
    "a steam locomotive", "a field of sunflowers", "a glass of orange juice", "twin waterfalls",
    "a sleepy cat", "a marching band", "an ice sculpture", "a lighthouse keeper",
]
_ACTIONS = [
    "runs across", "floats above", "dances slowly through", "is reflected in", "walks along",
    "spins around", "glides over", "rests beside", "emerges from", "melts into",
]
_PLACES = [
    "a snowy forest", "the neon streets of Tokyo", "a quiet beach at dawn", "the surface of Mars",
    "a crowded market", "an abandoned factory", "a mountain lake", "the desert at noon",
    "a rainy alley", "a field of lavender", "a coral reef", "the rooftop garden",
]
_STYLES = [
    "cinematic lighting", "shot on 35mm film", "4K, ultra detailed", "slow motion, 120 fps",
    "drone footage", "watercolor style", "soft focus, bokeh", "golden hour", "black & white",
    "handheld camera", "time-lapse", "close-up shot",
]
_CJK = [
    "一只小猫在草地上奔跑，阳光明媚。", "夜晚的城市灯火辉煌，车流不息。", "海浪轻轻拍打着沙滩。",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，",
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，",
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
    "一位老人在公园里打太极拳。", "雪山脚下有一片宁静的湖泊。", "宇航员在月球表面行走。",
    "東京の夜景がとても綺麗です。", "桜の花びらが風に舞っている。", "서울의 밤거리를 걷는 사람들.",
    "熊猫正在吃竹子，镜头缓缓推进。", "金色的麦田在风中摇曳。",
]


def tiny_corpus() -> list[str]:
    """A fixed corpus of a few hundred prompt-like sentences (English with digits and punctuation, CJK)."""
    sentences = []
    for i in range(240):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        action = _ACTIONS[(i * 7) % len(_ACTIONS)]
        place = _PLACES[(i * 5 + i // 12) % len(_PLACES)]
        style = _STYLES[(i * 11) % len(_STYLES)]
        sentence = f"{subject.capitalize()} {action} {place}; {style}."
        if i % 3 == 0:
            sentence += f" Scene {i}, take {i % 7 + 1}: {1990 + i % 35}!"
        if i % 4 == 1:
            sentence = f'"{sentence}" (version {i / 8:.2f}) - 100% real?'
        sentences.append(sentence)
    for i, text in enumerate(_CJK * 4):
        sentences.append(text if i % 2 else f"{text} {i}")
    return sentences


def train_tiny_tokenizer(vocab_size: int = 600) -> bytes:
    """A small umT5-like unigram SentencePiece model, byte-identical on every run.

    Like umT5's: pad=0, eos=1, unk=2, no BOS, NFKC normalization, byte fallback.
    vocab_size must lie in 491..748 for this corpus (its characters and
    the 256 byte pieces are required; the corpus supports no more pieces).

    Single-threaded on a fixed corpus with no sampling or shuffling, so the
    serialized model depends only on the sentencepiece version.
    """
    out = io.BytesIO()
    try:
        SentencePieceTrainer.train(
            sentence_iterator=iter(tiny_corpus()),
            model_writer=out,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as exc:  # sentencepiece reports an impossible vocab_size this way
        raise TokenizerError(f"cannot train the tiny tokenizer with vocab_size={vocab_size}: {exc}") from exc
    return out.getvalue()
