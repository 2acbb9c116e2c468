"""Training the toy world's Wan2.1 VAE: it learns, it is seeded, and the engine reads what it writes.

The model trained here is far smaller than the shipped one (base width 4,
one clip a step, 30 steps) so the file runs in well under a minute; the
code path is the same.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.toy.train_vae import (
    clip_tensor, fold_latent_statistics, main, normalised_latents, train_vae, training_batch, training_loss,
)
from engine.toy.world import Scene, render_clip
from engine.wan.convert.vae import random_vae_state_dict, vae_file_shapes, write_vae_safetensors
from engine.wan.vae import WanVAE, WanVAEConfig, load_vae
from tests.run_helpers import one_torch_thread

SMALL = WanVAEConfig(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
STEPS = 30


@pytest.fixture(autouse=True)
def one_thread():
    # Bitwise determinism is per thread count; one thread also keeps the shared machine usable.
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    lines: list[str] = []
    state = train_vae(STEPS, seed=0, config=SMALL, batch=1, log=lines.append, log_every=10)
    return state, lines


def vae_from(state: dict[str, torch.Tensor], config: WanVAEConfig = SMALL) -> WanVAE:
    model = WanVAE(config, encoder=True)
    model.load_state_dict(state)
    return model.eval()


def test_training_lowers_the_reconstruction_loss(trained):
    state, lines = trained
    video = training_batch(np.random.default_rng(99), 2, 17)
    losses = []
    for weights in (random_vae_state_dict(vae_file_shapes(SMALL), 0), state):  # train_vae's start, its end
        with torch.no_grad():
            _, mse = training_loss(vae_from(weights), video, torch.Generator().manual_seed(0))
        losses.append(mse.item())
    assert losses[1] < 0.75 * losses[0], losses
    # The curve it printed: one line per 10 steps, then the statistics and the PSNR.
    assert [line.split()[2] for line in lines[:3]] == ["10/30", "20/30", "30/30"]
    assert "latent statistics" in lines[3] and lines[4].startswith("held-out reconstruction PSNR")


def test_same_seed_same_weights_bit_for_bit():
    runs = [train_vae(3, seed=5, config=SMALL, batch=1, log=lambda _: None) for _ in range(2)]
    other = train_vae(3, seed=6, config=SMALL, batch=1, log=lambda _: None)
    assert list(runs[0]) == list(runs[1]) == list(vae_file_shapes(SMALL))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert not all(torch.equal(runs[0][name], other[name]) for name in runs[0])


def test_written_file_loads_into_the_engine_and_beats_a_random_vae(trained, tmp_path):
    state, _ = trained
    write_vae_safetensors(state, tmp_path / "toy.safetensors")
    write_vae_safetensors(random_vae_state_dict(vae_file_shapes(SMALL), 0), tmp_path / "random.safetensors")
    clip = clip_tensor([render_clip(Scene("red", "square", "right", "gray"), 3)])  # a training scene, 17 frames

    errors = {}
    for name in ("toy", "random"):
        model = load_vae(tmp_path / f"{name}.safetensors", encoder=True)
        assert model.config == SMALL
        latents = model.encode(clip)
        assert latents.shape == (1, 16, 5, 8, 8)
        errors[name] = (model.decode(latents) - clip).square().mean().item()
    assert errors["toy"] < 0.7 * errors["random"], errors  # measured: 0.13 against 0.27
    # The loader hands back exactly the trained tensors.
    loaded = load_vae(tmp_path / "toy.safetensors", encoder=True).state_dict()
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_training_batches_are_windows_of_world_clips():
    full = training_batch(np.random.default_rng(4), 6, 17)
    assert full.shape == (6, 3, 17, 64, 64) and full.min() >= -1 and full.max() <= 1
    # Every frame shows a shape: pixels unlike the frame's corner (always background: the shape keeps
    # a margin). A side of 22-28 px: 240-790 pixels (a triangle is half its box), plus its antialiased rim.
    shape_pixels = ((full - full[..., :1, :1]).abs().amax(dim=1) > 0.02).sum(dim=(2, 3))
    assert shape_pixels.min() > 200 and shape_pixels.max() < 900
    images = training_batch(np.random.default_rng(4), 8, 1)
    assert images.shape == (8, 3, 1, 64, 64)
    assert not torch.equal(images[0], images[1])


def test_temporal_weights_start_by_coding_each_frame_on_its_own():
    from engine.toy.train_vae import posterior, start_frames_independent

    model = vae_from(random_vae_state_dict(vae_file_shapes(SMALL), 2))
    start_frames_independent(model)
    moving = training_batch(np.random.default_rng(3), 1, 9)
    still = moving[:, :, -1:].repeat(1, 1, 9, 1, 1)  # the last frame, held
    with torch.no_grad():
        mu_moving, _ = posterior(model, moving)
        mu_still, _ = posterior(model, still)
        decoded = model._decode_video(mu_moving)
    # Chunk 2 (frames 5-8) is coded as its last frame, frame 8: the same latent as the held clip's.
    torch.testing.assert_close(mu_moving[:, :, 2], mu_still[:, :, 2], rtol=1e-4, atol=1e-5)
    # ... and decoded as 4 copies of one frame; the first chunk (frame 0) stays its own frame.
    assert (decoded[:, :, 5:9] - decoded[:, :, 8:9]).abs().max() < 1e-4
    assert (decoded[:, :, 1:5] - decoded[:, :, 8:9]).abs().max() > 1e-3  # frame 4's chunk shows frame 4
    # A random start does neither.
    model = vae_from(random_vae_state_dict(vae_file_shapes(SMALL), 2))
    with torch.no_grad():
        assert (posterior(model, moving)[0][:, :, 2] - posterior(model, still)[0][:, :, 2]).abs().max() > 1e-3


def test_folded_statistics_give_unit_latents_and_leave_reconstruction_unchanged():
    model = vae_from(random_vae_state_dict(vae_file_shapes(SMALL), 1))
    video = training_batch(np.random.default_rng(0), 6, 9)
    before = model.decode(model.encode(video))
    z = normalised_latents(model, video)
    assert z.std(dim=(0, 2, 3, 4)).sub(1).abs().max() > 0.2  # a random VAE's latents are not unit-scaled

    m, s = fold_latent_statistics(model, video)
    assert torch.allclose(m, z.mean(dim=(0, 2, 3, 4))) and torch.allclose(s, z.std(dim=(0, 2, 3, 4)))
    z = normalised_latents(model, video)
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-4
    assert z.std(dim=(0, 2, 3, 4)).sub(1).abs().max() < 1e-4
    # Through the float32 rounding of the two 1x1 convs; pixels span [-1, 1].
    assert (model.decode(model.encode(video)) - before).abs().max() < 1e-4


def test_cli_writes_a_file_the_engine_reloads(tmp_path, capsys, monkeypatch):
    import engine.toy.train_vae as train_vae_module

    monkeypatch.setattr(train_vae_module, "TOY_VAE_CONFIG", SMALL)
    out = tmp_path / "wan_2.1_vae_toy.safetensors"
    assert main(["--steps", "2", "--batch", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "re-loaded with load_vae(encoder=True)" in printed
    assert load_vae(out, encoder=True).config == SMALL


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="steps and batch"):
        train_vae(0, config=SMALL)


def test_summed_norms_give_the_reference_norms_values_and_gradients_and_train(trained):
    """use_summed_norms: every RMSNorm computes x * rsqrt(sum x^2) instead of F.normalize. A VAE with
    them gives the reference formula's training loss (to 1e-5) and gradients, and a seeded run with
    them follows the plain run's loss curve."""
    import types

    from engine.toy.train_vae import use_summed_norms
    from engine.wan.vae import RMSNorm

    state = random_vae_state_dict(vae_file_shapes(SMALL), 3)
    plain, summed = vae_from(state), vae_from(state)
    use_summed_norms(summed)
    video = clip_tensor([render_clip(Scene("red", "square", "left", "teal"), np.random.default_rng(0))])
    for model in (plain, summed):
        model.train()
    losses = [training_loss(model, video, torch.Generator().manual_seed(0))[0] for model in (plain, summed)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), summed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)
    # the comparison can fail: the norm taken over time instead of channels (a deliberate mistake)
    wrong = vae_from(state).train()
    for module in wrong.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(
                lambda norm, x: x * torch.rsqrt(x.square().sum(2, keepdim=True).clamp_min(1e-24)) * norm.scale * norm.gamma,
                module)
    wrong_loss = training_loss(wrong, video, torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(wrong_loss, losses[0], rtol=1e-3, atol=1e-6)

    # the same seeded run as the `trained` fixture's, with summed norms: the same loss curve to
    # rounding, and weights that are not bit-identical (the other formula really ran)
    plain_state, plain_lines = trained
    lines: list[str] = []
    run = train_vae(STEPS, seed=0, config=SMALL, batch=1, log=lines.append, log_every=10, summed_norms=True)
    curve = [float(line.split()[4]) for line in lines if line.startswith("vae step")]
    plain_curve = [float(line.split()[4]) for line in plain_lines if line.startswith("vae step")]
    np.testing.assert_allclose(curve, plain_curve, rtol=0.02)
    assert run.keys() == plain_state.keys()
    assert any(not torch.equal(run[n], plain_state[n]) for n in run)


def test_shape_weight_counts_the_shapes_pixels_that_many_times():
    """pixel_error: the shape's pixels (shape_mask: where the ground truth differs from its
    background) count `shape_weight` times, normalised to the plain MSE's scale; weight 1 is the
    plain MSE bit for bit, in the training loss too."""
    from engine.toy.train_vae import pixel_error, shape_mask

    clip = render_clip(Scene("red", "triangle", "up", "brown"), np.random.default_rng(3))
    video = clip_tensor([clip])
    mask = shape_mask(video)
    truth = torch.from_numpy((clip != clip[:, :1, :1]).any(-1))
    assert mask.shape == (1, 1, 17, 64, 64) and torch.equal(mask[0, 0], truth)
    share = truth.float().mean().item()
    assert 0.05 < share < 0.3, share

    # two wrong reconstructions of the same plain MSE: one off on the shape only, one on the background only
    on_shape = video + 0.5 * mask
    on_background = video + 0.5 * ~mask * (share / (1 - share)) ** 0.5
    plain = [pixel_error(r, video) for r in (on_shape, on_background)]
    torch.testing.assert_close(plain[0], plain[1], rtol=1e-5, atol=0)
    assert torch.equal(plain[0], (on_shape - video).square().mean())
    weighted = [pixel_error(r, video, 5.0) for r in (on_shape, on_background)]
    torch.testing.assert_close(weighted[0] / weighted[1], torch.tensor(5.0), rtol=1e-4, atol=0)
    # normalised by the mean weight: a uniform error keeps its value at any weight
    torch.testing.assert_close(pixel_error(video + 0.1, video, 5.0), pixel_error(video + 0.1, video), rtol=1e-5, atol=0)

    model = vae_from(random_vae_state_dict(vae_file_shapes(SMALL), 3)).train()
    loss, mse = training_loss(model, video, torch.Generator().manual_seed(0))
    same, _ = training_loss(model, video, torch.Generator().manual_seed(0), shape_weight=1.0)
    other, other_mse = training_loss(model, video, torch.Generator().manual_seed(0), shape_weight=5.0)
    assert torch.equal(loss, same) and torch.equal(mse, other_mse) and not torch.allclose(loss, other)
    with pytest.raises(ValueError, match="shape_weight"):
        train_vae(1, config=SMALL, shape_weight=0.5)


def test_video_warmup_warms_the_learning_rate_up_again_at_the_switch_to_clips():
    """phase_learning_rate: the plain schedule on the image steps; from the first video step on, scaled
    by (steps since the switch + 1) / video_warmup until that reaches 1. 0 is the plain schedule."""
    from engine.toy.train_vae import IMAGE_FRACTION, learning_rate, phase_learning_rate, video_phase_start

    steps = 400
    switch = video_phase_start(steps)
    assert switch == 240 and all((s < IMAGE_FRACTION * steps) == (s < switch) for s in range(steps))
    assert [video_phase_start(n) for n in (1, 3, 7)] == [1, 2, 5]
    for step in range(steps):
        plain = learning_rate(step, steps)
        assert phase_learning_rate(step, steps) == plain
        expected = plain if step < switch else plain * min(1.0, (step - switch + 1) / 50)
        assert phase_learning_rate(step, steps, 50) == pytest.approx(expected, rel=1e-12)
    assert phase_learning_rate(switch, steps, 50) == pytest.approx(learning_rate(switch, steps) / 50)
    assert phase_learning_rate(switch - 1, steps, 50) == learning_rate(switch - 1, steps)
    # and the training loop runs it: 3 steps are 2 image steps and 1 video step, whose update it shrinks
    quiet = dict(seed=5, config=SMALL, batch=1, log=lambda _: None)
    plain, warm, image_only = train_vae(3, **quiet), train_vae(3, video_warmup=50, **quiet), train_vae(2, **quiet)
    changed = [name for name in plain if not torch.equal(plain[name], warm[name])]
    assert changed
    for name in changed:  # the video step moved each weight about a fiftieth as far
        full, small = (plain[name] - image_only[name]).norm(), (warm[name] - image_only[name]).norm()
        assert small < 0.2 * full, name
    with pytest.raises(ValueError, match="video_warmup"):
        train_vae(1, config=SMALL, video_warmup=-1)
