"""Benchmark: what LoRAs cost per denoising step, the merge design they replace, and the distilled recipe.

    .venv/bin/python bench/lora.py [--device cuda] [--tokens N] [--layers 2] [--ranks 32,64] [--counts 1,2,4]
                                   [--repeat 3] [--threads 1] [--out FILE] [--smoke]

(a) Per step. One step is one DiT forward of the CFG pair (batch 2) at
    Wan2.1-1.3B width (dim 1536, ffn 8960, 12 heads, text_dim 4096) with
    `--layers` blocks, Q8_0 block weights written by `write_dit_gguf` from
    random weights, `--tokens` video tokens (default 32,760 on a GPU: 832x480x81
    -> a 21x30x52 patch grid; 390 on the CPU: one latent frame of 240x416) and a
    512-token context. Each weight policy is timed with no LoRA and with 1, 2, 4
    LoRAs of each rank, installed by `engine.lora.applied` (a side path beside
    each linear layer: q, k, v, o of both attentions, ffn.0, ffn.2 of every block,
    ComfyUI-layout files). Configurations are interleaved round by round, so a
    busy moment of a shared machine hurts all alike; best of `--repeat`. On the
    CPU the process's CPU time is shown beside the wall clock and judged by (one
    torch thread by default: on a shared 2-core machine that measures the work
    rather than the scheduler). The side paths of one LoRA of the smallest rank
    are also timed inside a step, by hooks around them: a figure that the swings
    of the base layers' time do not blur (the break-even of (b) uses it). The
    LoRA cost grows with the tokens like the linear layers, the attention
    faster, and the text embedding is a fixed cost: the relative overhead at
    390 tokens is not the one at 32,760.

(b) The alternative design: merge W + s * up @ down into the weights for the job
    and restore them after. Timed per LoRA switch (merge + restore) for one LoRA
    of the smallest rank under both policies, with the memory each design holds
    beyond the model: the merge keeps a copy of every targeted weight to restore
    from (dequantize_once) or dense merged weights beside the quantized blocks
    (on_the_fly); the side path holds the factors. Restoring by subtracting the
    delta instead of copying is not exact; the share of weights it gets wrong is
    shown. Break-even: the steps per job at which the side path's per-step cost
    equals one merge + restore.

(c) Per video: DiT forwards and wall time of the 4-step distilled recipe
    (guidance 1.0: one forward of one row per step; `step_list` 0,250,500,750 and
    the "lcm" sampler where the engine has them, else 4 Euler steps) with a
    rank-32 distill LoRA applied, against 50 UniPC steps at guidance 5, through
    `Engine.render` on the embedded tiny model set (`make_tiny_model`), forwards
    counted by a hook on the DiT. The wall time includes text encoding (cached
    after the warm-up render), applying the LoRA, denoising and the VAE decode.

Not a test: timings depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.lora import LoraFile, applied, read_lora  # noqa: E402
from engine.tiny import random_state_dict  # noqa: E402
from engine.wan.convert.dit import write_dit_gguf  # noqa: E402
from engine.wan.dit import HEAD_COUNT_KEY, WanConfig, WanModel, load_dit  # noqa: E402

WAN_1_3B_WIDTH = dict(dim=1536, ffn_dim=8960, num_heads=12, in_dim=16, out_dim=16, text_dim=4096)
SMOKE_WIDTH = dict(dim=256, ffn_dim=512, num_heads=2, in_dim=16, out_dim=16, text_dim=512)
FULL_TOKENS = 21 * 30 * 52  # 832x480, 81 frames: latent 21x60x104, patches 1x2x2
CPU_TOKENS = 15 * 26  # one latent frame of 240x416
TEXT_TOKENS = 23  # real prompt tokens; the rest of the 512 are zeros, as Engine.embed returns
# Every linear layer of a block, as LoRA trainers for Wan target them.
LORA_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
DISTILL_STEP_LIST = (0, 250, 500, 750)  # LightX2V's 4-step list


# --- shared with bench/gpu.py ----------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Wall seconds of one call, the device's queue drained before and after."""
    return timed_both(fn, sync)[0]


