"""umT5's SentencePiece tokenizer: Wan's prompt cleaning, and the tokenizer rebuilt from GGUF metadata.

A llama.cpp GGUF carries the unigram vocabulary as `tokenizer.ggml.*` keys
(convert_hf_to_gguf.py, T5EncoderModel.set_vocab). We rebuild the SentencePiece
`ModelProto` from them and let `sentencepiece` tokenize, so the ids are the
ones the original `spiece.model` gives.
"""
from __future__ import annotations

import hashlib
import html
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ftfy
from google.protobuf.message import DecodeError
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

if TYPE_CHECKING:
    from engine.gguf import GGUFFile

MAX_LENGTH = 512  # Wan's text_len: tokens per prompt, EOS included


class TokenizerError(ValueError):
    """A tokenizer that cannot be built: missing or inconsistent tokenizer metadata, unreadable model file."""


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy fix, HTML-unescape twice, collapse whitespace runs, strip."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# llama.cpp token types (SentencePieceTokenTypes in convert_hf_to_gguf.py) use
# the numbers of sentencepiece's ModelProto.SentencePiece.Type.
_PIECE_TYPES = {
    1: sp_pb2.ModelProto.SentencePiece.NORMAL,
    2: sp_pb2.ModelProto.SentencePiece.UNKNOWN,
    3: sp_pb2.ModelProto.SentencePiece.CONTROL,
    4: sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
    5: sp_pb2.ModelProto.SentencePiece.UNUSED,
    6: sp_pb2.ModelProto.SentencePiece.BYTE,
}
_UNUSED_SCORE = -10000.0  # what the converter gives the [PAD{i}] rows beyond the spm vocabulary

_KEY = "tokenizer.ggml."


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
        _KEY + "model": "t5",
        _KEY + "pre": "default",
        _KEY + "tokens": tokens,
        _KEY + "scores": scores,
        _KEY + "token_type": types,
        _KEY + "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        _KEY + "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
    }
    if proto.normalizer_spec.precompiled_charsmap:
        # a UINT8 array, as gguf-py's add_precompiled_charsmap writes bytes
        metadata[_KEY + "precompiled_charsmap"] = bytes(proto.normalizer_spec.precompiled_charsmap)
    for key, piece_id in (("eos_token_id", spec.eos_id), ("unknown_token_id", spec.unk_id),
                          ("padding_token_id", spec.pad_id)):
        if piece_id >= 0:
            metadata[_KEY + key] = piece_id
    return metadata


