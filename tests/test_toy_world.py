"""The toy world's scenes, prompts and clips, and the pixel-only adherence scorer that reads them back."""
import itertools

import numpy as np
import pytest

from engine.toy import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    Scene,
    accuracy,
    all_scenes,
    held_out_scenes,
    parse_prompt,
    phrasings,
    predict,
    render_clip,
    score_clip,
    training_scenes,
)
from engine.video import read_mp4, write_mp4

SEEDS = (0, 1)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def ground_truth() -> list[tuple[Scene, np.ndarray]]:
    """Every scene rendered with two seeds."""
    return [(scene, render_clip(scene, seed)) for seed in SEEDS for scene in all_scenes()]


def blur(clip: np.ndarray) -> np.ndarray:
    """One [1, 2, 1] / 4 pass over rows and columns (about a Gaussian of sigma 0.7 px), as float."""
    out = np.pad(clip.astype(np.float32), [(0, 0), (1, 1), (0, 0), (0, 0)], mode="edge")
    out = (out[:, :-2] + 2 * out[:, 1:-1] + out[:, 2:]) / 4
    out = np.pad(out, [(0, 0), (0, 0), (1, 1), (0, 0)], mode="edge")
    return (out[:, :, :-2] + 2 * out[:, :, 1:-1] + out[:, :, 2:]) / 4


def noisy(clip: np.ndarray, rng: np.random.Generator, sigma: float = 10.0) -> np.ndarray:
    """Gaussian noise of `sigma` added, rounded and clipped back to uint8."""
    noise = rng.standard_normal(clip.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(clip + noise), 0, 255).astype(np.uint8)


def coverage(clip: np.ndarray, scene: Scene) -> np.ndarray:
    """How much of each pixel [F, H, W] the shape covers, read back exactly from the blend of its two colours."""
    background = np.array(BACKGROUND_RGB[scene.background], np.float64)
    axis = np.array(COLOUR_RGB[scene.colour], np.float64) - background
    return (clip - background) @ axis / (axis @ axis)


# --- scenes and prompts ---


def test_the_world_has_288_scenes_and_holds_out_those_whose_indices_sum_to_a_multiple_of_10():
    scenes = all_scenes()
    assert (len(SHAPES), len(COLOURS), len(DIRECTIONS), len(BACKGROUNDS)) == (3, 6, 4, 4)
    assert len(scenes) == len(set(scenes)) == 288
    expected_held_out = sum((c + s + d + b) % 10 == 0 for c, s, d, b in itertools.product(range(6), range(3), range(4),
                                                                                          range(4)))
    assert expected_held_out == 20
    assert len(held_out_scenes()) == expected_held_out
    assert len(training_scenes()) == 288 - expected_held_out
    assert set(training_scenes()).isdisjoint(held_out_scenes())

    assert Scene("purple", "triangle", "down", "black").indices == (5, 2, 3, 0)
    assert Scene("purple", "triangle", "down", "black").held_out  # 5 + 2 + 3 + 0 = 10
    assert not Scene("purple", "triangle", "up", "black").held_out  # 9
    assert Scene("red", "circle", "left", "black").held_out  # 0
    # Only combinations are held out: every single value is still seen in training.
    for field, names in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS),
                         ("background", BACKGROUNDS)):
        assert {getattr(scene, field) for scene in training_scenes()} == set(names)


def test_a_scene_with_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        Scene("pink", "circle", "left", "black")
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        Scene("red", "circle", "sideways", "black")


def test_every_phrasing_of_every_scene_parses_back_to_it():
    scene = Scene("yellow", "square", "up", "teal")
    assert scene.prompt == "a yellow square moving up on a teal background"
    assert phrasings(scene)[0] == scene.prompt
    assert len(phrasings(scene)) >= 4
    for held_out in held_out_scenes():
        assert parse_prompt(held_out.prompt) == held_out
    every_text = [text for scene in all_scenes() for text in phrasings(scene)]
    assert len(set(every_text)) == len(every_text)  # no phrasing names two scenes
    assert phrasings(scene)[1] == "yellow square on teal, moving up"
    for scene in all_scenes():
        assert [parse_prompt(text) for text in phrasings(scene)] == [scene] * len(phrasings(scene))
    assert parse_prompt("  A Yellow square moving up on a teal background. ") == Scene("yellow", "square", "up", "teal")