def timed_both(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, the device's queue drained before and after.
    On a shared CPU the wall clock swings with other people's work, the process's CPU time much less."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def token_grid(tokens: int) -> tuple[int, int, int]:
    """A patch grid (frames, rows, columns) of `tokens` tokens: whole 30x52 frames (832x480) when
    the count allows, else one frame as square as the count's divisors allow."""
    if tokens % (30 * 52) == 0:
        return tokens // (30 * 52), 30, 52
    rows = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return 1, rows, tokens // rows


def step_inputs(cfg: WanConfig, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, context) of one step: one latent for the cond and uncond rows, a 512-token context."""
    gen = torch.Generator().manual_seed(1)
    pt, ph, pw = cfg.patch_size
    f, h, w = grid
    x = torch.randn(1, cfg.in_dim, f * pt, h * ph, w * pw, generator=gen).expand(batch, -1, -1, -1, -1)
    context = torch.zeros(batch, cfg.text_len, cfg.text_dim)
    context[:, :TEXT_TOKENS] = torch.randn(batch, TEXT_TOKENS, cfg.text_dim, generator=gen)
    t = torch.full((batch,), 900.0)
    return x.contiguous().to(device), t.to(device), context.to(device, dtype)


def write_dit(cfg: WanConfig, path: Path, device: torch.device | str = "cpu", seed: int = 0) -> None:
    """A Q8_0 DiT GGUF of `cfg` from seeded random weights (drawn on `device`: a GPU draws 1.4G
    values in no time, the CPU at ~30M/s; the file is quantized on the CPU either way)."""
    with torch.device("meta"):
        meta = WanModel(cfg)
    with torch.device(device):
        state = random_state_dict(meta, torch.Generator(device).manual_seed(seed))
    write_dit_gguf(state, path, quant="Q8_0", metadata={HEAD_COUNT_KEY: cfg.num_heads})


def lora_shapes(cfg: WanConfig) -> dict[str, tuple[int, int]]:
    """Target -> (in, out) of every linear layer a LoRA for `cfg` adapts."""
    d, f = cfg.dim, cfg.ffn_dim
    sizes = {"ffn.0": (d, f), "ffn.2": (f, d)}
    return {f"blocks.{i}.{layer}": sizes.get(layer, (d, d)) for i in range(cfg.num_layers) for layer in LORA_LAYERS}


def write_lora(cfg: WanConfig, rank: int, path: Path, seed: int) -> Path:
    """A ComfyUI-layout LoRA (`diffusion_model.<target>.lora_down/lora_up.weight`, `.alpha`) of
    `rank` for every block linear of `cfg`, bfloat16 as published ones are, alpha = rank."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for target, (fan_in, fan_out) in lora_shapes(cfg).items():
        key = f"diffusion_model.{target}"
        tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)).bfloat16()
        tensors[f"{key}.lora_up.weight"] = (0.02 * torch.randn(fan_out, rank, generator=gen) / math.sqrt(rank)).bfloat16()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


def factor_elements(lora: LoraFile) -> int:
    return sum(t.down.numel() + t.up.numel() for t in lora.targets.values() if t.down is not None)


# --- (a) per step ----------------------------------------------------------------------


def side_path_seconds(model: torch.nn.Module, loras: list[LoraFile], step: Callable[[], None],
                      sync: Callable[[], None], clock: Callable[[], float]) -> float:
    """Seconds one step spends in the LoRAs' side paths alone: around each adapted layer, a hook placed
    before the side path's and one after it read `clock` (the device drained first). The base
    layers' own time, and its swings on a shared machine, stay out of the figure."""
    started: dict[torch.nn.Module, float] = {}
    total = [0.0]

    def before(module, args, output) -> None:
        sync()
        started[module] = clock()

    def after(module, args, output) -> None:
        sync()
        total[0] += clock() - started.pop(module)

    with applied(model, [(lora, 1.0) for lora in loras]):
        names = {name for lora in loras for name in lora.targets}
        handles = []
        for name in names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(before, prepend=True))
            handles.append(module.register_forward_hook(after))
        try:
            step()
        finally:
            for handle in handles:
                handle.remove()
    return total[0]


