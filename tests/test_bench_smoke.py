"""bench/gpu_check.sh at its CPU smoke size: the benches a lent GPU machine runs in one go work here first.

The GPU machine is lent rarely and for minutes, so its one prepared command must not die of a
typo or a renamed API: here every bench it runs (bench/gpu.py, bench/lora.py) runs at tiny sizes
through the same script, and writes the figures its JSON promises. Timings are not checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
GPU_VARIANTS = {"ours_dequantize_once", "ours_lora", "ours_on_the_fly", "diffusers_gguf", "diffusers_gguf_pipeline",
                "diffusers_dense"}


def run_script(out: Path, python: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": python}
    env.pop("SMOKE_EXPERTS", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_smoke_runs_every_bench_and_writes_the_promised_figures(tmp_path):
    proc = run_script(tmp_path, sys.executable, "--smoke")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "== gpu: ok" in summary and "== lora: ok" in summary and "== all: ok" in summary

    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["smoke"] is True and gpu["device"] == "cpu"
    assert set(gpu["steps"]) == GPU_VARIANTS
    for key, row in gpu["steps"].items():
        assert "error" not in row, (key, row)
        assert row["s"] > 0 and len(row["samples_s"]) == gpu["repeat"] and row["label"]
    # The same file read by both implementations computes the same thing (float32 here).
    assert gpu["steps"]["diffusers_dense"]["max_rel_difference"] < 1e-3
    assert gpu["steps"]["diffusers_gguf"]["max_rel_difference"] < 1e-2
    assert gpu["steps"]["ours_lora"]["max_rel_difference"] is None  # a LoRA changes the output: not compared
    assert gpu["ratio_vs_ours"]["ours_dequantize_once"] == 1.0
    assert set(gpu["mfu"]) == GPU_VARIANTS and gpu["peak_tflops"] > 0 and gpu["step_tflop"] > 0
    video = gpu["video"]
    for render in (video["cold"], video["warm"]):  # guidance 1.0: one forward of one row per step
        assert (render["forwards"], render["rows"]) == (4, 4)
        assert render["frames"] == [5, 64, 64, 3]
        assert set(render["timings"]) >= {"text_s", "lora_s", "denoise_s", "decode_s"}
    assert video["estimate_50_steps_cfg_s"] > 0

    lora = json.loads((tmp_path / "lora.json").read_text())
    assert {(r["policy"], r["loras"], r["rank"]) for r in lora["steps"]} == {
        (policy, n, rank) for policy in ("dequantize_once", "on_the_fly") for n, rank in ((0, None), (1, 32))}
    assert all(r["ms"] > 0 and r["cpu_ms"] > 0 for r in lora["steps"])
    assert set(lora["one_rank32_lora_overhead_pct"]) == {"dequantize_once", "on_the_fly"}
    inside = [r for r in lora["steps"] if "side_path_ms" in r]  # one rank-32 LoRA's side paths, per policy
    assert [(r["policy"], r["loras"], r["rank"]) for r in inside] == [("dequantize_once", 1, 32), ("on_the_fly", 1, 32)]
    assert all(0 < r["side_path_ms"] < r["ms"] for r in inside)
    merge = lora["merge"]
    assert merge["rank"] == 32 and merge["layers"] == 2 * 10  # 2 blocks x 10 linear layers
    for policy in ("dequantize_once", "on_the_fly"):
        assert merge[policy]["switch_s"] > 0 and merge[policy]["extra_device_bytes"] > merge["side_path_device_bytes"]
    recipes = lora["per_video"]["recipes"]
    assert (recipes["full"]["forwards"], recipes["full"]["rows"]) == (6, 12)  # --smoke: 6 CFG steps
    assert (recipes["distilled"]["forwards"], recipes["distilled"]["rows"]) == (4, 4)
    assert recipes["distilled"]["params"]["guidance"] == 1.0


def test_a_failing_bench_fails_the_run_and_says_which(tmp_path):
    # A "python" that fails at once: every stage fails, the script goes on to the next and exits 1.
    proc = run_script(tmp_path, "false", "--smoke")
    assert proc.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "== gpu: FAILED (exit 1)" in summary and "== lora: FAILED (exit 1)" in summary
    assert "== all: FAILED" in summary


def test_quantize_bench_smoke_writes_a_figure_per_type(tmp_path):
    # bench/quantize.py runs on the CPU (no GPU stage): its own smoke run, tiny tensors, seconds.
    out = tmp_path / "quantize.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quantize.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["baseline"] == "F16"
    types = report["types"]
    assert set(types) == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                          "Q6_K", "IQ4_NL", "IQ4_XS"}
    assert types["F16"]["ratio_vs_baseline"] == 1.0 and all(t["mb_per_s"] > 0 for t in types.values())
    errors = [types[t]["rel_rms_error"] for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")]
    assert errors == sorted(errors, reverse=True)


def test_the_cuda_tests_collect_without_ray(tmp_path):
    """The GPU machine has no ray: gpu_check.sh picks the CUDA tests of files that import neither ray nor
    pipeline, and they must also not import them through a helper (tests/run_helpers once did)."""
    listing = subprocess.run(["bash", "-c", f'source <(sed -n "/^cuda_tests()/,/^}}/p" {SCRIPT}); cuda_tests'],
                             cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(listing) >= 6 and all("::" in test for test in listing)
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("no ray on the GPU machine")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *listing],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert f"{len(listing)} tests collected" in proc.stdout
    # the fake ray does stop an import of it: a test file that needs ray fails to collect
    needs_ray = tmp_path / "test_needs_ray.py"
    needs_ray.write_text("import ray\n\n\ndef test_nothing():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           str(needs_ray)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "no ray on the GPU machine" in proc.stdout


def test_toy_training_bench_times_both_precisions(tmp_path):
    # bench/toy_training.py: a tiny batch and one timed step of each variant, seconds.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "toy_training.py"), "--batch", "4", "--steps", "1",
                           "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [line.split() for line in proc.stdout.splitlines() if "s/step" in line]
    assert [line[0] for line in lines] == ["float32", "bf16-two-forwards", "bfloat16"]
    assert lines[0][3] == "x1.00" and all(float(line[1]) > 0 for line in lines)
