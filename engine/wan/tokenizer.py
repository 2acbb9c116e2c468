"""umT5's SentencePiece tokenizer: Wan's prompt cleaning, and the tokenizer rebuilt from GGUF metadata.

A llama.cpp GGUF carries the unigram vocabulary as `tokenizer.ggml.*` keys
(convert_hf_to_gguf.py, T5EncoderModel.set_vocab). We rebuild the SentencePiece
`ModelProto` from them and let `sentencepiece` tokenize, so the ids are the
ones the original `spiece.model` gives.
"""
from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ftfy
from google.protobuf.message import DecodeError
from sentencepiece import SentencePieceProcessor
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
_KEY = "tokenizer.ggml."


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