def bench_steps(path: Path, cfg: WanConfig, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                policies: Sequence[str], loras: dict[int, list[LoraFile]], counts: Sequence[int],
                repeat: int) -> list[dict]:
    sync = synchronizer(device)
    x, t, context = step_inputs(cfg, grid, device, dtype)
    configs = [(0, 0)] + [(n, rank) for rank in loras for n in counts]
    rows = []
    for policy in policies:
        model = load_dit(path, device=device, dtype=dtype, policy=policy)
        samples: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in configs}

        def step() -> None:
            with torch.inference_mode():
                model(x, t, context)

        timed(step, sync)  # first-call costs (allocator, kernel choice, the RoPE table)
        for _ in range(repeat):
            for n, rank in configs:
                with applied(model, [(lora, 1.0) for lora in loras[rank][:n]] if n else []):
                    if device.type != "cpu":
                        # A job's first step copies the factors to the device (once per job);
                        # the per-step figure is the steady state.
                        timed(step, sync)
                    samples[(n, rank)].append(timed_both(step, sync))
        # One LoRA of the smallest rank, its side paths timed inside the step (the clock of the table:
        # CPU time on the CPU), best of two.
        clock = time.process_time if device.type == "cpu" else time.perf_counter
        target = loras[min(loras)][:1]
        inside = min(side_path_seconds(model, target, step, sync, clock) for _ in range(2))
        base_wall = min(w for w, _ in samples[(0, 0)])
        base_cpu = min(c for _, c in samples[(0, 0)])
        for n, rank in configs:
            wall = min(w for w, _ in samples[(n, rank)])
            cpu = min(c for _, c in samples[(n, rank)])
            row = {"policy": policy, "loras": n, "rank": rank or None, "ms": wall * 1e3, "ratio": wall / base_wall,
                   "cpu_ms": cpu * 1e3, "cpu_ratio": cpu / base_cpu,
                   "samples_ms": [w * 1e3 for w, _ in samples[(n, rank)]],
                   "cpu_samples_ms": [c * 1e3 for _, c in samples[(n, rank)]]}
            if (n, rank) == (1, min(loras)):
                row["side_path_ms"] = inside * 1e3
                row["side_path_pct"] = 100 * inside / (base_cpu if device.type == "cpu" else base_wall)
            rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_steps(rows: list[dict], repeat: int, on_cpu: bool) -> dict[str, float]:
    """The table, and the target line: the wall-clock ratio on a GPU, the CPU-time ratio on the CPU."""
    cpu_head = f" {'CPU ms':>10s} {'vs none':>8s}" if on_cpu else ""
    print(f"    {'policy':16s} {'LoRAs':>5s} {'rank':>5s} {'ms/step':>10s} {'vs none':>8s}{cpu_head}   "
          f"(best of {repeat}, interleaved)")

    def pct(r: dict, key: str) -> str:
        return "1.000" if r["loras"] == 0 else f"{100 * (r[key] - 1):+.1f}%"

    for r in rows:
        cpu = f" {r['cpu_ms']:10.1f} {pct(r, 'cpu_ratio'):>8s}" if on_cpu else ""
        print(f"    {r['policy']:16s} {r['loras']:5d} {r['rank'] or '-':>5} {r['ms']:10.1f} {pct(r, 'ratio'):>8s}{cpu}")
    key, basis = ("cpu_ratio", "CPU time") if on_cpu else ("ratio", "wall clock")
    target = {}
    for r in rows:
        if r["loras"] == 1 and r["rank"] == 32:
            target[r["policy"]] = 100 * (r[key] - 1)
            print(f"    {r['policy']}: one rank-32 LoRA: {target[r['policy']]:+.1f}% (target < 5%; {basis})")
    for r in rows:
        if "side_path_ms" in r:
            print(f"    {r['policy']}: the side paths of one rank-{r['rank']} LoRA timed inside the step: "
                  f"{r['side_path_ms']:.1f} ms = +{r['side_path_pct']:.1f}% of the step without it")
    return target


# --- (b) the merge design --------------------------------------------------------------