@pytest.mark.parametrize("prompt", [
    "a red hexagon moving left on a black background",  # not a shape of the world
    "a pink circle moving left on a black background",
    "a red circle moving left on a black",  # truncated
    "a red circle moving left",
    "",
    "a red circle moving left on a black background with a tree",
])
def test_a_prompt_outside_the_world_is_refused(prompt):
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt(prompt)


def test_colours_are_far_apart_so_a_blurry_render_still_classifies():
    colours = {name: np.array(rgb, float) for name, rgb in COLOUR_RGB.items()}
    backgrounds = {name: np.array(rgb, float) for name, rgb in BACKGROUND_RGB.items()}
    assert set(colours) == set(COLOURS) and set(backgrounds) == set(BACKGROUNDS)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours.values(), 2)) > 130
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(backgrounds.values(), 2)) > 110
    assert min(np.linalg.norm(a - b) for a in colours.values() for b in backgrounds.values()) > 110


# --- clips ---


def test_a_clip_is_the_same_for_a_seed_and_differs_across_seeds():
    scene = Scene("blue", "circle", "right", "gray")
    clip = render_clip(scene, 7)
    assert clip.shape == (17, 64, 64, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, render_clip(scene, 7))
    # A seed joins the scene's indices; a Generator is used as given.
    assert np.array_equal(clip, render_clip(scene, np.random.default_rng([7, *scene.indices])))
    assert not np.array_equal(clip, render_clip(scene, np.random.default_rng(7)))
    others = [render_clip(scene, seed) for seed in range(8, 14)]
    assert all(not np.array_equal(clip, other) for other in others)
    # The seeds move the start, size and speed, not only a pixel or two.
    alphas = [coverage(other, scene) for other in [clip, *others]]
    starts = [np.argwhere(alpha[0] > 0.5)[:, 1].mean() for alpha in alphas]
    travels = [np.argwhere(alpha[-1] > 0.5)[:, 1].mean() - start for alpha, start in zip(alphas, starts)]
    areas = [alpha[0].sum() for alpha in alphas]
    # A shape 22-28 px wide that travels at least 45% of the frame has a start range of only a few
    # pixels (64 - 2 margins - side - travel); the size and the speed vary more.
    assert np.ptp(starts) > 3 and np.ptp(travels) > 4 and np.ptp(areas) > 100


def test_render_clip_refuses_bad_arguments():
    scene = Scene("blue", "circle", "right", "gray")
    with pytest.raises(ValueError, match="frames must be"):
        render_clip(scene, 0, frames=1)
    with pytest.raises(ValueError, match="size must be"):
        render_clip(scene, 0, size=8)
    with pytest.raises(ValueError, match="seed >= 0"):
        render_clip(scene, -1)
    with pytest.raises(TypeError, match="needs a Scene"):
        render_clip("a blue circle moving right on a gray background", 0)


def test_one_seed_gives_each_scene_its_own_size_and_path(ground_truth):
    firsts = set()
    for scene, clip in ground_truth[:len(all_scenes())]:  # seed 0 of every scene
        alpha = coverage(clip, scene)
        firsts.add((round(float(alpha[0].sum()), 1), *np.argwhere(alpha[0] > 0.5).mean(axis=0).round(1)))
    assert len(firsts) > 0.9 * len(all_scenes())


def test_the_shape_stays_whole_inside_the_frame_and_crosses_at_least_40_percent_of_it(ground_truth):
    for scene, clip in ground_truth:
        alpha = coverage(clip, scene)
        assert np.abs(alpha).max() < 1.01, scene  # only the two colours and their blends
        edge = np.ones(alpha.shape[1:], bool)
        edge[1:-1, 1:-1] = False
        assert np.abs(alpha[:, edge]).max() < 0.01, scene  # the outermost pixels stay background
        # The same area in every frame: never clipped by the frame edge.
        areas = alpha.sum(axis=(1, 2))
        assert areas.min() > 0.95 * areas.max() and areas.min() > 0.015 * 64 * 64, scene
        ys, xs = np.mgrid[0:64, 0:64]
        track = np.stack([(alpha * xs).sum(axis=(1, 2)), (alpha * ys).sum(axis=(1, 2))], axis=1) / areas[:, None]
        along, across = (0, 1) if scene.direction in ("left", "right") else (1, 0)
        sign = 1 if scene.direction in ("right", "down") else -1
        steps = np.diff(track[:, along]) * sign
        assert steps.min() > 0, scene  # steady motion, one way
        assert (track[-1, along] - track[0, along]) * sign >= 0.4 * 64, scene
        assert np.ptp(track[:, across]) < 0.5, scene


