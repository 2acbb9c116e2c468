"""The toy world's DiT trainer: flow-matching training lowers the loss, is seeded, and writes a
Wan2.1 T2V model set that ModelSet recognises and Engine renders."""
import numpy as np
import pytest
import torch

from engine.toy import train_dit as toy
from engine.toy.world import Scene, phrasings, training_scenes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    from engine.wan.convert.vae import tiny_vae_state_dict, write_vae_safetensors

    path = tmp_path_factory.mktemp("vae") / "wan_2.1_vae_tiny.safetensors"
    write_vae_safetensors(tiny_vae_state_dict(0), path)
    return path


@pytest.fixture(scope="module")
def small_pool(monkeypatch_module):
    """Train on 12 scenes so a run takes seconds (the pool of 268 scenes takes about a minute)."""
    scenes = training_scenes()[::23]
    monkeypatch_module.setattr(toy, "training_scenes", lambda: scenes)
    return scenes


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def run(vae_path, steps, seed=0, log=None, precision="float32", shape_weight=1.0):
    losses = []

    def record(line):
        if line.startswith("step"):
            losses.append(float(line.split()[3]))
        if log is not None:
            log.append(line)

    out = toy.train_dit(vae_path, steps, seed=seed, dim=32, layers=1, heads=2, batch=4, lr=3e-3,
                        clips_per_scene=1, log=record, log_every=10, precision=precision, shape_weight=shape_weight)
    return out, losses


@pytest.fixture(scope="module")
def trained(vae_path, small_pool):
    return run(vae_path, 60)


def test_training_lowers_the_loss(trained):
    _, losses = trained
    assert len(losses) == 6
    # Predicting v = 0 scores E|noise - x0|^2 ~ 1 + var(x0); learning the mean flow must beat the start clearly.
    assert losses[-1] < 0.85 * losses[0], losses


def test_seeded_run_is_deterministic(vae_path, small_pool, trained):
    (dit, t5, proto), losses = trained
    (dit2, t52, proto2), losses2 = run(vae_path, 60)
    assert proto == proto2 and losses == losses2
    assert all(torch.equal(dit[n], dit2[n]) for n in dit) and all(torch.equal(t5[n], t52[n]) for n in t5)
    (dit3, _, _), _ = run(vae_path, 10, seed=1)
    assert not torch.equal(dit["blocks.0.ffn.0.weight"], dit3["blocks.0.ffn.0.weight"])