def bench_merge(path: Path, lora: LoraFile, device: torch.device, dtype: torch.dtype, repeat: int,
                policies: Sequence[str]) -> dict:
    """Merge one LoRA into the targeted weights and restore them, per policy: seconds and bytes."""
    sync = synchronizer(device)
    out: dict = {"rank": next(iter(lora.targets.values())).rank, "layers": len(lora.targets)}
    factors = factor_elements(lora)
    out["side_path_device_bytes"] = factors * dtype.itemsize  # the factors as the layers compute with them
    out["side_path_host_bytes"] = factors * 4  # the float32 masters (LoraCache keeps the file's tensors too)
    for policy in policies:
        model = load_dit(path, device=device, dtype=dtype, policy=policy)
        layers = [(model.get_submodule(name), part) for name, part in lora.targets.items()]

        def delta(part) -> torch.Tensor:
            up, down = part.up.to(device, torch.float32), part.down.to(device, torch.float32)
            return (up @ down).mul_(part.scale)

        if policy == "dequantize_once":
            saved: list[torch.Tensor] = []

            def merge() -> None:
                saved.clear()
                with torch.no_grad():
                    for layer, part in layers:
                        saved.append(layer.weight.detach().clone())  # what the restore copies back
                        layer.weight.copy_(layer.weight.float() + delta(part))

            def restore() -> None:
                with torch.no_grad():
                    for (layer, _), original in zip(layers, saved):
                        layer.weight.copy_(original)
                saved.clear()

            merge_s, restore_s = [], []
            for _ in range(repeat):
                merge_s.append(timed(merge, sync))
                restore_s.append(timed(restore, sync))
            extra = sum(layer.weight.numel() for layer, _ in layers) * dtype.itemsize
            # Restoring by subtracting the same delta needs no copy, but rounding leaves weights changed.
            wrong = total = 0
            with torch.no_grad():
                for layer, part in layers:
                    original = layer.weight.detach().clone()
                    d = delta(part)
                    merged = (original.float() + d).to(dtype)
                    back = (merged.float() - d).to(dtype)
                    wrong += int((back != original).sum())
                    total += original.numel()
            out[policy] = {"merge_s": min(merge_s), "restore_s": min(restore_s),
                           "switch_s": min(merge_s) + min(restore_s), "extra_device_bytes": extra,
                           "subtract_restore_wrong_fraction": wrong / total}
        else:
            dense: list[torch.Tensor] = []

            def merge() -> None:
                # A quantized layer cannot take the delta without being re-quantized (which would
                # change the model), so the merge is a dense weight per layer for the job.
                dense.clear()
                with torch.no_grad():
                    for layer, part in layers:
                        w = layer.dequantized_weight(torch.float32, device)
                        dense.append(w.add_(delta(part)).to(dtype))

            def restore() -> None:
                dense.clear()

            merge_s, restore_s = [], []
            for _ in range(repeat):
                merge_s.append(timed(merge, sync))
                restore_s.append(timed(restore, sync))
            extra = sum(layer.in_features * layer.out_features for layer, _ in layers) * dtype.itemsize
            out[policy] = {"merge_s": min(merge_s), "restore_s": min(restore_s),
                           "switch_s": min(merge_s) + min(restore_s), "extra_device_bytes": extra}
        del model, layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def print_merge(merge: dict, steps: list[dict], layers: int, on_cpu: bool, full_layers: int = 30) -> None:
    mib = 2**20
    scale = full_layers / layers
    rank = merge["rank"]
    print(f"    one rank-{rank} LoRA on {merge['layers']} layers ({layers} blocks); memory beyond the model, "
          f"and x{scale:g} for the {full_layers}-block 1.3B:")
    side = merge["side_path_device_bytes"]
    print(f"    side path: factors {side / mib:.1f} MiB on the device (x{scale:g}: {side * scale / mib:.0f} MiB), "
          f"float32 masters {merge['side_path_host_bytes'] / mib:.1f} MiB on the host; no switch cost")
    for policy in ("dequantize_once", "on_the_fly"):
        if policy not in merge:
            continue
        m = merge[policy]
        step = next((r for r in steps if r["policy"] == policy and r["loras"] == 1 and r["rank"] == rank), None)
        line = (f"    merge ({policy}): merge {m['merge_s'] * 1e3:.1f} ms + restore {m['restore_s'] * 1e3:.1f} ms per "
                f"switch, {m['extra_device_bytes'] / mib:.0f} MiB extra (x{scale:g}: "
                f"{m['extra_device_bytes'] * scale / mib:.0f} MiB)")
        if "subtract_restore_wrong_fraction" in m:
            line += f"; restoring by subtraction leaves {100 * m['subtract_restore_wrong_fraction']:.1f}% of weights changed"
        print(line)
        if step is not None:
            base = next(r for r in steps if r["policy"] == policy and r["loras"] == 0)
            # The side paths timed inside the step: the difference of two whole steps swings more.
            overhead_ms = step.get("side_path_ms", step["cpu_ms" if on_cpu else "ms"] - base["cpu_ms" if on_cpu else "ms"])
            if overhead_ms > 0:
                print(f"      side path +{overhead_ms:.1f} ms/step here: break-even at "
                      f"{m['switch_s'] * 1e3 / overhead_ms:.1f} steps per job (a 4-step job costs "
                      f"{4 * overhead_ms:.0f} ms, a 50-step job {50 * overhead_ms:.0f} ms, vs {m['switch_s'] * 1e3:.0f} ms "
                      f"per switch)")
            else:
                print(f"      side path: no measurable per-step cost here ({overhead_ms:+.1f} ms)")


