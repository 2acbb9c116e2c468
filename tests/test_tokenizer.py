"""umT5 tokenizer: rebuilt from GGUF metadata it tokenizes exactly as the original SentencePiece model; Wan's cleaning."""
from __future__ import annotations

import hashlib
import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from engine.gguf import GGUFFile, write_gguf
from engine.wan.convert.t5 import gguf_tokenizer_metadata, tiny_corpus, train_tiny_tokenizer
from engine.wan.tokenizer import Tokenizer, TokenizerError, clean_prompt

EXTRA_ROWS = 5  # embedding rows beyond the pieces, as umT5 has 84


def _train(**options) -> bytes:
    rng = random.Random(1234)
    syllables = ["ka", "ri", "ver", "mon", "tan", "lan", "ter", "or", "ches", "tra", "peb", "ble", "thun", "vel",
                 "vet", "har", "bor", "sil", "qu", "ex", "zo", "ny", "wh", "ip", "ge", "ust", "a", "e", "i", "o"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(400)]
    corpus = [" ".join(rng.choices(words, k=12)) + f", {rng.randint(0, 9999)}!" for _ in range(400)]
    corpus += ["一只猫在雨中散步。", "東京タワーの夜景。", "naïve café déjà vu", "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３"] * 10
    out = io.BytesIO()
    SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=out, model_type="unigram",
                               pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2, **options)
    return out.getvalue()


# T5-like: NFKC normalization (a precompiled charsmap), dummy prefix, whitespace squeezing, user symbols.
T5_LIKE = dict(vocab_size=220, user_defined_symbols=["<extra_id_0>", "<extra_id_1>"], character_coverage=0.98)
# The other settings: no normalization map, no dummy prefix, whitespace kept, byte fallback.
RAW = dict(vocab_size=420, normalization_rule_name="identity", add_dummy_prefix=False,
           remove_extra_whitespaces=False, byte_fallback=True, character_coverage=1.0)


@pytest.fixture(scope="module", params=["t5_like", "raw"])
def pair(request, tmp_path_factory) -> tuple[SentencePieceProcessor, Tokenizer]:
    """(the original model, our tokenizer rebuilt from a GGUF file holding its metadata)."""
    proto = _train(**(T5_LIKE if request.param == "t5_like" else RAW))
    original = SentencePieceProcessor(model_proto=proto)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.gguf"
    write_gguf(path, "t5encoder", {}, gguf_tokenizer_metadata(proto, vocab_size=original.get_piece_size() + EXTRA_ROWS))
    return original, Tokenizer.from_gguf(GGUFFile(path))


FIXED = [
    "", " ", "   ", "\t\n", "a", "A red fox runs across a snowy forest.",
    "  leading and trailing  ", "many     inner      spaces", "tabs\tand\nnewlines\r\nmixed",
    "一只猫在雨中散步。", "東京タワーの夜景。", "서울의 밤", "naïve café déjà vu", "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３",
    "ﬁ ligature ① ㈱ ½", "emoji 🦊🎬👩‍👩‍👧 end", "<extra_id_0> sentinel <extra_id_1>", "<pad></s><unk>",
    "\u200b zero width \u00a0 nbsp \u3000 ideographic", "e\u0301 combining", "x" * 600,
    "river mountain lantern " * 300, "数字 0123456789 и кириллица", "🦊" * 50,
]


@pytest.mark.parametrize("text", FIXED)
def test_gguf_tokenizer_matches_sentencepiece_on_fixed_cases(pair, text):
    original, ours = pair
    assert ours.processor.encode(text) == original.encode(text)


@settings(max_examples=120)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
       | st.text(st.sampled_from(list("ab 一猫。 \t\n🦊éＦ<>_0")), max_size=120))
def test_gguf_tokenizer_matches_sentencepiece_on_generated_text(pair, text):
    original, ours = pair
    assert ours.processor.encode(text) == original.encode(text)


def test_gguf_tokenizer_keeps_vocabulary_and_special_ids(pair):
    original, ours = pair
    assert ours.vocab_size == original.get_piece_size() + EXTRA_ROWS
    assert (ours.pad_id, ours.eos_id, ours.processor.unk_id()) == (0, 1, 2)
    assert ours.processor.bos_id() == original.bos_id() == -1
    for i in range(original.get_piece_size()):
        assert ours.processor.id_to_piece(i) == original.id_to_piece(i)
        assert ours.processor.get_score(i) == original.get_score(i)
    assert all(ours.processor.is_unused(i) for i in range(original.get_piece_size(), ours.vocab_size))


