"""GPU benchmark: one denoising step of Wan2.1-1.3B at 832x480x81, ours against diffusers, and a distilled video.

    python3 bench/gpu.py [--out FILE] [--repeat 3] [--vae full|tiny] [--skip-diffusers] [--skip-video] [--smoke]

(a) One step is one DiT forward of the CFG pair (batch 2) at Wan2.1-1.3B's
    shape: dim 1536, ffn 8960, 12 heads, 30 blocks, text_dim 4096; 832x480, 81
    frames -> a 21x60x104 latent -> 32,760 tokens per sample; a 512-token
    context. The weights are random, written once as a Q8_0 GGUF by
    `write_dit_gguf` (drawn on the GPU, quantized on the CPU), and every variant
    reads that file:
      ours dequantize_once        load_dit(..., bfloat16): dense bf16 weights
      ours dequantize_once + LoRA the same with one rank-32 LoRA (every block linear), `engine.lora.applied`
      ours on_the_fly             the Q8_0 blocks stay on the GPU, dequantized in each forward
      diffusers GGUF              WanTransformer3DModel.from_single_file(GGUFQuantizationConfig(bf16))
      diffusers GGUF, 2 x batch 1 the same, run as WanPipeline runs CFG: cond and uncond apart
      diffusers dense bf16        WanTransformer3DModel holding the dequantized weights in bf16
    Median of `--repeat` steps after one warm-up each; ratios against ours
    dequantize_once. Model FLOPs per step (2 per multiply-add: the linear
    layers, both attentions, the embeddings and the head; a LoRA's extra work is
    not counted) over the time, against the card's bf16 matmul peak measured in
    the same run (8192^3 products), is the model FLOP utilisation. Each output is
    compared once with ours dequantize_once (max |difference| / max |ours|).

(b) One whole 4-step distilled video: `Engine.render` at 832x480x81 with the
    `step_list` 0,250,500,750, the "lcm" sampler, guidance 1.0 (one forward of
    one row per step) and a rank-32 distill LoRA, on a model set of the same DiT
    file, a 4096-wide one-block umT5 (the real encoder's width, not its depth:
    a prompt is encoded once per job and cached) and the Wan2.1 VAE at its
    published size with random weights (`--vae tiny`: the tiny test VAE, whose
    decode costs nothing like the real one). Rendered twice, the second figure
    is the steady state; text, LoRA, denoise and decode seconds are reported
    apart. The 50-step guidance-5 video is not rendered; its estimate is
    50 x the measured CFG-pair step + the measured decode.

`--smoke` shrinks everything (dim 256, text_dim 512, 2 blocks, 32 tokens, a 64x64x5 video,
the tiny VAE) so that the whole bench runs on the CPU in seconds, in float32.
Not a test: timings depend on the machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers reads a local config; nothing can be fetched there

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.lora import applied, read_lora  # noqa: E402
from engine.wan.dit import WanConfig, load_dit  # noqa: E402


def _bench_module(name: str):
    """A sibling bench script as a module (bench/ is no package: `import engine` must stay ours)."""
    spec = importlib.util.spec_from_file_location(f"reelray_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lora_bench = _bench_module("lora")
timed, synchronizer, step_inputs, write_dit, write_lora, token_grid = (
    lora_bench.timed, lora_bench.synchronizer, lora_bench.step_inputs, lora_bench.write_dit, lora_bench.write_lora,
    lora_bench.token_grid)

WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16, text_dim=4096)
SMOKE = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=512)
VIDEO = dict(width=832, height=480, frames=81)
SMOKE_VIDEO = dict(width=64, height=64, frames=5)
BASELINE = "ours_dequantize_once"


# --- figures ---------------------------------------------------------------------------


def step_flops(cfg: WanConfig, tokens: int, batch: int = 2, context: int = 512) -> float:
    """Model FLOPs (2 per multiply-add) of one DiT forward of `batch` samples of `tokens` tokens."""
    d, f = cfg.dim, cfg.ffn_dim
    patch = math.prod(cfg.patch_size)
    per_token = (4 * d * d  # self-attention q, k, v, o
                 + 2 * d * d  # cross-attention q, o (k, v run over the context)
                 + 2 * d * f  # ffn
                 + 2 * tokens * d  # self-attention: scores and values
                 + 2 * context * d)  # cross-attention: scores and values
    per_sample = cfg.num_layers * (tokens * per_token + 2 * context * d * d)  # + cross k, v over the context
    per_sample += tokens * (cfg.in_dim * patch * d + d * cfg.out_dim * patch)  # patch embedding, head
    per_sample += context * (cfg.text_dim * d + d * d)  # text embedding
    return 2.0 * batch * per_sample


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype`: the mean of `repeat` after 3 warm-ups."""
    sync = synchronizer(device)
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeat)], sync) / repeat
    return 2.0 * n**3 / seconds