# --- (c) per video ---------------------------------------------------------------------


def bench_recipes(root: Path, device: torch.device, dtype: torch.dtype, policy: str, repeat: int,
                  long_steps: int = 50, warm_up: bool = True) -> dict:
    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.tiny import make_tiny_model

    make_tiny_model(root / "tiny")
    engine = Engine(ModelSet.from_dir(root / "tiny"), device=device, dtype=dtype, policy=policy,
                    cpu_threads=torch.get_num_threads())
    dit = engine.pipeline.dit
    distill = write_lora(dit.config, 32, root / "distill-rank32.safetensors", seed=7)
    spec = engine.spec
    if "step_list" in spec.param_names:
        distilled = spec.params(step_list=DISTILL_STEP_LIST, guidance=1.0, sampler="lcm", shift=5.0)
        name = "distilled: 4 steps (step_list 0,250,500,750, lcm), guidance 1, rank-32 LoRA"
    else:
        distilled = spec.params(steps=4, guidance=1.0, sampler="euler")
        name = "distilled: 4 steps (euler), guidance 1, rank-32 LoRA"
    recipes = {
        "full": (f"{long_steps} steps (unipc), guidance 5",
                 spec.params(steps=long_steps, guidance=5.0, sampler="unipc"), {}),
        "distilled": (name, distilled, {"loras": [f"{distill}:1.0"]}),
    }
    rows: list[int] = []
    hook = dit.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    results = {}
    try:
        for key, (label, params, inputs) in recipes.items():
            if warm_up:  # first-call costs; caches the text embeddings
                engine.render("a red fox in snow", 0, params, inputs=inputs)
            walls, timings = [], []
            for seed in range(repeat):
                rows.clear()
                start = time.perf_counter()
                result = engine.render("a red fox in snow", seed, params, inputs=inputs)
                walls.append(time.perf_counter() - start)
                timings.append(result.timings)
            best = min(range(repeat), key=walls.__getitem__)
            results[key] = {"label": label, "forwards": len(rows), "rows": sum(rows), "wall_s": walls[best],
                              "timings": timings[best], "params": dict(params.model_dump())}
    finally:
        hook.remove()
    p = distilled
    return {"size": f"{p.width}x{p.height}x{p.frames}", "dit": f"dim {dit.config.dim}, {dit.config.num_layers} layers",
            "recipes": results}