def test_encode_cleans_appends_eos_and_truncates_keeping_it(pair):
    original, ours = pair
    text = "river &amp;amp; mountain   lantern " * 200
    full = original.encode(clean_prompt(text)) + [original.eos_id()]
    assert len(full) > 512
    ids = ours.encode(text)
    assert len(ids) == 512 and ids[-1] == ours.eos_id and ids[:511] == full[:511]
    assert ours.encode("") == [ours.eos_id]
    assert ours.encode("  a  lantern ") == original.encode("a lantern") + [1]
    assert ours.encode(text, max_length=4) == full[:3] + [1]


def test_digest_is_sha256_of_the_rebuilt_model_and_stable(tmp_path):
    proto = train_tiny_tokenizer()
    digests = []
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, "t5encoder", {}, gguf_tokenizer_metadata(proto))
        tok = Tokenizer.from_gguf(GGUFFile(tmp_path / name))
        assert tok.digest == hashlib.sha256(tok.model_proto).hexdigest()
        digests.append(tok.digest)
    assert digests[0] == digests[1]


def test_from_file_reads_a_sentencepiece_model(tmp_path):
    proto = _train(**T5_LIKE)
    (tmp_path / "spiece.model").write_bytes(proto)
    tok = Tokenizer.from_file(tmp_path / "spiece.model")
    assert tok.digest == hashlib.sha256(proto).hexdigest()
    assert tok.encode("a lantern") == SentencePieceProcessor(model_proto=proto).encode("a lantern") + [1]
    (tmp_path / "junk.model").write_bytes(b"\xff\x00 not a model")
    with pytest.raises(TokenizerError, match="junk.model"):
        Tokenizer.from_file(tmp_path / "junk.model")


def test_gguf_without_t5_tokenizer_is_refused(tmp_path):
    write_gguf(tmp_path / "none.gguf", "t5encoder", {}, {"general.name": "no tokenizer"})
    with pytest.raises(TokenizerError, match=r"none\.gguf.*tokenizer\.ggml\.model"):
        Tokenizer.from_gguf(GGUFFile(tmp_path / "none.gguf"))
    meta = gguf_tokenizer_metadata(train_tiny_tokenizer()) | {"tokenizer.ggml.model": "llama"}
    write_gguf(tmp_path / "llama.gguf", "t5encoder", {}, meta)
    with pytest.raises(TokenizerError, match="'llama'"):
        Tokenizer.from_gguf(GGUFFile(tmp_path / "llama.gguf"))
    meta = gguf_tokenizer_metadata(train_tiny_tokenizer())
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:-1]
    write_gguf(tmp_path / "short.gguf", "t5encoder", {}, meta)
    with pytest.raises(TokenizerError, match="scores"):
        Tokenizer.from_gguf(GGUFFile(tmp_path / "short.gguf"))


@pytest.mark.parametrize("raw, clean", [
    ("A &amp; B", "A & B"),
    ("double &amp;amp; escaped &amp;lt;3", "double & escaped <3"),
    ("&quot;quoted&quot; &#39;single&#39; &eacute;t&eacute;", "\"quoted\" 'single' été"),
    ("  spaces \t\t tabs \n\n newlines \r\n  ", "spaces tabs newlines"),
    ("mojibake: cafÃ© â€œquotesâ€\x9d", "mojibake: café \"quotes\""),
    ("full\u3000width\u00a0nbsp", "full width nbsp"),
    ("", ""),
    ("一只猫  在草地上", "一只猫 在草地上"),
])
def test_clean_prompt_is_wans_whitespace_cleaning(raw, clean):
    assert clean_prompt(raw) == clean


def test_tiny_tokenizer_is_byte_identical_and_t5_shaped():
    a, b = train_tiny_tokenizer(), train_tiny_tokenizer()
    assert a == b
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(a)
    assert [p.piece for p in proto.pieces[:3]] == ["<pad>", "</s>", "<unk>"]
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.UNIGRAM
    assert proto.normalizer_spec.precompiled_charsmap  # NFKC, like umT5
    assert len(proto.pieces) == 600
    assert len(tiny_corpus()) >= 200
    tok = Tokenizer(a)
    # every corpus character is a piece or bytes: nothing becomes <unk>
    assert 2 not in tok.processor.encode(" ".join(tiny_corpus()))
