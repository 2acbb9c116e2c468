"""Benchmark: our Wan DiT against diffusers' WanTransformer3DModel on the CPU.

    .venv/bin/python bench/engine.py [--layers 2] [--repeat 3] [--latent 5x30x52]
                                     [--load-layers 12] [--threads N] [--skip-step] [--skip-load]

(a) Denoising step. One step of the sampler is a DiT forward for the
    conditional and the unconditional text: our engine runs them as one batch
    of 2 (the Wan2.1 T2V loop, `engine/families/wan21_t2v.py`), diffusers' WanPipeline as two batch-1
    forwards. Both models hold the same random float32 weights of Wan2.1-1.3B
    width (dim 1536, 12 heads, ffn 8960, text_dim 4096) with `--layers` blocks,
    diffusers' through its own original-to-diffusers converter; the latent
    `--latent` FxHxW (default 5x30x52: 1950 tokens) with a 512-token context.
    Best of `--repeat` wall-clock runs each, interleaved; diffusers' batch-of-2
    forward is timed as well, so the comparison does not hinge on batching.
    The outputs are compared once, so that both sides compute the same thing.

(b) Loading a GGUF DiT. A Q8_0 file of the same width with `--load-layers`
    blocks (>= 500 MB) is written once to a temporary directory; each loader
    then runs in a fresh subprocess: our `load_dit` under both weight policies
    and `WanTransformer3DModel.from_single_file(..., GGUFQuantizationConfig(
    compute_dtype=float32))`. The child resets its peak-RSS mark after its
    imports (`/proc/self/clear_refs`), loads, reads VmHWM, then runs one small
    forward (which touches every weight: memory-mapped pages count only once
    read) and reads VmHWM again. Peaks are MiB of resident memory above the
    child's RSS after imports. Resident memory counts the pages of a memory-
    mapped file once read; those are page cache (shared by every process that
    maps the file, e.g. render actors on one node, and dropped under memory
    pressure), so the growth of anonymous memory (RssAnon, what the process
    owns) after the forward is shown as well.

Not a test: timings depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.tiny import random_state_dict  # noqa: E402
from engine.wan.convert.dit import write_dit_gguf  # noqa: E402
from engine.wan.dit import WanConfig, WanModel, load_dit  # noqa: E402

WAN_1_3B_WIDTH = dict(dim=1536, ffn_dim=8960, num_heads=12, in_dim=16, out_dim=16, text_dim=4096)
TEXT_TOKENS = 23  # real prompt tokens; the rest of the 512 are zeros, as Engine.embed returns


def diffusers_kwargs(cfg: WanConfig) -> dict:
    return dict(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
    )


def random_weights(cfg: WanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        meta = WanModel(cfg)
    return random_state_dict(meta, torch.Generator().manual_seed(seed))


def step_inputs(cfg: WanConfig, latent: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *latent, generator=gen).expand(2, -1, -1, -1, -1).contiguous()
    t = torch.tensor([999.0, 999.0])
    context = torch.zeros(2, cfg.text_len, cfg.text_dim)
    context[:, :TEXT_TOKENS] = torch.randn(2, TEXT_TOKENS, cfg.text_dim, generator=gen)
    return x, t, context


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_step(layers: int, latent: tuple[int, int, int], repeat: int) -> None:
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = WanConfig(num_layers=layers, **WAN_1_3B_WIDTH)
    state = random_weights(cfg)
    with torch.device("meta"):
        ours = WanModel(cfg)
    ours.load_state_dict(state, assign=True)
    ours = ours.eval().requires_grad_(False)
    theirs = WanTransformer3DModel(**diffusers_kwargs(cfg))
    theirs.load_state_dict(convert_wan_transformer_to_diffusers({k: v.clone() for k, v in state.items()}), strict=True)
    theirs = theirs.eval().requires_grad_(False)
    del state

    x, t, context = step_inputs(cfg, latent)
    f, h, w = latent
    tokens = f * (h // 2) * (w // 2)
    print(f"(a) one denoising step (cond + uncond), float32, {torch.get_num_threads()} torch threads")
    print(f"    dim {cfg.dim}, heads {cfg.num_heads}, ffn {cfg.ffn_dim}, {layers} layers, text_dim {cfg.text_dim}; "
          f"latent {cfg.in_dim}x{f}x{h}x{w} = {tokens} tokens, context {cfg.text_len} tokens")

    def run_ours():
        return ours(x, t, context)

    def run_theirs_pair():
        cond = theirs(x[:1], t[:1], context[:1], return_dict=False)[0]
        uncond = theirs(x[1:], t[1:], context[1:], return_dict=False)[0]
        return torch.cat([cond, uncond])

    def run_theirs_batch():
        return theirs(x, t, context, return_dict=False)[0]

    with torch.inference_mode():
        a, b = run_ours(), run_theirs_pair()  # warm-up, and the check that both compute the same
        print(f"    max |ours - diffusers| = {(a - b).abs().max().item():.2e} (outputs up to {b.abs().max().item():.2f})")
        del a, b
        runs = {"ours (batch 2)": run_ours, "diffusers (2 x batch 1)": run_theirs_pair,
                "diffusers (batch 2)": run_theirs_batch}
        wall = {name: float("inf") for name in runs}
        cpu = {name: float("inf") for name in runs}
        for _ in range(repeat):  # interleaved, so a busy moment hurts every side alike
            for name, fn in runs.items():
                w, c = timed(fn)
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    # On a shared machine the wall clock swings with other people's work; the process's
    # CPU time swings much less, so both are shown.
    print(f"    {'':24s} {'wall s':>7s} {'CPU s':>7s}   (best of {repeat})")
    for name in runs:
        print(f"    {name:24s} {wall[name]:7.2f} {cpu[name]:7.2f}")
    for label, best in (("wall", wall), ("CPU", cpu)):
        ours_s = best["ours (batch 2)"]
        print(f"    {label:4s} ratio: diffusers pipeline / ours = {best['diffusers (2 x batch 1)'] / ours_s:.2f}, "
              f"diffusers batch 2 / ours = {best['diffusers (batch 2)'] / ours_s:.2f}   (> 1: ours is faster)")


# --- (b) loading ----------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_load(loader: str, path: str, config_dir: str) -> None:
    """Runs in a fresh process: load `path` with `loader`, print JSON figures on stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    if loader == "diffusers":
        from diffusers import GGUFQuantizationConfig, WanTransformer3DModel
    rss_before, anon_before = _status_kib("VmRSS"), _status_kib("RssAnon")
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak-RSS mark to the current RSS
        fh.write("5")
    t0 = time.perf_counter()
    if loader == "diffusers":
        model = WanTransformer3DModel.from_single_file(
            path, config=config_dir, torch_dtype=torch.float32,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        ).eval()
    else:
        model = load_dit(path, policy=loader)
    load_s = time.perf_counter() - t0
    peak_load = _status_kib("VmHWM")

    # One small forward touches every weight (mmap pages are resident only once read).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=gen)
    t = torch.tensor([500.0])
    # A whole 512-token context (zeros past the prompt) as Engine.embed returns: we pad a shorter
    # one to 512 and attend to the padding (official), diffusers would not.
    context = torch.zeros(1, 512, 4096)
    context[:, :TEXT_TOKENS] = torch.randn(1, TEXT_TOKENS, 4096, generator=gen)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if loader == "diffusers":
            out = model(x, t, context, return_dict=False)[0]
        else:
            out = model(x, t, context)
    forward_s = time.perf_counter() - t0
    print(json.dumps({
        "load_s": load_s, "forward_s": forward_s, "rss_before_mib": rss_before / 1024,
        "peak_load_mib": (peak_load - rss_before) / 1024,
        "peak_forward_mib": (_status_kib("VmHWM") - rss_before) / 1024,
        "rss_end_mib": (_status_kib("VmRSS") - rss_before) / 1024,
        # After the forward: anonymous memory (what the process owns) and file-backed pages
        # (the memory map; shared with the page cache, dropped under memory pressure).
        "anon_growth_mib": (_status_kib("RssAnon") - anon_before) / 1024,
        "rss_file_mib": _status_kib("RssFile") / 1024,
        "checksum": float(out.double().abs().sum()),
    }))


