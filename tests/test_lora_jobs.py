"""LoRAs chosen per job: the `loras` manifest columns and flags, job identity, the dataset's columns,
scheduling by LoRA set, and frames that do not depend on what an actor rendered before.

The LoRA files are written here in ComfyUI's layout for the tiny Wan2.1 T2V DiT (dim 256, 2
blocks): rank-8 pairs on the self- and cross-attention and FFN layers of both blocks, with
alpha, at a scale that visibly changes the frames.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from engine.families import foreign_names, get_family
from jobs.family import parse_lora_ref
from jobs.job import RenderJob
from jobs.manifest import load_jobs
from jobs.sources import ManifestError
from pipeline.driver import PromptQueue, digest_and_probe, run
from run_helpers import metadata, run_config, write_manifest

MODEL = "ab" * 32
DIM, FFN = 256, 512


def write_lora(path: Path, seed: int, rank: int = 8, blocks=(0, 1), prefix: str = "diffusion_model.") -> Path:
    """A ComfyUI-layout LoRA for the tiny DiT: lora_down [r, in], lora_up [out, r], alpha."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    layers = {"self_attn.q": (DIM, DIM), "self_attn.v": (DIM, DIM), "cross_attn.o": (DIM, DIM),
              "ffn.0": (FFN, DIM), "ffn.2": (DIM, FFN)}
    for n in blocks:
        for layer, (out_dim, in_dim) in layers.items():
            key = f"{prefix}blocks.{n}.{layer}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.5
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    (d / "text.safetensors").write_text("not a safetensors file")
    save_file({"weight": torch.zeros(2, 2)}, d / "plain.safetensors")
    return {"x": write_lora(d / "x.safetensors", 1), "y": write_lora(d / "y.safetensors", 2),
            "text": d / "text.safetensors", "plain": d / "plain.safetensors", "dir": d}


def jobs_of(tmp_path, rows: dict, family: str = "wan2.1-t2v", **kw):
    pq.write_table(pa.table(rows), tmp_path / "m.parquet")
    spec = get_family(family).spec
    return load_jobs(tmp_path / "m.parquet", model_digest=MODEL, family=spec, foreign=foreign_names(get_family(family)),
                     digest=digest_and_probe, **kw)