def diffusers_kwargs(cfg: WanConfig) -> dict:
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                qk_norm="rms_norm_across_heads", eps=cfg.eps)


def diffusers_gguf(path: Path, config_dir: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    model = WanTransformer3DModel.from_single_file(
        str(path), config=str(config_dir), torch_dtype=dtype,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
    return model.to(device).eval().requires_grad_(False)


def diffusers_dense(path: Path, cfg: WanConfig, device: torch.device, dtype: torch.dtype):
    """diffusers' model holding the file's dequantized weights in `dtype`, its float32 modules
    (`_keep_in_fp32_modules`, as from_pretrained keeps them) in float32."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from engine.gguf import GGUFFile

    with GGUFFile(path) as f:
        state = {name: f.dequantize(name, torch.float32, device) for name in f.tensor_names}
    state = convert_wan_transformer_to_diffusers(state)
    with torch.device(device):
        model = WanTransformer3DModel(**diffusers_kwargs(cfg))
    model.load_state_dict(state, strict=True)
    del state
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if not any(part in name.split(".") for part in keep):
            param.data = param.data.to(dtype)
    return model.eval().requires_grad_(False)


# --- (a) one step ----------------------------------------------------------------------


def bench_steps(path: Path, cfg: WanConfig, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                lora_path: Path, config_dir: Path, repeat: int, with_diffusers: bool, report: dict,
                save: Callable[[], None]) -> None:
    sync = synchronizer(device)
    x, t, context = step_inputs(cfg, grid, device, dtype)
    x_low = x.to(dtype)  # diffusers' patch embedding takes the compute dtype
    tokens = math.prod(grid)
    flops = step_flops(cfg, tokens)
    steps: dict[str, dict] = report.setdefault("steps", {})
    reference: list[torch.Tensor] = []

    def measure(key: str, name: str, fn: Callable[[], torch.Tensor], load_s: float, weights: int,
                compare: bool = True) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode():
                out = fn().float()  # warm-up, and the output to compare
                if not reference:
                    reference.append(out)
                difference = float((out - reference[0]).abs().max() / reference[0].abs().max()) if compare else None
                del out
                samples = [timed(fn, sync) for _ in range(repeat)]
            seconds = statistics.median(samples)
            row = {"label": name, "s": seconds, "samples_s": samples, "load_s": load_s, "max_rel_difference": difference,
                   "tflops": flops / seconds / 1e12}
            if device.type == "cuda":
                row["weights_gib"] = weights / 2**30
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            steps[key] = row
            compared = "the LoRA changes the output" if difference is None else f"max |diff| / max |ours| {difference:.1e}"
            print(f"    {name:38s} {seconds:8.3f} s/step  (load {load_s:5.1f} s, {compared})", flush=True)
        except Exception as exc:  # one broken variant must not cost the others' figures
            steps[key] = {"label": name, "error": f"{type(exc).__name__}: {exc}"}
            print(f"    {name:38s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        save()

    def loaded(load: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, float, int]:
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        model = load()
        sync()
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        return model, time.perf_counter() - start, after - before

    def free() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    model, load_s, weights = loaded(lambda: load_dit(path, device=device, dtype=dtype, policy="dequantize_once"))
    measure(BASELINE, "ours dequantize_once", lambda: model(x, t, context), load_s, weights)
    lora = read_lora(lora_path)
    start = time.perf_counter()
    with applied(model, [(lora, 1.0)]):
        apply_s = time.perf_counter() - start
        measure("ours_lora", "ours dequantize_once + 1 rank-32 LoRA", lambda: model(x, t, context), apply_s, weights,
                compare=False)
    del model
    free()
    model, load_s, weights = loaded(lambda: load_dit(path, device=device, dtype=dtype, policy="on_the_fly"))
    measure("ours_on_the_fly", "ours on_the_fly", lambda: model(x, t, context), load_s, weights)
    del model
    free()
    if not with_diffusers:
        return

    def theirs(model, rows: slice = slice(None)) -> torch.Tensor:
        return model(hidden_states=x_low[rows], timestep=t[rows], encoder_hidden_states=context[rows],
                     return_dict=False)[0]

    try:
        model, load_s, weights = loaded(lambda: diffusers_gguf(path, config_dir, device, dtype))
        measure("diffusers_gguf", "diffusers GGUF", lambda: theirs(model), load_s, weights)
        measure("diffusers_gguf_pipeline", "diffusers GGUF, 2 x batch 1",
                lambda: torch.cat([theirs(model, slice(0, 1)), theirs(model, slice(1, 2))]), load_s, weights)
        del model
    except Exception as exc:
        steps["diffusers_gguf"] = {"label": "diffusers GGUF", "error": f"{type(exc).__name__}: {exc}"}
        print(f"    diffusers GGUF: FAILED to load: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
    free()
    try:
        model, load_s, weights = loaded(lambda: diffusers_dense(path, cfg, device, dtype))
        measure("diffusers_dense", f"diffusers dense {str(dtype).removeprefix('torch.')}", lambda: theirs(model),
                load_s, weights)
        del model
    except Exception as exc:
        steps["diffusers_dense"] = {"label": "diffusers dense", "error": f"{type(exc).__name__}: {exc}"}
        print(f"    diffusers dense: FAILED to load: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
    free()


def print_steps(report: dict) -> None:
    steps, peak = report["steps"], report["peak_tflops"]
    base = steps.get(BASELINE, {}).get("s")
    print(f"    {'':38s} {'s/step':>8s} {'vs ours':>8s} {'TFLOP/s':>8s} {'MFU':>6s}   "
          f"(model {report['step_tflop']:.3g} TFLOP/step; {report['peak_dtype']} matmul peak {peak:.3g} TFLOP/s)")
    ratios, mfu = {}, {}
    for key, row in steps.items():
        if "error" in row:
            print(f"    {row['label']:38s} failed: {row['error']}")
            continue
        ratios[key] = row["s"] / base if base else None
        mfu[key] = row["tflops"] / peak
        ratio = f"x{ratios[key]:.3f}" if base else "-"
        print(f"    {row['label']:38s} {row['s']:8.3f} {ratio:>8s} {row['tflops']:8.2f} {100 * mfu[key]:5.1f}%")
    report["ratio_vs_ours"] = ratios
    report["mfu"] = mfu


# --- (b) a distilled video -------------------------------------------------------------


def bench_video(root: Path, cfg: WanConfig, dit_path: Path, lora_path: Path, device: torch.device,
                dtype: torch.dtype, size: dict, vae: str, step_s: float | None) -> dict:
    import sentencepiece as spm

    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.tiny import random_state_dict
    from engine.wan.convert.t5 import train_tiny_tokenizer, write_umt5_gguf
    from engine.wan.convert.vae import random_vae_state_dict, tiny_vae_state_dict, vae_file_shapes, write_vae_safetensors
    from engine.wan.t5 import UMT5Config, UMT5Encoder
    from engine.wan.vae import WanVAEConfig

    start = time.perf_counter()
    directory = root / "video-model"
    directory.mkdir()
    try:
        os.link(dit_path, directory / dit_path.name)
    except OSError:
        import shutil

        shutil.copyfile(dit_path, directory / dit_path.name)
    proto = train_tiny_tokenizer()
    vocab = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    t5_config = UMT5Config(vocab=vocab, dim=cfg.text_dim, heads=2, head_dim=64, ffn_dim=256, num_layers=1)
    with torch.device("meta"):
        t5 = UMT5Encoder(t5_config)
    write_umt5_gguf(random_state_dict(t5, torch.Generator().manual_seed(3)), proto,
                    directory / "umt5-4096-1-block-Q8_0.gguf", quant="Q8_0")
    state = (random_vae_state_dict(vae_file_shapes(WanVAEConfig()), 4) if vae == "full" else tiny_vae_state_dict(4))
    write_vae_safetensors(state, directory / f"wan_2.1_vae_{vae}.safetensors")
    del state
    setup_s = time.perf_counter() - start

    start = time.perf_counter()
    engine = Engine(ModelSet.from_dir(directory), device=device, dtype=dtype, policy="dequantize_once",
                    cpu_threads=torch.get_num_threads())
    load_s = time.perf_counter() - start
    spec = engine.spec
    if "step_list" in spec.param_names:
        params = spec.params(**size, step_list=(0, 250, 500, 750), guidance=1.0, sampler="lcm", shift=5.0)
        recipe = "4 steps, step_list 0,250,500,750, lcm, guidance 1.0, shift 5, one rank-32 LoRA"
    else:
        params = spec.params(**size, steps=4, guidance=1.0, sampler="euler", shift=5.0)
        recipe = "4 steps, euler, guidance 1.0, shift 5, one rank-32 LoRA"
    rows: list[int] = []
    hook = engine.pipeline.dit.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    renders = []
    try:
        for seed in range(2):  # cold, then the steady state of a render actor
            rows.clear()
            sync = synchronizer(device)
            sync()
            begin = time.perf_counter()
            result = engine.render("a red fox running through fresh snow", seed, params,
                                   inputs={"loras": [f"{lora_path}:1.0"]})
            sync()
            renders.append({"wall_s": time.perf_counter() - begin, "timings": result.timings,
                            "forwards": len(rows), "rows": sum(rows), "frames": list(result.frames.shape)})
    finally:
        hook.remove()
    warm = renders[-1]
    out = {"recipe": recipe, "size": f"{params.width}x{params.height}x{params.frames}", "vae": vae,
           "setup_s": setup_s, "engine_load_s": load_s, "cold": renders[0], "warm": warm,
           "includes": "text encoding (1-block 4096-wide umT5; cached after the first render), LoRA apply, "
                       "DiT denoising, VAE decode, conversion to uint8 frames; not the MP4 encoding"}
    if step_s is not None:
        t = warm["timings"]
        out["estimate_50_steps_cfg_s"] = t["text_s"] + 50 * step_s + t["decode_s"]
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def print_video(video: dict) -> None:
    for which in ("cold", "warm"):
        r = video[which]
        t = r["timings"]
        print(f"    {which}: {r['wall_s']:7.2f} s per video ({r['forwards']} DiT forwards, {r['rows']} rows; text "
              f"{t['text_s']:.2f} s, LoRA {t['lora_s']:.2f} s, denoise {t['denoise_s']:.2f} s, decode "
              f"{t['decode_s']:.2f} s)")
    if "estimate_50_steps_cfg_s" in video:
        est = video["estimate_50_steps_cfg_s"]
        print(f"    50 steps at guidance 5 (estimate: 50 x the CFG-pair step + the same text and decode): {est:.1f} s; "
              f"distilled x{video['warm']['wall_s'] / est:.3f}")


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per variant (default 3; --smoke 1)")
    parser.add_argument("--layers", type=int, default=None, help="DiT blocks (default 30; --smoke 2)")
    parser.add_argument("--vae", choices=("full", "tiny"), default=None,
                        help="VAE of the video model set (default full; --smoke tiny)")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, float32: a check that it runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: bench/gpu.py measures a GPU (use --smoke for the CPU check)")
        sys.exit(2)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    repeat = args.repeat or (1 if args.smoke else 3)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread runs these tiny sizes fastest
    cfg = WanConfig(**(SMOKE if args.smoke else WAN_1_3B) | ({"num_layers": args.layers} if args.layers else {}))
    size = SMOKE_VIDEO if args.smoke else VIDEO
    vae = args.vae or ("tiny" if args.smoke else "full")
    # The step's grid is the video's: frames (4k+1) -> 1 + (frames - 1) / 4 latent frames, 8x smaller, 2x2 patches.
    grid = (1 + (size["frames"] - 1) // 4, size["height"] // 16, size["width"] // 16)
    tokens = math.prod(grid)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report: dict = {"device": str(device), "gpu": name, "dtype": str(dtype).removeprefix("torch."),
                    "smoke": args.smoke, "torch": torch.__version__,
                    "config": {k: getattr(cfg, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim")},
                    "video": None, "tokens": tokens, "grid": list(grid), "batch": 2, "repeat": repeat}

    def save() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1, sort_keys=True))

    peak_dtype = dtype if device.type == "cuda" else torch.float32
    report["peak_dtype"] = str(peak_dtype).removeprefix("torch.")
    report["peak_tflops"] = matmul_peak(device, peak_dtype, 8192 if device.type == "cuda" else 512) / 1e12
    report["step_tflop"] = step_flops(cfg, tokens) / 1e12
    print(f"device {device} ({name}), {report['dtype']}; DiT dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads, "
          f"{cfg.num_layers} blocks, random Q8_0 weights; {size['width']}x{size['height']}x{size['frames']} -> "
          f"{tokens} tokens ({'x'.join(map(str, grid))}) x batch 2 (CFG pair), 512 context tokens")
    failed = False
    with tempfile.TemporaryDirectory(prefix="reelray-gpu-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        path = tmp / "wan2.1-t2v-1.3b-random-Q8_0.gguf"
        write_dit(cfg, path, device)
        lora_path = write_lora(cfg, 32, tmp / "distill-rank32.safetensors", seed=5)
        config_dir = tmp / "diffusers-config"
        if not args.skip_diffusers:
            from diffusers import WanTransformer3DModel

            with torch.device("meta"):
                WanTransformer3DModel(**diffusers_kwargs(cfg)).save_config(config_dir)
        report["setup_s"] = time.perf_counter() - start
        print(f"    wrote the DiT GGUF ({path.stat().st_size / 2**30:.2f} GiB) and a rank-32 LoRA in "
              f"{report['setup_s']:.0f} s")
        print("(a) one denoising step", flush=True)
        bench_steps(path, cfg, grid, device, dtype, lora_path, config_dir, repeat, not args.skip_diffusers,
                    report, save)
        print_steps(report)
        failed |= any("error" in row for row in report["steps"].values())
        save()
        if not args.skip_video:
            print(f"(b) one 4-step distilled video, {vae} VAE", flush=True)
            try:
                report["video"] = bench_video(tmp, cfg, path, lora_path, device, dtype, size, vae,
                                              report["steps"].get(BASELINE, {}).get("s"))
                print_video(report["video"])
            except Exception as exc:
                report["video"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"    FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                failed = True
            save()
    save()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