# --- the scorer on ground truth ---


def test_the_scorer_reads_every_ground_truth_clip(ground_truth):
    scores = [score_clip(clip, scene) for scene, clip in ground_truth]
    result = accuracy(scores)
    print("clean", result)
    assert min(result.values()) >= 0.99, result


def test_the_scorer_reads_clips_after_an_h264_round_trip(tmp_path):
    # Every colour on every background, shapes and directions cycling through.
    scenes = [Scene(colour, SHAPES[i % 3], DIRECTIONS[i % 4], background)
              for i, (colour, background) in enumerate(itertools.product(COLOURS, BACKGROUNDS))]
    scores = []
    for index, scene in enumerate(scenes):
        path = tmp_path / f"{index}.mp4"
        write_mp4(render_clip(scene, index), path, fps=16)
        decoded = read_mp4(path)
        assert decoded.shape == (17, 64, 64, 3)
        scores.append(score_clip(decoded, scene))
    result = accuracy(scores)
    print("h264", result)
    assert min(result.values()) >= 0.99, result


def test_the_scorer_reads_blurred_and_noisy_clips(ground_truth):
    rng = np.random.default_rng(0)
    # Every scene once (the second seed's clips), to keep the file fast.
    scores = [score_clip(noisy(blur(clip), rng), scene) for scene, clip in ground_truth[len(all_scenes()):]]
    result = accuracy(scores)
    print("noise 10 + blur", result)
    assert min(result.values()) >= 0.99, result


def test_a_stray_speck_elsewhere_does_not_change_the_reading():
    scene = Scene("green", "square", "down", "brown")
    clip = render_clip(scene, 3)
    columns = np.flatnonzero(coverage(clip, scene).max(axis=(0, 1)) > 0)  # those the square ever touches
    column = 4 if columns.min() > 10 else 57
    assert not set(range(column - 2, column + 5)) & set(columns)
    speckled = clip.copy()
    speckled[:, 30:33, column:column + 3] = COLOUR_RGB["green"]  # the shape's own colour, a fifth of its size
    assert predict(clip) == predict(speckled) == scene.names()


# --- the scorer rejects what is not there ---


@pytest.mark.parametrize("field", ["colour", "shape", "direction", "background"])
def test_a_clip_scored_against_a_scene_differing_in_one_attribute_gets_that_attribute_wrong(field):
    names = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "background": BACKGROUNDS}[field]
    for seed, shown in enumerate([Scene("white", "circle", "left", "gray"), Scene("purple", "triangle", "down", "teal"),
                                  Scene("red", "square", "up", "brown")]):
        clip = render_clip(shown, seed)
        for other in names:
            if other == getattr(shown, field):
                continue
            asked = Scene(**{**shown.names(), field: other})
            score = score_clip(clip, asked)
            assert getattr(score, field) is False, (shown, asked)
            assert not score.all
            assert all(getattr(score, name) for name in shown.names() if name != field), (shown, asked, score)
            assert score.predicted == shown.names()


def test_a_clip_played_backwards_reads_as_the_opposite_direction():
    for scene in [Scene("blue", "circle", d, "black") for d in DIRECTIONS]:
        assert predict(render_clip(scene, 5)[::-1].copy())["direction"] == OPPOSITE[scene.direction]


def test_a_static_or_diagonal_clip_has_no_direction():
    scene = Scene("yellow", "triangle", "right", "teal")
    still = np.repeat(render_clip(scene, 2)[8:9], 17, axis=0)
    score = score_clip(still, scene)
    assert score.predicted["direction"] is None and not score.direction and not score.all
    assert score.colour and score.shape and score.background  # the rest is still there
    # Nor does one that slides diagonally, which no prompt of the world asks for.
    diagonal = np.stack([np.roll(still[0], (i - 8, i - 8), axis=(0, 1)) for i in range(17)])
    assert predict(diagonal) == {**scene.names(), "direction": None}
    assert predict(diagonal[:, :, ::-1].copy()) == {**scene.names(), "direction": None}  # down-left