def _model_proto_from_metadata(meta: Mapping[str, Any], source: str) -> sp_pb2.ModelProto:
    def get(key: str) -> Any:
        if _KEY + key not in meta:
            raise TokenizerError(f"{source}: no {_KEY + key} in the metadata (not a GGUF with a T5 tokenizer)")
        return meta[_KEY + key]

    if get("model") != "t5":
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {get('model')!r}, expected 't5' (SentencePiece unigram)"
        )

    def array(key: str, kind: type | tuple[type, ...], what: str) -> list[Any]:
        value = get(key)
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise TokenizerError(f"{source}: {_KEY + key} must be an array of {what}")
        return value

    tokens = array("tokens", str, "strings")
    scores = array("scores", (int, float), "numbers")
    types = array("token_type", int, "integers")
    if not len(tokens) == len(scores) == len(types):
        raise TokenizerError(
            f"{source}: {len(tokens)} tokens, {len(scores)} scores and {len(types)} token types do not match"
        )

    proto = sp_pb2.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if int(kind) not in _PIECE_TYPES:
            raise TokenizerError(f"{source}: token {i} has unknown token type {kind}")
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = float(score)
        piece.type = _PIECE_TYPES[int(kind)]

    def special(key: str, expected: int) -> int:
        if _KEY + key not in meta:
            return -1
        piece_id = meta[_KEY + key]
        if type(piece_id) is not int or not 0 <= piece_id < len(tokens) or proto.pieces[piece_id].type != expected:
            kind = sp_pb2.ModelProto.SentencePiece.Type.Name(expected)
            raise TokenizerError(f"{source}: {_KEY + key} = {piece_id!r} is not a {kind} token")
        return piece_id

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(tokens)
    # sentencepiece finds its special ids through these pieces' names
    trainer.unk_id = special("unknown_token_id", sp_pb2.ModelProto.SentencePiece.UNKNOWN)
    if trainer.unk_id < 0:
        unknown = [i for i, p in enumerate(proto.pieces) if p.type == sp_pb2.ModelProto.SentencePiece.UNKNOWN]
        if len(unknown) != 1:
            raise TokenizerError(f"{source}: the vocabulary has {len(unknown)} UNKNOWN tokens, expected one")
        trainer.unk_id = unknown[0]
    trainer.eos_id = special("eos_token_id", sp_pb2.ModelProto.SentencePiece.CONTROL)
    trainer.pad_id = special("padding_token_id", sp_pb2.ModelProto.SentencePiece.CONTROL)
    trainer.bos_id = -1  # T5 has no BOS; a bos_token_id key, if any, is not used by the encoder
    trainer.unk_piece = proto.pieces[trainer.unk_id].piece
    for field in ("eos", "pad"):
        piece_id = getattr(trainer, f"{field}_id")
        if piece_id >= 0:
            setattr(trainer, f"{field}_piece", proto.pieces[piece_id].piece)
    # byte pieces exist exactly when the model was trained with byte fallback
    trainer.byte_fallback = any(p.type == sp_pb2.ModelProto.SentencePiece.BYTE for p in proto.pieces)

    normalizer = proto.normalizer_spec
    charsmap = meta.get(_KEY + "precompiled_charsmap")
    # llama.cpp reads a UINT8 or an INT8 array (an INT8 element b is the byte b & 0xFF)
    if charsmap is not None and not (isinstance(charsmap, list)
                                     and all(type(b) is int and -128 <= b <= 255 for b in charsmap)):
        raise TokenizerError(f"{source}: {_KEY}precompiled_charsmap must be an array of bytes (UINT8 or INT8)")
    if charsmap:
        normalizer.name = "nmt_nfkc"  # informational: the charsmap itself drives normalization
        normalizer.precompiled_charsmap = bytes(b & 0xFF for b in charsmap)
    else:
        normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get(_KEY + "add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(meta.get(_KEY + "remove_extra_whitespaces", True))
    normalizer.escape_whitespaces = True
    return proto


class Tokenizer:
    """umT5's SentencePiece tokenizer as Wan drives it: clean, tokenize, EOS, at most 512 tokens."""

    def __init__(self, model_proto: bytes, max_length: int = MAX_LENGTH) -> None:
        self.model_proto = model_proto
        self.max_length = max_length
        try:
            self.processor = SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as exc:  # sentencepiece's own validation (duplicate pieces, bad specs)
            raise TokenizerError(f"sentencepiece rejects the model: {exc}") from exc
        if self.processor.eos_id() < 0:
            raise TokenizerError("the tokenizer has no EOS token; T5 appends one to every prompt")
        self.digest = hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> Tokenizer:
        proto = _model_proto_from_metadata(gguf_file.metadata, str(gguf_file.path))
        return cls(proto.SerializeToString(deterministic=True))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A SentencePiece `.model` file (`spiece.model`, `tokenizer.model`)."""
        path = Path(path)
        try:
            data = path.read_bytes()
            proto = sp_pb2.ModelProto()
            proto.ParseFromString(data)
        except (OSError, DecodeError) as exc:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({exc})") from exc
        if not proto.pieces:
            raise TokenizerError(f"{path}: not a SentencePiece model (no pieces)")
        return cls(data)

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of the cleaned prompt, EOS last; truncated to max_length keeping EOS (HF T5 truncation)."""
        max_length = self.max_length if max_length is None else max_length
        if max_length < 1:
            raise ValueError(f"max_length must leave room for EOS, got {max_length}")
        ids = self.processor.encode(clean_prompt(text), out_type=int)
        return ids[: max_length - 1] + [self.eos_id]


# -- the tiny tokenizer of the embedded default model ------------------------

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
