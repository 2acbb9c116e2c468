"""Train a tiny Wan2.1 T2V DiT on the toy world, and write it with its text encoder as a model set.

The DiT is `engine.wan.dit.WanModel` with the original tensor names, small
(dim 256, 2 heads of 128, 4 blocks by default), trained with Wan's flow-matching
objective on the VAE latents of the world's clips:

    x_t = (1 - σ) x0 + σ ε,   t = 1000 σ,   target v = ε - x0,

which is what the samplers integrate (Euler: x + (σ_next - σ) v). σ is drawn
as Wan's training schedule draws it, a uniform timestep through the shift map
σ = shift·u / (1 + (shift - 1)·u), with the shift the model set renders with.

Text: a SentencePiece tokenizer trained on the world's phrasings (umT5's
special ids, byte fallback so any prompt encodes) and a tiny umT5 encoder
left frozen at seeded random weights. Frozen because the DiT's text
embedding and cross-attention learn to read any fixed, injective map from
prompts to hidden states, and a frozen encoder lets every phrasing's
embedding be computed once: a training step then costs the DiT alone.

Caption dropout (10%) replaces the prompt by the family's default negative
prompt, the text `Engine.render` uses as the unconditional branch when a job
names no negative prompt (an empty negative prompt falls back to it too), so
classifier-free guidance at render time extrapolates away from exactly the
embedding the model learnt as "no caption".

The recipe (`make toy-model`, after the VAE) is one run of ~43 minutes on 2 cores (docs/quality.md,
session 13): the latents of 8 clips per training scene, then 2800 steps at batch 64 on the canonical
phrasing alone, seed 0, with
- `--precision bfloat16`: the forward and backward under bfloat16 autocast with `explicit_attention`
  and the caption-dropped samples in the same forward (`CompactText.share_tail`); weights, AdamW and
  the loss stay float32. ~1.5x faster a step than float32 on a CPU with bfloat16 matrix units
  (bench/toy_training.py).
- `--text-mixing 0.1`: the frozen umT5's attention outputs drawn at a tenth of the scale, so each
  word's hidden state stays mostly its own (`word_spread`) and held-out combinations read like
  trained ones.
- `--shape-weight 4`: each latent cell's loss counted up to 4x by the share of it the shape covers
  (`latent_coverage`); the shape is what held-out prompts missed most.
Measured with TextProbe and by rendering (docs/quality.md, sessions 6-13): batch 64 is what teaches
the direction (at batch 16 the model reads colour and background long before the direction word),
and the canonical phrasing alone (the one rendered) learns about twice as fast as all five.

    python -m engine.toy.train_dit --vae /tmp/toy/wan_2.1_vae_toy.safetensors --steps 2800 --batch 64
        --canonical-only --precision bfloat16 --text-mixing 0.1 --shape-weight 4 --clips-per-scene 8

The flags' defaults (float32 with the fused attention kernel, text mixing 1, shape weight 1) are the
earlier four-stage recipe's (~4.8 h, in the git history of the Makefile), which they still reproduce.

The tokenizer SentencePiece trains here differs between sentencepiece versions (0.2.2 and 0.2.3
give different pieces, hence a different random umT5 and different text embeddings): the recipe
reproduces the committed files only with constraints.txt's pin.

writes the trained files into engine/toy/model (see engine/toy/embedded.py:
the DiT checkpoint, the umT5 GGUF with the tokenizer, the VAE copied), then
writes them as a model set and renders a few seen and held-out canonical
prompts through `Engine` and prints their adherence.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.toy.embedded import MODEL_DIR, write_toy_model
from engine.toy.train_vae import clip_tensor, shape_mask, weighted_mean_square
from engine.toy.world import (COLOURS, DIRECTIONS, SHAPES, Scene, all_scenes, held_out_scenes, phrasings, render_clip,
                              training_scenes)

TOY_DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=4)  # heads 128 wide, as published; K-quant rows (256) fit
TOY_T5 = dict(dim=64, heads=4, head_dim=16, ffn_dim=128, num_layers=2)
# Defaults the written DiT carries: a full toy clip (17 frames, 64x64, 16 fps).
TOY_DEFAULTS = dict(width=64, height=64, frames=17, steps=20, guidance=5.0, shift=3.0, fps=16, sampler="unipc")
CAPTION_DROPOUT = 0.1
TOKENIZER_VOCAB = 320  # asked; sentencepiece keeps ~309: 256 byte pieces, 3 special ids, the world's words


def negative_prompt() -> str:
    """The unconditional text Engine uses for Wan2.1 T2V (the family's default negative prompt)."""
    from engine.families import get_family

    return get_family("wan2.1-t2v").spec.negative_prompt


def train_world_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """A unigram SentencePiece model (umT5's kind and ids: pad 0, eos 1, unk 2, no BOS) of the world's
    phrasings in which every word of the world is one piece; byte fallback for any other text.
    Byte-identical on every run (one thread, no sampling)."""
    from sentencepiece import SentencePieceTrainer

    sentences = [text for scene in all_scenes() for text in phrasings(scene)]
    # The phrasings alone leave "red", "moving", ... split in two (the 256 byte pieces take most of
    # a small vocabulary); the words also given alone, often enough, make each one a piece.
    sentences += sorted({word for text in sentences for word in text.replace(",", " ").split()}) * 20
    out = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, model_type="unigram", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


def random_t5_state(proto: bytes, seed: int, text_mixing: float = 1.0) -> dict[str, torch.Tensor]:
    """Seeded random weights of the tiny umT5 encoder for this tokenizer (original HF names).

    `text_mixing` scales every self-attention's output projection (`SelfAttention.o`), the only
    path by which one token's hidden state takes in the others': 1 is the plain random draw,
    smaller leaves each word's state more its own (`word_spread` measures it).
    """
    from sentencepiece import SentencePieceProcessor

    from engine.tiny import random_state_dict
    from engine.wan.t5 import UMT5Config, UMT5Encoder

    vocab = SentencePieceProcessor(model_proto=proto).get_piece_size()
    with torch.device("meta"):
        t5 = UMT5Encoder(UMT5Config(vocab=vocab, **TOY_T5))
    state = random_state_dict(t5, torch.Generator().manual_seed(seed))
    if text_mixing != 1.0:
        for name in state:
            if name.endswith("SelfAttention.o.weight"):
                state[name] = state[name] * text_mixing
    return state


def word_spread(proto: bytes, t5_state: dict[str, torch.Tensor],
                scenes: Sequence[Scene] | None = None) -> dict[str, float]:
    """How much the frozen umT5 blends each attribute's word with its prompt, per attribute.

    Over the canonical prompts of `scenes` (default: all 288): the hidden state of the colour,
    shape, direction and background word, its variance across the prompts that share the word
    (what the rest of the prompt does to it) over the variance between the words' means (what
    tells the words apart). Near 0: each word is read the same in every prompt, so a held-out
    combination's words look as they did in training; above 1: context moves a word's state
    more than the word does.
    """
    from engine.wan.tokenizer import Tokenizer

    scenes = list(scenes or all_scenes())
    prompts = [scene.prompt for scene in scenes]
    tokenizer = Tokenizer(proto)
    states = text_embeddings(proto, t5_state, prompts)
    pieces = [tokenizer.encode(prompt) for prompt in prompts]
    spread = {}
    for attribute in ("colour", "shape", "direction", "background"):
        rows, words = [], []
        for scene, ids, state in zip(scenes, pieces, states):
            word = getattr(scene, attribute)
            # the world's tokenizer keeps each of its words one piece
            rows.append(state[ids.index(tokenizer.encode(word)[0])])
            words.append(word)
        rows = torch.stack(rows).double()
        means = {word: rows[[i for i, w in enumerate(words) if w == word]].mean(0) for word in set(words)}
        within = torch.stack([row - means[word] for row, word in zip(rows, words)]).square().sum(1).mean()
        centred = torch.stack(list(means.values()))
        between = (centred - centred.mean(0)).square().sum(1).mean()
        spread[attribute] = float(within / between)
    return spread


def text_embeddings(proto: bytes, t5_state: dict[str, torch.Tensor], prompts: Sequence[str]) -> list[torch.Tensor]:
    """Each prompt's hidden states [tokens, dim] as Engine.embed computes them (before zero padding)."""
    from engine.wan.t5 import UMT5Encoder, encode_text, infer_config
    from engine.wan.tokenizer import Tokenizer

    tokenizer = Tokenizer(proto)
    encoder = UMT5Encoder(infer_config({n: t.shape for n, t in t5_state.items()}))
    encoder.load_state_dict(t5_state, strict=False)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            full = encode_text(tokenizer, encoder, prompt)
            out.append(full[: len(tokenizer.encode(prompt))].clone())
    return out


def padded_context(embeddings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings stacked as [N, longest + 1, dim], zero rows after each (CompactText's layout:
    at least one zero row stands for the padding), and their lengths."""
    lengths = torch.tensor([len(e) for e in embeddings])
    context = torch.zeros(len(embeddings), int(lengths.max()) + 1, embeddings[0].shape[1])
    for i, e in enumerate(embeddings):
        context[i, : len(e)] = e
    return context, lengths


def latent_pool(vae_path: str | Path, clips_per_scene: int, seed: int,
                cache: str | Path | None = None) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Normalised VAE latents [N, 16, 5, 8, 8] of `clips_per_scene` random clips of every training
    scene, their scenes, and each latent cell's shape coverage [N, 1, 5, 8, 8] (`latent_coverage`).

    `cache`: a file that keeps the pool between runs (~6 minutes on 2 cores at 8 clips per scene),
    reused only when it was made from the same VAE bytes, clips per scene and seed, rewritten otherwise.
    """
    import hashlib

    key = dict(vae=hashlib.sha256(Path(vae_path).read_bytes()).hexdigest(), clips_per_scene=clips_per_scene,
               seed=seed, coverage=True)
    if cache is not None and Path(cache).exists():
        saved = torch.load(str(cache), weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            scenes = training_scenes()
            return saved["latents"], [scenes[i] for i in saved["scenes"].tolist()], saved["coverage"]
    latents, scenes, coverage = _encode_pool(vae_path, clips_per_scene, seed)
    if cache is not None:
        index = {scene: i for i, scene in enumerate(training_scenes())}
        torch.save({"key": json.dumps(key, sort_keys=True), "latents": latents, "coverage": coverage,
                    "scenes": torch.tensor([index[scene] for scene in scenes])}, str(cache))
    return latents, scenes, coverage


def latent_coverage(video: torch.Tensor, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """[B, 1, 1 + (F - 1) / temporal, H / spatial, W / spatial]: the share of each latent cell's
    pixels that show the shape (`train_vae.shape_mask`) in a ground-truth video batch [B, 3, F, H, W].

    A latent cell codes a spatial x spatial patch of the first frame alone, or of `temporal`
    frames after it (Wan's causal VAE). `train_dit --shape-weight` weighs the loss by it."""
    mask = shape_mask(video).float()
    first = F.avg_pool3d(mask[:, :, :1], (1, spatial, spatial))
    rest = F.avg_pool3d(mask[:, :, 1:], (temporal, spatial, spatial))
    return torch.cat([first, rest], dim=2)


def _encode_pool(vae_path: str | Path, clips_per_scene: int, seed: int) -> tuple[torch.Tensor, list, torch.Tensor]:
    from engine.wan.vae import load_vae

    vae = load_vae(vae_path, encoder=True)
    scenes, clips = [], []
    rng = np.random.default_rng(seed)
    for k in range(clips_per_scene):
        for scene in training_scenes():
            clips.append(render_clip(scene, rng))
            scenes.append(scene)
    latents, coverage = [], []
    with torch.no_grad():
        for i in range(0, len(clips), 16):  # 16 clips a call: fewer, larger convolutions
            video = clip_tensor(clips[i:i + 16])
            latents.extend(vae.encode(video))
            coverage.append(latent_coverage(video, vae.config.temporal_factor, vae.config.spatial_factor))
    return torch.stack(latents), scenes, torch.cat(coverage)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v for [B, L, heads, d] q/k/v -> [B, Lq, heads * d], as plain matmuls.

    Training only. The same attention as `F.scaled_dot_product_attention`; on this CPU its fused
    kernel's backward was ~30% of a toy training step (80 video tokens, heads 128 wide), where the
    explicit product's is a few percent, and under bfloat16 autocast the matmuls run in bfloat16.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def trainable(model: torch.nn.Module, explicit: bool = False) -> torch.nn.Module:
    """Give each Wan block an out-of-place forward so autograd can run through it, and, with
    `explicit`, its self-attention `explicit_attention` (the bfloat16 recipe's; float32 keeps the
    fused kernel the earlier four-stage recipe trained with, so that recipe still reproduces).

    `WanAttentionBlock.forward` updates the residual stream in place (inference
    keeps one copy of it); training needs the values its norms saved. The
    replacement computes the same sums in the same order without in-place updates.
    """
    import types

    def attend(attn, q, k, v):
        return attn.o(explicit_attention(q, k, v))

    def forward(block, x, e0, index, freqs, context):
        dtype = context.dtype
        mod = block.modulation.float()[0] + e0

        def vector(k: int) -> torch.Tensor:
            return mod[:, k][index]

        y = block.self_attn(torch.addcmul(vector(0), block.norm1(x), 1 + vector(1)).to(dtype), freqs)
        x = torch.addcmul(x, y, vector(2))
        x = x + block.cross_attn(block.norm3(x).to(dtype), context)
        y = block.ffn(torch.addcmul(vector(3), block.norm2(x), 1 + vector(4)).to(dtype))
        return torch.addcmul(x, y, vector(5))

    for block in model.blocks:
        block.forward = types.MethodType(forward, block)
        if explicit:
            block.self_attn.attend = types.MethodType(attend, block.self_attn)
    return model


class CompactText:
    """Training only: the text padding attended as one weighted key per sample instead of
    `text_len - L` identical ones.

    The engine zero-pads every prompt to text_len (512) tokens and attends to all of them
    (official). The padding rows are all zero, so after the per-token text embedding and
    k/v projections they are identical keys and values: attending to n copies of a key is
    attending to one copy with log(n) added to its logit. Here a batch's context is cut to
    `width` rows (the longest prompt plus at least one zero row), and each sample's zero rows
    get log((text_len - L) / (width - L)) added, which is the same attention, ~8x cheaper for
    the toy's short prompts. tests/test_toy_dit.py checks it against the model's own forward.
    """

    def __init__(self, model: torch.nn.Module, explicit: bool = False):
        self.model = model
        self.explicit = explicit  # explicit_attention instead of the fused kernel (the bfloat16 recipe)
        self.bias: torch.Tensor | None = None
        # `share_tail`: the batch's last `shared_count` samples attend to `shared` instead of their own rows
        self.shared: torch.Tensor | None = None
        self.shared_bias: torch.Tensor | None = None
        self.shared_count = 0
        self.shared_embedded: torch.Tensor | None = None
        model.embed_context = self.embed_context
        for block in model.blocks:
            block.cross_attn.attend = types.MethodType(self.attend, block.cross_attn)

    def embed_context(self, context: torch.Tensor, clip_features, dtype: torch.dtype) -> torch.Tensor:
        if self.shared_count:
            self.shared_embedded = self.model.text_embedding(self.shared.to(dtype))
        return self.model.text_embedding(context.to(dtype))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.explicit:
            return explicit_attention(q, k, v, bias)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return y.transpose(1, 2).flatten(2)

    def attend(self, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.shared_count:
            return attn.o(self._attention(q, k, v, self.bias))
        own = len(q) - self.shared_count
        heads = (attn.num_heads, -1)
        # The shared context's keys and values once, broadcast over the samples that attend to it.
        k_shared = attn.norm_k(attn.k(self.shared_embedded)).unflatten(2, heads)
        v_shared = attn.v(self.shared_embedded).unflatten(2, heads)
        tail = q[own:]
        parts = [self._attention(tail, k_shared.expand(len(tail), -1, -1, -1),
                                 v_shared.expand(len(tail), -1, -1, -1), self.shared_bias)]
        if own:
            parts.insert(0, self._attention(q[:own], k[:own], v[:own], self.bias))
        return attn.o(torch.cat(parts))

    def _padding_bias(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        text_len = self.model.config.text_len
        if len(lengths) and int(lengths.max()) >= width:
            raise ValueError(f"a compact context of {width} rows needs prompts shorter than that")
        pad_rows = (width - lengths).to(torch.float64)
        weight = torch.log((text_len - lengths).to(torch.float64) / pad_rows).to(torch.float32)
        bias = torch.zeros(len(lengths), 1, 1, width)
        positions = torch.arange(width)
        bias[:, 0, 0] = torch.where(positions[None] >= lengths[:, None], weight[:, None], 0.0)
        return bias.to(self.model.patch_embedding.weight.device)

    def set_lengths(self, lengths: torch.Tensor, width: int) -> None:
        """Each sample's prompt length L (its first L context rows are the prompt, the rest zeros).
        Ends any `share_tail`: every sample attends to its own rows."""
        self.bias = self._padding_bias(lengths, width)
        self.shared, self.shared_bias, self.shared_count, self.shared_embedded = None, None, 0, None

    def share_tail(self, context: torch.Tensor, length: int, count: int) -> None:
        """The batch's last `count` samples attend to `context` [1, width, text_dim] (a prompt of
        `length` rows, zeros after) instead of their own context rows, which are then ignored; call
        after `set_lengths`, whose lengths are the other samples'. The training loop's caption-dropped
        samples all read the same negative prompt (~350 rows, where a world prompt has ~11): one forward
        for the whole batch, with that prompt embedded and projected once, instead of a second forward."""
        if not 0 < count:
            raise ValueError(f"share_tail needs at least one sample, got {count}")
        self.shared = context.to(self.model.patch_embedding.weight.device)
        self.shared_bias = self._padding_bias(torch.tensor([length]), context.shape[1])
        self.shared_count = count


def sample_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """σ of Wan's training: a uniform timestep through the shift map (more weight on high noise for shift > 1)."""
    u = torch.rand(batch, generator=generator)
    return shift * u / (1 + (shift - 1) * u)


SWAPS = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}


def swapped(scene: Scene, attribute: str) -> Scene:
    """The scene with one attribute changed to the next value of its list (a different, fixed choice)."""
    names = SWAPS[attribute]
    return dataclasses.replace(scene, **{attribute: names[(names.index(getattr(scene, attribute)) + 1) % len(names)]})


class TextProbe:
    """Does the DiT read each attribute from the prompt? A fixed batch of pool clips, noise and σ
    (spread over (0, 1)), and the loss with each clip's own canonical prompt against the loss with
    one attribute swapped: `gaps()` gives (swapped - own) / own per attribute. A model that ignores
    a word scores 0 for it (the diagnosis of a model that renders the colour but not the motion)."""

    def __init__(self, latents: torch.Tensor, scenes: Sequence[Scene], embed: Callable[[Scene], torch.Tensor],
                 count: int = 96, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(latents), generator=generator)[:count]
        self.x0 = latents[index]
        self.noise = torch.randn(self.x0.shape, generator=generator).to(latents.device)
        self.sigma = ((torch.arange(len(index)) + 0.5) / len(index)).to(latents.device)
        self.scenes = [scenes[i] for i in index.tolist()]
        self.embed = embed

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, compact: "CompactText", scenes: Sequence[Scene]) -> float:
        context, lengths = padded_context([self.embed(scene) for scene in scenes])
        compact.set_lengths(lengths, context.shape[1])
        s = self.sigma.view(-1, 1, 1, 1, 1)
        xt, target = (1 - s) * self.x0 + s * self.noise, self.noise - self.x0
        v = model(xt, 1000 * self.sigma, context.to(self.x0.device))
        return F.mse_loss(v, target).item()

    def gaps(self, model: torch.nn.Module, compact: "CompactText") -> dict[str, float]:
        was_training = model.training
        model.eval()
        own = self.loss(model, compact, self.scenes)
        result = {name: self.loss(model, compact, [swapped(scene, name) for scene in self.scenes]) / own - 1
                  for name in SWAPS}
        model.train(was_training)
        return result


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_dit(vae_path: str | Path, steps: int, seed: int = 0, dim: int = TOY_DIT["dim"],
              layers: int = TOY_DIT["num_layers"], heads: int = TOY_DIT["num_heads"], batch: int = 16,
              lr: float = 1e-3, clips_per_scene: int = 2, shift: float = TOY_DEFAULTS["shift"],
              log: Callable[[str], None] = print, log_every: int = 50, init: str | Path | None = None,
              device: str = "cpu", pool: str | Path | None = None, probe_every: int = 0,
              max_seconds: float | None = None, sigma_shift: float | None = None, canonical_only: bool = False,
              precision: str = "float32", text_mixing: float = 1.0,
              shape_weight: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bytes]:
    """Train the toy DiT for `steps` AdamW steps; (DiT state dict, umT5 state dict, tokenizer proto).

    Seeded throughout: the same arguments on the same torch build and thread count give the same weights
    (random numbers are drawn on the CPU whatever `device` trains). Logs the mean loss of every
    `log_every` steps, and every `probe_every` steps TextProbe's gaps (0: never). `init`: a DiT
    checkpoint (write_checkpoint's) to go on training from, instead of the official initialisation
    (a second run, with a fresh schedule). `pool`: latent_pool's cache file. `max_seconds`: fewer steps
    when the measured speed would not finish in time (decided at step 50, inside the warm-up, so the
    schedule is the one of the shorter run; the step count then depends on the machine).
    `sigma_shift`: the shift of the training σ draw (default: `shift`, the render shift).
    `canonical_only`: train on the canonical phrasing alone. `precision`: "bfloat16" runs the
    forward and backward under bfloat16 autocast with `explicit_attention` (weights, optimizer and
    loss stay float32; ~1.5x faster a step on this CPU, which has bfloat16 matrix units; the
    caption-dropped samples in the same forward, `CompactText.share_tail`), the committed model's;
    "float32" runs as the earlier four-stage recipe trained (fused attention kernel, two forwards).
    `text_mixing`: the frozen umT5's attention output scale (`random_t5_state`; 1 is the plain
    draw, 0.1 the committed model's). `shape_weight`: the loss counts each latent element
    1 + (shape_weight - 1) x its cell's shape coverage times (`latent_coverage`), as
    sum(w e^2) / sum(w); 1 is the plain MSE, 4 the committed model's.
    """
    from engine.wan.dit import WanConfig, WanModel

    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    if not shape_weight >= 1.0:
        raise ValueError(f"shape_weight must be >= 1, got {shape_weight}")
    start = time.perf_counter()
    proto = train_world_tokenizer()
    t5_state = random_t5_state(proto, seed, text_mixing)
    latents, scenes, coverage = latent_pool(vae_path, clips_per_scene, seed, cache=pool)
    width = 1 if canonical_only else len(phrasings(scenes[0]))
    texts = {scene: i * width for i, scene in enumerate(training_scenes())}
    prompts = [text for scene in training_scenes() for text in phrasings(scene)[:width]]
    canonical = {scene: i for i, scene in enumerate(all_scenes())}
    embeddings = text_embeddings(proto, t5_state, prompts + [negative_prompt()])
    probe = None
    if probe_every:
        canonical_embeddings = text_embeddings(proto, t5_state, [scene.prompt for scene in all_scenes()])
        probe = TextProbe(latents.to(device), scenes, lambda scene: canonical_embeddings[canonical[scene]])
    text_dim = embeddings[0].shape[1]
    context, lengths = padded_context(embeddings)
    uncond = len(embeddings) - 1
    context = context.to(device)
    first_text = torch.tensor([texts[scene] for scene in scenes])
    log(f"pool: {len(latents)} clips -> latents {list(latents.shape[1:])} (std {latents.std():.3f}), "
        f"{len(prompts)} phrasings, negative prompt {len(embeddings[-1])} tokens; "
        f"{time.perf_counter() - start:.0f} s")

    torch.manual_seed(seed)
    cfg = WanConfig(dim=dim, ffn_dim=2 * dim, num_heads=heads, num_layers=layers, in_dim=16, out_dim=16,
                    text_dim=text_dim)
    fast = precision == "bfloat16"
    model = trainable(WanModel(cfg), explicit=fast)
    with torch.no_grad():  # official init: modulation ~ N(0, 1/dim); a zero head starts at v = 0
        for block in model.blocks:
            block.modulation.normal_(0, dim ** -0.5)
        model.head.modulation.normal_(0, dim ** -0.5)
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(init)))
    model.to(device)
    compact = CompactText(model, explicit=fast)
    latents, coverage = latents.to(device), coverage.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)
    log(f"DiT: dim {dim}, {layers} blocks, {heads} heads, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; batch {batch}, lr {lr}, shift {sigma_shift or shift}, caption dropout {CAPTION_DROPOUT}, "
        f"{width} phrasing(s), device {device}, {precision}, text mixing {text_mixing}, shape weight {shape_weight}")

    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=fast)
    window, losses = [], []
    step, loop_start = 0, time.perf_counter()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        index = torch.randint(len(latents), (batch,), generator=generator)
        phrasing = torch.randint(width, (batch,), generator=generator)
        text = first_text[index] + phrasing
        drop = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        text = torch.where(drop, torch.full_like(text, uncond), text)
        x0 = latents[index.to(device)]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = sample_sigmas(batch, sigma_shift or shift, generator).to(device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt, target = (1 - s) * x0 + s * noise, noise - x0
        drop, text = drop.to(device), text.to(device)
        if fast:
            # One forward: the captioned samples first, each with its own compact text (~11 rows), then
            # the caption-dropped ones, which all attend to the negative prompt (~350 rows) embedded once.
            keep_rows, drop_rows = (~drop).nonzero().squeeze(1), drop.nonzero().squeeze(1)
            order = torch.cat([keep_rows, drop_rows])
            own_lengths = lengths[text[keep_rows].cpu()]
            own_width = int(own_lengths.max()) + 1 if len(keep_rows) else 1
            compact.set_lengths(own_lengths, own_width)
            if len(drop_rows):
                compact.share_tail(context[uncond:uncond + 1], int(lengths[uncond]), len(drop_rows))
            with autocast:
                velocity = model(xt[order], 1000 * sigma[order], context[text[order], :own_width]).float()
        else:
            # float32, as the earlier four-stage recipe trained: captioned and caption-dropped samples in two
            # forwards (the same sums: nothing mixes samples), each with its own compact text width.
            velocities, orders = [], []
            for part in (~drop, drop):
                rows = part.nonzero().squeeze(1)
                if len(rows):
                    rows_lengths = lengths[text[rows].cpu()]
                    rows_text = int(rows_lengths.max()) + 1
                    compact.set_lengths(rows_lengths, rows_text)
                    velocities.append(model(xt[rows], 1000 * sigma[rows], context[text[rows], :rows_text]).float())
                    orders.append(rows)
            velocity, order = torch.cat(velocities), torch.cat(orders)
        if shape_weight == 1.0:
            loss = F.mse_loss(velocity, target[order])
        else:
            loss = weighted_mean_square(velocity - target[order], 1.0 + (shape_weight - 1.0) * coverage[index.to(device)[order]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            log(f"step {step + 1:5d}  loss {losses[-1]:.4f}  lr {learning_rate(step, steps, lr):.2e}  "
                f"{time.perf_counter() - start:.0f} s")
            window = []
        if probe is not None and ((step + 1) % probe_every == 0 or step + 1 == steps):
            log(f"step {step + 1:5d}  text gaps: " + "  ".join(
                f"{name} {gap:+.3f}" for name, gap in probe.gaps(model, compact).items()))
        if max_seconds is not None and step + 1 == 50:
            rate = (time.perf_counter() - loop_start) / 50
            fits = 50 + int((max_seconds - (time.perf_counter() - start)) / rate)
            if fits < steps:
                log(f"{rate * 1000:.1f} ms/step: {fits} steps fit in {max_seconds:.0f} s (of {steps})")
                steps = max(fits, 51)
        step += 1
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    return state, t5_state, proto


def write_checkpoint(directory: str | Path, dit_state: dict[str, torch.Tensor], heads: int,
                     t5_state: dict[str, torch.Tensor], proto: bytes, vae_path: str | Path,
                     defaults: dict | None = None, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write the trained files as engine/toy/embedded.py ships them (paths by role).

    The DiT as a safetensors checkpoint in `dtype` (float16: half the package's bytes, renders
    ~70 dB from float32's, docs/quality.md), in original names, its head
    count (its heads need not be the published 128 wide) and render defaults
    in the safetensors metadata; the umT5 encoder with the tokenizer as an F32
    GGUF; the VAE copied. `embedded.write_toy_model(dir, quant, source=directory)`
    turns them into a model set.
    """
    from safetensors.torch import save_file

    from engine.model_set import DEFAULTS_KEY
    from engine.toy.embedded import CHECKPOINT, TEXT_ENCODER, VAE
    from engine.wan.convert.t5 import write_umt5_gguf
    from engine.wan.dit import HEAD_COUNT_KEY

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"dit": directory / CHECKPOINT, "text_encoder": directory / TEXT_ENCODER, "vae": directory / VAE}
    metadata = {HEAD_COUNT_KEY: str(int(heads)), DEFAULTS_KEY: json.dumps(defaults or TOY_DEFAULTS, sort_keys=True)}
    state = {name: t.detach().to(dtype).contiguous() for name, t in dit_state.items()}
    save_file(state, str(paths["dit"]), metadata=metadata)
    write_umt5_gguf(t5_state, proto, paths["text_encoder"], quant="F32")
    if Path(vae_path).resolve() != paths["vae"].resolve():
        shutil.copyfile(vae_path, paths["vae"])
    return paths


def evaluate(directory: str | Path, scenes: Sequence, seed: int = 0, log: Callable[[str], None] = print,
             threads: int | None = None) -> dict[str, float]:
    """Render each scene's canonical prompt with the model set's defaults and score it; accuracy per attribute."""
    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.toy.adherence import accuracy, score_clip

    engine = Engine(ModelSet.from_dir(directory), cpu_threads=threads or torch.get_num_threads())
    scores = []
    for i, scene in enumerate(scenes):
        frames = engine.render(scene.prompt, seed + i).frames
        scores.append(score_clip(frames, scene))
    result = accuracy(scores)
    log("  ".join(f"{name} {value:.2f}" for name, value in result.items()))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.toy.train_dit",
                                     description="Train the toy world's Wan2.1 T2V DiT and write a model set.")
    parser.add_argument("--vae", required=True, help="the toy Wan2.1 VAE (.safetensors, with its encoder)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=TOY_DIT["dim"])
    parser.add_argument("--layers", type=int, default=TOY_DIT["num_layers"])
    parser.add_argument("--heads", type=int, default=TOY_DIT["num_heads"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clips-per-scene", type=int, default=3)
    parser.add_argument("--init", help="go on training from this DiT checkpoint (a previous run's)")
    parser.add_argument("--eval-quant", default="Q8_0", help="DiT type of the model set the evaluation renders with")
    parser.add_argument("--eval", type=int, default=12, help="seen and held-out prompts rendered and scored, each")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device that trains (the recipe is CPU-only; cuda for experiments)")
    parser.add_argument("--pool", help="cache file for the latent pool (reused when made from the same VAE, clips and seed)")
    parser.add_argument("--probe-every", type=int, default=500,
                        help="print how much the loss rises when the prompt's colour, shape or direction is swapped, every N steps (0: never)")
    parser.add_argument("--max-seconds", type=float, help="train fewer steps if the measured speed would take longer")
    parser.add_argument("--sigma-shift", type=float, help="shift of the training σ draw (default: the render shift, 3)")
    parser.add_argument("--canonical-only", action="store_true", help="train on the canonical phrasing alone")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="training arithmetic: bfloat16 autocast (weights and optimizer float32) or float32")
    parser.add_argument("--text-mixing", type=float, default=1.0,
                        help="scale of the frozen umT5's attention outputs (1: the plain random draw; 0.1 keeps each word's state mostly its own)")
    parser.add_argument("--shape-weight", type=float, default=1.0,
                        help="weigh each latent cell's loss by 1 + (W - 1) x the share of it the shape covers (1: the plain MSE)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="precision of the written DiT checkpoint (default float16, as shipped)")
    parser.add_argument("--out", default=str(MODEL_DIR), help="folder for the trained files (default: the package's, engine/toy/model)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dit, t5, proto = train_dit(args.vae, args.steps, seed=args.seed, dim=args.dim, layers=args.layers,
                               heads=args.heads, batch=args.batch, lr=args.lr, clips_per_scene=args.clips_per_scene,
                               init=args.init, device=args.device, pool=args.pool, probe_every=args.probe_every,
                               max_seconds=args.max_seconds, sigma_shift=args.sigma_shift,
                               canonical_only=args.canonical_only, precision=args.precision,
                               text_mixing=args.text_mixing, shape_weight=args.shape_weight)
    for role, path in write_checkpoint(args.out, dit, args.heads, t5, proto, args.vae,
                                       dtype=getattr(torch, args.dtype)).items():
        print(f"wrote {role:13s} {path}")
    model_set = Path(tempfile.mkdtemp(prefix="toy-model-"))
    write_toy_model(model_set, quant=args.eval_quant, source=args.out)
    count = args.eval
    seen = training_scenes()[:: max(len(training_scenes()) // count, 1)][:count] if count else []
    held = held_out_scenes()[:: max(len(held_out_scenes()) // count, 1)][:count] if count else []
    if seen:
        print(f"adherence, {len(seen)} seen prompts:", end=" ")
        evaluate(model_set, seen)
        print(f"adherence, {len(held)} held-out prompts:", end=" ")
        evaluate(model_set, held, seed=1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