def test_lora_refs_parse_path_and_strength():
    assert parse_lora_ref("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_ref(" a.safetensors:0.75 ") == ("a.safetensors", 0.75)
    assert parse_lora_ref("s3://bucket/a.safetensors") == ("s3://bucket/a.safetensors", 1.0)
    assert parse_lora_ref("s3://bucket/a.safetensors:-1") == ("s3://bucket/a.safetensors", -1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_ref("a.safetensors:inf")


def test_manifest_lora_cells_give_ordered_digests_and_strengths(loras, tmp_path):
    x, y = str(loras["x"]), str(loras["y"])
    jobs, errors, _ = jobs_of(tmp_path, {
        "prompt": ["a", "b", "c", "d", "e", "f"],
        "loras": [[f"{x}:0.5"], [x], [f"{x}:0.5", y], [y, f"{x}:0.5"], [], None],
    }, input_defaults={"loras": [f"{y}:2"]})
    assert not errors
    by = {j.prompt: j for j in jobs}
    assert by["a"].input_digests() == {"loras": [[sha(x), 0.5]]}
    assert by["b"].input_digests() == {"loras": [[sha(x), 1.0]]}
    assert by["c"].input_digests()["loras"] == [[sha(x), 0.5], [sha(y), 1.0]]
    assert by["e"].inputs == {}  # an empty list: no LoRA, the run's default not applied
    assert by["f"].input_digests() == {"loras": [[sha(y), 2.0]]}  # null: the run's --lora
    # Strength, order and content each make another job; none of them is the plain job.
    plain = RenderJob.create(family="wan2.1-t2v", model_digest=MODEL, prompt="e", seed=0,
                             params=get_family("wan2.1-t2v").spec.defaults(), negative_prompt=by["e"].negative_prompt)
    assert by["e"].job_id == plain.job_id
    ids = {RenderJob.create(family="wan2.1-t2v", model_digest=MODEL, prompt="p", seed=0, params=j.params,
                            negative_prompt=j.negative_prompt, inputs=j.inputs).job_id for j in jobs}
    assert len(ids) == 6


def test_the_same_lora_under_another_path_is_the_same_job(loras, tmp_path):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(loras["x"].read_bytes())
    jobs, errors, _ = jobs_of(tmp_path, {"prompt": ["a", "a"], "loras": [[str(loras["x"])], [str(copy)]]})
    assert not errors and len(jobs) == 1  # one job: the second row is a duplicate


@pytest.mark.parametrize("cell, reason", [
    (["gone.safetensors"], "element 0: {dir}/gone.safetensors: no such file"),
    (["text.safetensors"], "text.safetensors: not a safetensors file"),
    (["plain.safetensors"], "plain.safetensors: no LoRA keys (1 tensors, e.g. 'weight')"),
    (["x.safetensors:nan"], "element 0: 'x.safetensors:nan': the strength must be a finite number"),
    ([""], "element 0: must be PATH[:STRENGTH]"),
])
def test_bad_lora_cells_are_row_errors(loras, cell, reason):
    d = loras["dir"]
    jobs, errors, _ = jobs_of(d, {"prompt": ["bad", "good"], "loras": [cell, ["x.safetensors"]]})
    assert [j.prompt for j in jobs] == ["good"]
    (error,) = errors
    assert error.row == 0 and error.field == "loras" and reason.format(dir=d) in error.reason, error.reason


def test_expert_families_take_a_lora_set_per_expert(loras, tmp_path):
    x, y = str(loras["x"]), str(loras["y"])
    jobs, errors, _ = jobs_of(tmp_path, {"prompt": ["a", "b"], "loras_high": [[x], None], "loras_low": [[y], [x]]},
                              family="wan2.2-t2v-a14b")
    assert not errors
    by = {j.prompt: j for j in jobs}
    assert by["a"].input_digests() == {"loras_high": [[sha(x), 1.0]], "loras_low": [[sha(y), 1.0]]}
    assert by["b"].input_digests() == {"loras_low": [[sha(x), 1.0]]}
    _, errors, _ = jobs_of(tmp_path, {"prompt": ["a"], "loras": [[x]]}, family="wan2.2-t2v-a14b")
    assert "has no 'loras'" in errors[0].reason and "loras_high" in errors[0].reason


def test_the_queue_keeps_an_actor_on_its_lora_set(loras, tmp_path):
    x, y = str(loras["x"]), str(loras["y"])
    rows = {"prompt": ["p1", "p2", "p3", "p4"], "loras": [[x], [y], [x], [y]]}
    jobs, _, _ = jobs_of(tmp_path, rows, seeds=[0, 1])
    queue = PromptQueue(jobs)
    first = queue.next_for(0, None)
    order = [first]
    group = (first.lora_key(), first.prompt)
    while (job := queue.next_for(0, group)) is not None:
        order.append(job)
        group = (job.lora_key(), job.prompt)
    sets = [job.lora_key() for job in order]
    # All of one LoRA set's jobs, then all of the other's: one switch.
    assert sum(a != b for a, b in zip(sets, sets[1:])) == 1 and len(order) == 8


@pytest.mark.parametrize("policy", ["dequantize_once", "on_the_fly"])
def test_interleaved_lora_sets_on_one_actor_render_what_a_fresh_engine_renders(ray_session, tiny_model, loras,
                                                                              tmp_path, policy):
    """Jobs with LoRA X, Y, none and X+Y interleaved in one actor: every frame equals a fresh
    engine's render of that job alone (no drift from applying and removing LoRAs)."""
    from engine.model_set import ModelSet
    from engine.render import Engine

    x, y = str(loras["x"]), str(loras["y"])
    cells = [[x], [y], [], [f"{x}:0.5", y], [x], []]
    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": [f"fox {i % 2}" for i in range(6)],
                                                       "seed": list(range(6)), "loras": cells})
    out = tmp_path / "out"
    report = run(run_config(tiny_model, manifest, out, actors=1, policy=policy), stream=io.StringIO())
    assert report["counts"] == report["counts"] | {"jobs": 6, "done": 6, "failed": 0}
    df = metadata(out).sort_values("row")
    assert df["frames_sha256"].nunique() == 6
    assert list(df.iloc[3]["loras_strength"]) == [0.5, 1.0] and list(df.iloc[3]["loras_sha256"]) == [sha(x), sha(y)]
    assert df.iloc[2]["loras"] is None

    models = ModelSet.from_dir(tiny_model)
    for (_, row), cell in zip(df.iterrows(), cells):
        fresh = Engine(models, policy=policy)
        inputs = {"loras": cell} if cell else {}
        assert fresh.render(row["prompt"], int(row["seed"]), inputs=inputs).frames_sha256 == row["frames_sha256"]