def bench_load(layers: int) -> None:
    from diffusers import WanTransformer3DModel

    cfg = WanConfig(num_layers=layers, **WAN_1_3B_WIDTH)
    with tempfile.TemporaryDirectory(prefix="reelray-bench-") as tmp:
        path = Path(tmp) / f"wan-1.3B-width-{layers}-layers-Q8_0.gguf"
        config_dir = Path(tmp) / "config"
        t0 = time.perf_counter()
        state = random_weights(cfg, seed=2)
        write_dit_gguf(state, path, quant="Q8_0")
        del state
        with torch.device("meta"):
            WanTransformer3DModel(**diffusers_kwargs(cfg)).save_config(config_dir)
        size_mb = path.stat().st_size / 2**20
        print(f"(b) loading a Q8_0 DiT GGUF: dim {cfg.dim}, ffn {cfg.ffn_dim}, {layers} layers, "
              f"{size_mb:.0f} MiB (written in {time.perf_counter() - t0:.0f} s); fresh process per loader")
        print(f"    {'loader':34s} {'load s':>7s} {'peak MiB (load)':>16s} {'peak MiB (+forward)':>20s} "
              f"{'anon MiB (+forward)':>20s} {'RssFile MiB':>12s} {'RSS after imports':>18s}")
        results = {}
        for loader, label in (("dequantize_once", "ours load_dit dequantize_once"),
                              ("on_the_fly", "ours load_dit on_the_fly"),
                              ("diffusers", "diffusers from_single_file (GGUF)")):
            proc = subprocess.run(
                [sys.executable, __file__, "--child-load", loader, str(path), str(config_dir)],
                capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            if proc.returncode != 0:
                print(f"    {label}: failed\n{proc.stderr}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[loader] = r
            print(f"    {label:34s} {r['load_s']:7.2f} {r['peak_load_mib']:16.0f} {r['peak_forward_mib']:20.0f} "
                  f"{r['anon_growth_mib']:20.0f} {r['rss_file_mib']:12.0f} {r['rss_before_mib']:18.0f}")
        if "diffusers" in results:
            ref = results["diffusers"]
            for loader in ("dequantize_once", "on_the_fly"):
                if loader in results:
                    r = results[loader]
                    print(f"    {loader}: peak / diffusers' = {r['peak_load_mib'] / ref['peak_load_mib']:.2f} (load), "
                          f"{r['peak_forward_mib'] / ref['peak_forward_mib']:.2f} (+forward), "
                          f"anonymous memory / diffusers' = {r['anon_growth_mib'] / ref['anon_growth_mib']:.2f}; "
                          f"load time ratio diffusers / ours = {ref['load_s'] / r['load_s']:.2f}")
            sums = {k: v["checksum"] for k, v in results.items()}
            print(f"    forward checksums (same file, same input): {sums}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child-load":
        child_load(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="DiT blocks for the step benchmark")
    parser.add_argument("--latent", default="5x30x52", help="latent frames x height x width for the step benchmark")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--load-layers", type=int, default=12, help="DiT blocks of the file for the load benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    latent = tuple(int(n) for n in args.latent.lower().split("x"))
    if len(latent) != 3:
        parser.error(f"--latent {args.latent}: expected FxHxW, e.g. 5x30x52")
    if not args.skip_step:
        bench_step(args.layers, latent, args.repeat)
    if not args.skip_load:
        bench_load(args.load_layers)


if __name__ == "__main__":
    main()