def test_bfloat16_autocast_trains_is_seeded_and_really_runs_in_bfloat16(vae_path, small_pool, trained):
    """The recipe's `--precision bfloat16`: the loss falls as in float32, the same seed gives the same
    weights, and the weights differ from the float32 run's (the autocast is not silently off)."""
    (dit, _, _), _ = trained
    (first, _, _), losses = run(vae_path, 60, precision="bfloat16")
    (again, _, _), losses_again = run(vae_path, 60, precision="bfloat16")
    assert losses[-1] < 0.85 * losses[0], losses
    assert losses == losses_again and all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["blocks.0.ffn.0.weight"], dit["blocks.0.ffn.0.weight"])
    with pytest.raises(ValueError, match="precision"):
        run(vae_path, 1, precision="float16")


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit-attention"])
def test_trainable_forward_matches_the_inference_forward(explicit):
    from engine.wan.dit import WanConfig, WanModel

    torch.manual_seed(0)
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=8)
    model = WanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # modulation and head start at zero: make every term count
    x, t, ctx = torch.randn(2, 16, 2, 4, 4), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 8)
    with torch.no_grad():
        want = model(x, t, ctx)
        got = toy.trainable(model, explicit=explicit)(x, t, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.abs().mean() > 0.1
    model(x, t, ctx).square().mean().backward()  # the in-place inference forward could not do this
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit-attention"])
def test_compact_text_attention_equals_attending_to_the_full_padding(explicit):
    """CompactText: a prompt's 512 - L zero rows attended as the few rows of a compact context with a
    log-count bias give the model's own forward over the full zero-padded context."""
    from engine.wan.dit import WanConfig, WanModel

    torch.manual_seed(1)
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=8)
    model = WanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a text embedding whose padding rows matter
    lengths = torch.tensor([3, 7, 2])
    width = 9
    ctx = torch.zeros(3, width, 8)
    for i, n in enumerate(lengths):
        ctx[i, :n] = torch.randn(int(n), 8)
    x, t = torch.randn(3, 16, 2, 4, 4), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        # The engine's forward: each prompt alone, zero-padded to text_len inside the model.
        want = torch.cat([model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1, :n]) for i, n in enumerate(lengths)])
        compact = toy.CompactText(toy.trainable(model, explicit=explicit), explicit=explicit)
        compact.set_lengths(lengths, width)
        got = model(x, t, ctx)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # Without the log-count bias the 500-odd padding keys weigh as a handful: rejected.
        compact.bias = torch.zeros_like(compact.bias)
        assert (model(x, t, ctx) - want).abs().max() > 1e-2
    with pytest.raises(ValueError, match="shorter"):
        compact.set_lengths(torch.tensor([9]), width)


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit-attention"])
def test_a_shared_tail_context_equals_a_separate_forward_for_those_samples(explicit):
    """CompactText.share_tail, the bfloat16 loop's one forward: samples that all read one long context
    (the caption-dropped ones and the negative prompt) give, with the rest of the batch, the outputs
    and gradients of a forward of their own on that context, as the float32 loop runs them."""
    from engine.wan.dit import WanConfig, WanModel

    torch.manual_seed(2)
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=8)
    model = WanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    compact = toy.CompactText(toy.trainable(model, explicit=explicit), explicit=explicit)
    lengths, width = torch.tensor([3, 5]), 6
    own = torch.zeros(2, width, 8)
    for i, n in enumerate(lengths):
        own[i, :n] = torch.randn(int(n), 8)
    shared_length = 30
    shared = torch.zeros(1, shared_length + 1, 8)
    shared[0, :shared_length] = torch.randn(shared_length, 8)
    x, t = torch.randn(5, 16, 2, 4, 4), torch.tensor([100.0, 300.0, 500.0, 700.0, 900.0])

    def separate():
        compact.set_lengths(lengths, width)
        head = model(x[:2], t[:2], own)
        compact.set_lengths(torch.full((3,), shared_length), shared_length + 1)
        return torch.cat([head, model(x[2:], t[2:], shared.expand(3, -1, -1))])

    def together(share=True):
        if share:
            compact.set_lengths(lengths, width)
            compact.share_tail(shared, shared_length, 3)
        else:
            compact.set_lengths(torch.cat([lengths, torch.full((3,), width - 1)]), width)
        # the tail's own context rows are ignored once share_tail is set: here they are noise
        return model(x, t, torch.cat([own, torch.randn(3, width, 8)]))

    want = separate()
    want.square().mean().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = together()
    got.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.text_embedding[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert (together(share=False) - want)[2:].abs().max() > 1e-2  # the tail reading its own rows: rejected
        compact.set_lengths(torch.tensor([], dtype=torch.long), 1)  # every sample shares: no own rows at all
        compact.share_tail(shared, shared_length, 5)
        all_shared = model(x, t, torch.zeros(5, 1, 8))
        compact.set_lengths(torch.full((5,), shared_length), shared_length + 1)
        torch.testing.assert_close(all_shared, model(x, t, shared.expand(5, -1, -1)), rtol=1e-4, atol=1e-5)


def test_latent_coverage_is_the_shapes_share_of_each_latent_cell():
    """latent_coverage on a ground-truth clip: the cells of the causal VAE's grid (the first frame, then
    4 frames a latent frame; 8x8 pixels), each the share of its pixels that show the shape."""
    from engine.toy.train_vae import clip_tensor, shape_mask
    from engine.toy.world import render_clip

    scene = Scene("red", "square", "right", "black")
    video = clip_tensor([render_clip(scene, 3)])
    coverage = toy.latent_coverage(video)
    assert coverage.shape == (1, 1, 5, 8, 8)
    assert coverage.min() >= 0 and coverage.max() == 1  # a square covers whole cells
    mask = shape_mask(video)[0, 0].float()
    assert coverage[0, 0, 0].sum() * 64 == mask[0].sum()  # the first frame alone
    torch.testing.assert_close(coverage[0, 0, 1].sum() * 64 * 4, mask[1:5].sum())  # frames 1-4
    assert (coverage[0, 0, 0] > 0).sum() < 64 / 2  # the background's cells stay at 0
    # the shape moves right: its cells' centre of mass moves to higher columns
    columns = torch.arange(8.0)
    centre = [(coverage[0, 0, f].sum(0) * columns).sum() / coverage[0, 0, f].sum() for f in (0, 4)]
    assert centre[1] > centre[0] + 1


def test_shape_weight_changes_the_training_and_a_weight_below_1_is_refused(vae_path, small_pool, trained):
    (dit, _, _), _ = trained
    (weighted, _, _), losses = run(vae_path, 20, shape_weight=5.0)
    assert all(np.isfinite(losses))
    (plain, _, _), _ = run(vae_path, 20)
    assert not torch.equal(weighted["blocks.0.ffn.0.weight"], plain["blocks.0.ffn.0.weight"])
    with pytest.raises(ValueError, match="shape_weight"):
        run(vae_path, 1, shape_weight=0.5)


def test_tokenizer_keeps_every_world_word_whole():
    from engine.wan.tokenizer import Tokenizer

    tokenizer = Tokenizer(toy.train_world_tokenizer())
    prompt = Scene("purple", "triangle", "up", "teal").prompt
    assert len(tokenizer.encode(prompt)) == len(prompt.split()) + 1  # one piece a word, and EOS
    assert len(tokenizer.encode(toy.negative_prompt())) > 10  # byte fallback: the negative prompt still encodes


def test_text_mixing_scales_the_umt5_attention_outputs_and_keeps_each_word_its_own():
    """`text_mixing` changes only the frozen umT5's self-attention output projections, by exactly that
    factor, and measurably: with the plain random draw the rest of the prompt moves the direction
    word's hidden state more than the word does (word_spread > 1); at 0.1 every attribute's word
    varies less across prompts than between words."""
    from engine.toy.world import all_scenes

    proto = toy.train_world_tokenizer()
    plain, local = toy.random_t5_state(proto, 0), toy.random_t5_state(proto, 0, text_mixing=0.1)
    scaled = [name for name in plain if not torch.equal(plain[name], local[name])]
    assert scaled and all(name.endswith("SelfAttention.o.weight") for name in scaled)
    assert len(scaled) == toy.TOY_T5["num_layers"]
    for name in scaled:
        torch.testing.assert_close(local[name], plain[name] * 0.1, rtol=0, atol=0)

    scenes = all_scenes()[::3]  # 96 prompts: every word in several contexts
    spread_plain, spread_local = toy.word_spread(proto, plain, scenes), toy.word_spread(proto, local, scenes)
    # measured over all 288 prompts (seed 0): plain colour 1.32, shape 1.18, direction 3.12, background 1.95;
    # at 0.1: 0.31, 0.24, 0.62, 0.46
    assert spread_plain["direction"] > 1.5, spread_plain
    assert all(value < 0.8 for value in spread_local.values()), spread_local
    assert all(spread_local[a] < 0.5 * spread_plain[a] for a in spread_plain), (spread_plain, spread_local)


def test_written_model_set_renders(tmp_path, vae_path, trained):
    from engine.model_set import ModelSet
    from engine.render import Engine

    (dit, t5, proto), _ = trained
    from engine.toy.embedded import write_toy_model

    paths = toy.write_checkpoint(tmp_path / "trained", dit, 2, t5, proto, vae_path)
    from safetensors.torch import load_file

    saved = load_file(str(paths["dit"]))  # float16, as shipped: the trained weights rounded once
    assert saved.keys() == dit.keys() and all(torch.equal(saved[k], dit[k].half()) for k in dit)
    write_toy_model(tmp_path / "set", quant="F32", source=tmp_path / "trained")
    models = ModelSet.from_dir(tmp_path / "set")
    assert models.family == "wan2.1-t2v"
    engine = Engine(models, cpu_threads=1)
    params = engine.spec.defaults()
    assert (params["frames"], params["width"], params["height"], params["fps"]) == (17, 64, 64, 16)
    params = engine.spec.params(params, steps=2)
    frames = engine.render(Scene("red", "circle", "left", "black").prompt, 0, params).frames
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    # The engine's text path gives the embeddings the DiT was trained on.
    prompt = phrasings(training_scenes()[0])[1]
    want = toy.text_embeddings(proto, t5, [prompt])[0]
    got = engine.embed(prompt)
    torch.testing.assert_close(got[: len(want)], want, rtol=1e-5, atol=1e-5)  # F32 files: the same weights
    assert got[len(want):].abs().max() == 0


def test_the_pool_cache_is_reused_only_for_the_same_vae_clips_and_seed(tmp_path, vae_path, monkeypatch):
    calls = []

    def encode(vae, clips_per_scene, seed):
        calls.append((clips_per_scene, seed))
        scenes = toy.training_scenes()[:3] * clips_per_scene
        return torch.full((len(scenes), 16, 5, 8, 8), float(seed)), scenes, torch.rand(len(scenes), 1, 5, 8, 8)

    monkeypatch.setattr(toy, "_encode_pool", encode)
    cache = tmp_path / "pool.pt"
    latents, scenes, coverage = toy.latent_pool(vae_path, 2, 7, cache=cache)
    again, scenes_again, coverage_again = toy.latent_pool(vae_path, 2, 7, cache=cache)
    assert calls == [(2, 7)] and torch.equal(again, latents) and scenes_again == scenes
    assert torch.equal(coverage_again, coverage)
    toy.latent_pool(vae_path, 1, 7, cache=cache)  # other clips per scene: encoded again, cache rewritten
    toy.latent_pool(vae_path, 1, 8, cache=cache)  # other seed
    other_vae = tmp_path / "other.safetensors"
    other_vae.write_bytes(vae_path.read_bytes() + b" ")
    toy.latent_pool(other_vae, 1, 8, cache=cache)  # other VAE bytes
    assert calls == [(2, 7), (1, 7), (1, 8), (1, 8)]


def test_text_probe_reads_the_trained_models_attributes_and_zero_for_a_model_deaf_to_text(monkeypatch):
    """TextProbe on the committed toy DiT: swapping a prompt's colour or direction raises its loss. A copy
    whose cross-attention outputs are zeroed ignores the text, and the probe gives it exactly 0."""
    from safetensors.torch import load_file

    from engine.toy.embedded import CHECKPOINT, MODEL_DIR, VAE
    from engine.toy.world import all_scenes
    from engine.wan.dit import WanConfig, WanModel

    scenes = training_scenes()[::23]
    monkeypatch.setattr(toy, "training_scenes", lambda: scenes)
    latents, pool_scenes, _ = toy._encode_pool(MODEL_DIR / VAE, 2, 0)
    proto = toy.train_world_tokenizer()
    t5 = toy.random_t5_state(proto, 0, text_mixing=0.1)  # the shipped umT5: the recipe's seed 0, --text-mixing 0.1
    prompts = [scene.prompt for scene in all_scenes()]
    embedded = dict(zip(prompts, toy.text_embeddings(proto, t5, prompts)))
    probe = toy.TextProbe(latents, pool_scenes, lambda scene: embedded[scene.prompt])

    model = WanModel(WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, in_dim=16, out_dim=16, text_dim=64))
    model.load_state_dict(load_file(str(MODEL_DIR / CHECKPOINT)))
    compact = toy.CompactText(model)
    gaps = probe.gaps(model, compact)
    # measured on these 24 clips: colour +1.80, shape +0.29, direction +0.94
    assert gaps["colour"] > 0.4 and gaps["direction"] > 0.4 and gaps["shape"] > 0.1, gaps
    with torch.no_grad():
        for block in model.blocks:
            block.cross_attn.o.weight.zero_()
            block.cross_attn.o.bias.zero_()
    assert all(abs(gap) < 1e-6 for gap in probe.gaps(model, compact).values())
    assert toy.swapped(Scene("purple", "triangle", "down", "teal"), "direction") == Scene("purple", "triangle", "left", "teal")