def test_a_lora_file_replaced_under_its_path_is_read_again_and_checked(tiny_model, loras, tmp_path):
    """The actor passes each job's LoRA digests: the cache is keyed by content, so a file overwritten
    during a run is never served as its old bytes under the new job's name (nor the reverse)."""
    import shutil

    from engine.families.base import RenderError
    from engine.model_set import ModelSet
    from engine.render import Engine

    models = ModelSet.from_dir(tiny_model)
    engine = Engine(models)
    path = tmp_path / "style.safetensors"
    shutil.copyfile(loras["x"], path)
    first = engine.render("a fox", 1, inputs={"loras": [str(path)]}, digests={"loras": [[sha(loras["x"]), 1.0]]})
    shutil.copyfile(loras["y"], path)  # replaced while the actor lives
    second = engine.render("a fox", 1, inputs={"loras": [str(path)]}, digests={"loras": [[sha(loras["y"]), 1.0]]})
    assert second.frames_sha256 == Engine(models).render("a fox", 1, inputs={"loras": [str(loras["y"])]}).frames_sha256
    assert second.frames_sha256 != first.frames_sha256
    # keyed by the path alone (no digests), the cache would have served x's bytes for y's job: what
    # the digests fix (the deliberate mistake, shown)
    stale = Engine(models)
    shutil.copyfile(loras["x"], path)
    stale.render("a fox", 1, inputs={"loras": [str(path)]})
    shutil.copyfile(loras["y"], path)
    assert stale.render("a fox", 1, inputs={"loras": [str(path)]}).frames_sha256 == first.frames_sha256
    # a job that named bytes the file no longer has fails, naming the file
    with pytest.raises(RenderError, match=r"style.safetensors: its bytes have sha256 .* \(the file changed since"):
        Engine(models).render("a fox", 1, inputs={"loras": [str(path)]}, digests={"loras": [[sha(loras["x"]), 1.0]]})