def print_recipes(rec: dict) -> None:
    print(f"    tiny model set ({rec['dit']}), {rec['size']}, wall time best of the timed renders")
    print(f"    {'recipe':76s} {'forwards':>8s} {'rows':>5s} {'wall s':>7s} {'denoise s':>9s} {'decode s':>8s}")
    for r in rec["recipes"].values():
        print(f"    {r['label']:76s} {r['forwards']:8d} {r['rows']:5d} {r['wall_s']:7.3f} "
              f"{r['timings']['denoise_s']:9.3f} {r['timings']['decode_s']:8.3f}")
    full, fast = rec["recipes"]["full"], rec["recipes"]["distilled"]
    print(f"    distilled / {full['label'].split(' ')[0]}-step: forwards x{fast['forwards'] / full['forwards']:.3f}, "
          f"DiT rows x{fast['rows'] / full['rows']:.3f}, wall x{fast['wall_s'] / full['wall_s']:.3f}, "
          f"denoise x{fast['timings']['denoise_s'] / full['timings']['denoise_s']:.3f}")


# --- main ------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"video tokens per sample (default {FULL_TOKENS} on a GPU, {CPU_TOKENS} on the CPU)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", default="32,64")
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default 5 on a GPU, 3 on the CPU)")
    parser.add_argument("--policies", default="dequantize_once,on_the_fly")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-recipes", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on the CPU (default 1: on a shared machine one thread measures "
                             "the work rather than the scheduler, and here ran faster than two)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that the bench runs, in seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    width = SMOKE_WIDTH if args.smoke else WAN_1_3B_WIDTH
    tokens = args.tokens or (32 if args.smoke else FULL_TOKENS if device.type == "cuda" else CPU_TOKENS)
    repeat = args.repeat or (1 if args.smoke else 5 if device.type == "cuda" else 3)
    counts = [1] if args.smoke else ints(args.counts)
    ranks = [32] if args.smoke else ints(args.ranks)
    policies = args.policies.split(",")
    cfg = WanConfig(num_layers=args.layers, **width)
    grid = token_grid(tokens)
    report: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke,
                    "config": {k: getattr(cfg, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim")},
                    "tokens": tokens, "grid": list(grid), "batch": 2, "repeat": repeat,
                    "torch_threads": torch.get_num_threads()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}), {report['dtype']}; DiT dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads, "
          f"{cfg.num_layers} blocks, Q8_0; {tokens} tokens ({'x'.join(map(str, grid))}) x batch 2, 512 context tokens")

    def save() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1, sort_keys=True))

    with tempfile.TemporaryDirectory(prefix="reelray-lora-bench-") as tmp:
        tmp = Path(tmp)
        path = tmp / "dit-Q8_0.gguf"
        start = time.perf_counter()
        write_dit(cfg, path, device if device.type == "cuda" else "cpu")
        lora_files = {rank: [write_lora(cfg, rank, tmp / f"r{rank}-{k}.safetensors", seed=100 * rank + k)
                             for k in range(max(counts))] for rank in ranks}
        loras = {rank: [read_lora(p) for p in paths] for rank, paths in lora_files.items()}
        print(f"    wrote the DiT ({path.stat().st_size / 2**20:.0f} MiB) and {sum(map(len, loras.values()))} LoRAs "
              f"in {time.perf_counter() - start:.1f} s")
        steps: list[dict] = []
        if not args.skip_steps:
            print(f"(a) one step (CFG pair, batch 2) with 0 / {counts} LoRAs of rank {ranks}")
            steps = bench_steps(path, cfg, grid, device, dtype, policies, loras, counts, repeat)
            report["steps"] = steps
            report["one_rank32_lora_overhead_pct"] = print_steps(steps, repeat, device.type == "cpu")
            save()
        if not args.skip_merge:
            print("(b) the alternative: merge the LoRA into the weights per job, restore after")
            report["merge"] = bench_merge(path, loras[min(ranks)][0], device, dtype, max(repeat, 2), policies)
            print_merge(report["merge"], steps, cfg.num_layers, device.type == "cpu")
            save()
        if not args.skip_recipes:
            print(f"(c) per video: the 4-step distilled recipe against {6 if args.smoke else 50} steps at guidance 5")
            report["per_video"] = bench_recipes(tmp, device, dtype, "dequantize_once", 1 if device.type == "cpu" else 3,
                                                long_steps=6 if args.smoke else 50, warm_up=not args.smoke)
            print_recipes(report["per_video"])
            save()
    save()


if __name__ == "__main__":
    main()