@pytest.mark.parametrize("sigma", [0.0, 10.0])
def test_an_all_background_clip_shows_no_colour_shape_or_direction(sigma):
    scene = Scene("white", "square", "left", "gray")
    empty = noisy(np.full((17, 64, 64, 3), BACKGROUND_RGB["gray"], np.float32), np.random.default_rng(1), sigma)
    score = score_clip(empty, scene)
    assert score.predicted == {"colour": None, "shape": None, "direction": None, "background": "gray"}
    assert (score.colour, score.shape, score.direction, score.background, score.all) == (False, False, False, True,
                                                                                          False)
    assert accuracy([score]) == {"colour": 0.0, "shape": 0.0, "direction": 0.0, "background": 1.0, "all": 0.0}


def test_accuracy_is_the_share_right_per_attribute():
    scene = Scene("red", "circle", "right", "black")
    right = score_clip(render_clip(scene, 0), scene)
    wrong_colour = score_clip(render_clip(scene, 1), Scene("blue", "circle", "right", "black"))
    assert accuracy([right, right, right, wrong_colour]) == {
        "colour": 0.75, "shape": 1.0, "direction": 1.0, "background": 1.0, "all": 0.75}
    with pytest.raises(ValueError, match="at least one Score"):
        accuracy([])


@pytest.mark.parametrize("frames", [
    np.zeros((17, 64, 64, 3), np.float32),
    np.zeros((64, 64, 3), np.uint8),
    np.zeros((17, 64, 64, 4), np.uint8),
    np.zeros((1, 64, 64, 3), np.uint8),
    [[[0, 0, 0]]],
])
def test_the_scorer_refuses_frames_it_cannot_read(frames):
    with pytest.raises(ValueError, match="adherence needs"):
        predict(frames)


def write_output(out, rows: list[tuple[str, int, np.ndarray]]) -> None:
    """A `reelray run`-like output folder: metadata/part.parquet and one MP4 per row, named by job id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "metadata").mkdir(parents=True)
    (out / "videos").mkdir()
    table = {"job_id": [], "prompt": [], "seed": [], "file_name": []}
    for i, (prompt, seed, clip) in enumerate(rows):
        name = f"videos/job{i}.mp4"
        write_mp4(clip, out / name, fps=16)
        for key, value in zip(table, (f"job{i}", prompt, seed, name)):
            table[key].append(value)
    table["prompt"].append("a red fox in the snow")  # not a world prompt: skipped, not an error
    table["job_id"].append("fox")
    table["seed"].append(0)
    table["file_name"].append("videos/fox.mp4")
    pq.write_table(pa.table(table), out / "metadata" / "part-0.parquet")


def test_score_output_scores_each_video_against_its_own_row_and_catches_swapped_files(tmp_path, capsys):
    from engine.toy.adherence import main, score_output

    scenes = [Scene("red", "circle", "right", "black"), Scene("green", "triangle", "down", "gray"),
              held_out_scenes()[0]]
    rows = [(scene.prompt, seed, render_clip(scene, seed)) for seed, scene in enumerate(scenes)]
    write_output(tmp_path / "good", rows)
    scored = score_output(tmp_path / "good")
    assert [item.prompt for item in scored] == [scene.prompt for scene in scenes]
    assert all(item.score.all for item in scored)
    assert [item.held_out for item in scored] == [False, False, True]

    # Two jobs' videos swapped under each other's names: both rows fail on what differs.
    swapped = [(rows[0][0], 0, rows[1][2]), (rows[1][0], 1, rows[0][2]), rows[2]]
    write_output(tmp_path / "mixed", swapped)
    verdicts = [item.score.all for item in score_output(tmp_path / "mixed")]
    assert verdicts == [False, False, True]

    assert main([str(tmp_path / "mixed"), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert out.count("MISS") == 2 and "seen combinations" in out and "held-out combinations" in out
    seen_line, held_line = (line for line in out.splitlines() if "combinations" in line and "n=" in line)
    assert "n=2" in seen_line and seen_line.endswith("all   0.0%")
    assert "n=1" in held_line and held_line.endswith("all 100.0%")