def test_render_and_run_flags(tiny_model, loras, tmp_path, capsys):
    from engine.model_set import ModelSet
    from engine.render import Engine
    from pipeline.cli import main

    out = tmp_path / "x.mp4"
    assert main(["render", "--model", str(tiny_model), "--prompt", "a fox", "--seed", "1", "--device", "cpu",
                 "--lora", f"{loras['x']}:0.7", "--lora", str(loras["y"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    engine = Engine(ModelSet.from_dir(tiny_model))
    with_loras = engine.render("a fox", 1, inputs={"loras": [f"{loras['x']}:0.7", str(loras["y"])]})
    assert f"frames_sha256 {with_loras.frames_sha256}" in printed
    assert with_loras.frames_sha256 != engine.render("a fox", 1).frames_sha256

    status = main(["render", "--model", str(tiny_model), "--prompt", "a fox", "--lora-high", str(loras["x"]),
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "--lora-high: the Wan2.1 T2V family takes its LoRAs with --lora" in err
    status = main(["render", "--model", str(tiny_model), "--prompt", "a fox", "--lora", str(loras["text"]),
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "text.safetensors: not a safetensors file" in err and len(err.strip().splitlines()) == 1


def test_run_wide_parameters_and_loras_fill_the_rows_that_give_none(tiny_model, loras, tmp_path):
    """`reelray run --step-list 0,500 --sampler lcm --guidance 1 --lora X`: rows without their own
    values take these; a row's own column wins; `status` with the same flags finds the same jobs."""
    from engine.model_set import ModelSet
    from pipeline.driver import read_jobs

    manifest = write_manifest(tmp_path / "m.parquet", {"prompt": ["a", "b"], "guidance": [None, 3.0],
                                                       "loras": [None, []]})
    models = ModelSet.from_dir(tiny_model)
    jobs, errors, _, _, _ = read_jobs(str(manifest), models.paths(), models.family, None,
                                      {"loras": [str(loras["x"])]},
                                      {"step_list": [0, 500], "sampler": "lcm", "guidance": 1.0})
    assert not errors
    a, b = sorted(jobs, key=lambda j: j.prompt)
    assert (a.params.step_list, a.params.steps, a.params.sampler, a.params.guidance) == ((0, 500), 2, "lcm", 1.0)
    assert b.params.guidance == 3.0 and b.params.step_list == (0, 500)
    assert a.input_digests() == {"loras": [[sha(loras["x"]), 1.0]]} and b.inputs == {}
    with pytest.raises(ValueError, match="run parameters: steps 8 disagrees with step_list of 2 entries"):
        read_jobs(str(manifest), models.paths(), models.family, None, None, {"step_list": [0, 500], "steps": 8})


def test_a_lora_that_does_not_fit_the_model_is_its_rows_error_before_anything_renders(ray_session, tiny_model,
                                                                                       loras, tmp_path):
    """Checked at load from the LoRA's header against the DiT built on the meta device: keys for
    blocks the tiny DiT does not have, and a pair made for a wider layer, are each their row's
    error in one line naming the file, a key and the DiT; the manifest is refused as a whole, and
    with --skip-invalid the other jobs (a good LoRA, none) are done."""
    from engine.model_set import ModelSet
    from pipeline.driver import read_jobs

    more_blocks = write_lora(tmp_path / "for_a_deeper_model.safetensors", seed=3, blocks=(0, 7))
    wider = tmp_path / "for_a_wider_model.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(8, 2 * DIM),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(2 * DIM, 8)}, wider)
    manifest = write_manifest(tmp_path / "m.parquet", {
        "prompt": ["deeper", "wider", "good", "none"],
        "loras": [[str(more_blocks)], [str(loras["x"]), str(wider)], [str(loras["x"])], None]})
    models = ModelSet.from_dir(tiny_model)
    jobs, errors, _, _, _ = read_jobs(str(manifest), models.paths(), models.family, None)
    assert sorted(j.prompt for j in jobs) == ["good", "none"]
    dit = models.files["dit"].name
    deeper, wide = sorted(errors, key=lambda e: e.row)
    assert deeper.row == 0 and deeper.field == "loras" and "\n" not in deeper.reason
    assert "for_a_deeper_model.safetensors: 15 keys match no layer of this model, e.g. " in deeper.reason
    assert "blocks.7." in deeper.reason and deeper.reason.endswith(f"(the DiT {dit})"), deeper.reason
    assert wide.row == 1 and "element 1: " in wide.reason and (
        "for_a_wider_model.safetensors: 'diffusion_model.blocks.0.self_attn.q.lora_down.weight' has shape "
        f"[8, {2 * DIM}], but 'blocks.0.self_attn.q' takes [8, {DIM}] (the DiT {dit})") in wide.reason, wide.reason
    # The deliberate mistake the check exists for: without it the same manifest loads whole.
    everything, none, _ = jobs_of(tmp_path, {"prompt": ["deeper", "wider", "good", "none"],
                                             "loras": [[str(more_blocks)], [str(wider)], [str(loras["x"])], None]})
    assert len(everything) == 4 and not none

    # The two experts of an A14B pair have one shape: both named, whichever LoRA slot the row fills.
    from engine.tiny import make_tiny_model

    make_tiny_model(tmp_path / "a14b", family="wan2.2-t2v-a14b")
    pair = ModelSet.from_dir(tmp_path / "a14b")
    a14b = write_manifest(tmp_path / "a14b.parquet", {"prompt": ["deeper"], "loras_low": [[str(more_blocks)]]})
    _, (error,), _, _, _ = read_jobs(str(a14b), pair.paths(), pair.family, None)
    assert error.field == "loras_low" and error.reason.endswith(
        f"(the DiTs {pair.files['dit_high'].name} and {pair.files['dit_low'].name})"), error.reason

    out = tmp_path / "out"
    with pytest.raises(ManifestError, match=r"2 invalid row\(s\)"):
        run(run_config(tiny_model, manifest, out, actors=1, retries=0), stream=io.StringIO())
    report = run(run_config(tiny_model, manifest, out, actors=1, retries=0, skip_invalid=True),
                 stream=io.StringIO())
    assert report["counts"] == report["counts"] | {"jobs": 2, "done": 2, "failed": 0}
    assert report["invalid_rows"][0].startswith("row 0: loras: element 0: ") and len(report["invalid_rows"]) == 2
    assert sorted(metadata(out)["prompt"]) == ["good", "none"]
