"""The `reelray` command.

    reelray inspect FILE [--json]
    reelray make-tiny-model DIR [--quant Q8_0]
    reelray render --model DIR --prompt "..." --seed N --out x.mp4
    reelray run MANIFEST --model DIR --out OUT [--actors N] [--seeds A-B] ...
    reelray status OUT [--manifest M]

Errors a user can cause (a bad file, a bad manifest, a missing model) print
one line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class CLIError(ValueError):
    """A command-line value that does not make sense."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("reelray: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"reelray: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        # "width: must be a multiple of 16, got 100; frames: ..." instead of pydantic's page of text.
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
    text = str(exc) or type(exc).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelray", description="Render reproducible video datasets with GGUF Wan models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a GGUF model file holds")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-tiny-model", help="write the embedded tiny model set (real file layouts, fixed seed)")
    p.add_argument("dir")
    p.add_argument("--quant", default="Q8_0", help="block weight type: F16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("render", help="render one video in this process")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="default: the official Wan negative prompt")
    p.add_argument("--seed", type=int, default=0)
    add_param_args(p)
    p.add_argument("--out", required=True, help="the MP4 to write")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("run", help="render a Parquet manifest on Ray actors into a dataset")
    p.add_argument("manifest", help="Parquet file, directory, glob or filesystem URI")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory or filesystem URI")
    p.add_argument("--actors", type=int, default=None, help="render actors (default: one per GPU; without GPUs, one per CPU)")
    p.add_argument("--seeds", default=None, help="seeds for rows that give none, e.g. 0-99")
    p.add_argument("--skip-invalid", action="store_true", help="render the good rows of a manifest with bad rows")
    p.add_argument("--force", action="store_true", help="re-render jobs that are already done")
    p.add_argument("--address", default=None, help="Ray cluster address (auto, ray://host:10001); default: a local instance")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a job that fails (default 2)")
    p.add_argument("--job-timeout", type=float, default=None, help="seconds a job may take before it is failed and retried (default: no limit)")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines when not on a terminal")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="count done / failed / pending jobs of an output directory")
    p.add_argument("out")
    p.add_argument("--manifest", default=None)
    add_model_args(p, required=False)
    p.add_argument("--seeds", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", help="directory holding the DiT, text encoder and VAE files")
    p.add_argument("--dit", help="Wan DiT GGUF (instead of --model)")
    p.add_argument("--text-encoder", help="umT5 encoder, GGUF or safetensors (instead of --model)")
    p.add_argument("--vae", help="Wan2.1 VAE, safetensors or GGUF (instead of --model)")
    p.add_argument("--tokenizer", help="SentencePiece .model (for a safetensors text encoder)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--policy", default="dequantize_once", choices=["dequantize_once", "on_the_fly"],
                   help="dequantize every weight at load (fastest) or keep quantized weights as blocks and "
                        "dequantize them per forward (least memory); default dequantize_once")
    p.set_defaults(model_required=required)


def add_param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--size", help="WxH, e.g. 832x480")
    p.add_argument("--frames", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--sampler", choices=["unipc", "euler"])


def model_set(args):
    from engine.model_set import ModelSet

    if args.model:
        return ModelSet.from_dir(args.model)
    if args.dit and args.text_encoder and args.vae:
        return ModelSet.from_files(args.dit, args.text_encoder, args.vae, args.tokenizer)
    raise CLIError("give --model DIR, or all of --dit, --text-encoder and --vae")


def param_overrides(args) -> dict:
    overrides = {name: getattr(args, name) for name in ("steps", "guidance", "shift", "frames", "fps", "sampler")}
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise CLIError(f"--size {args.size}: expected WIDTHxHEIGHT, e.g. 832x480") from None
        overrides.update(width=width, height=height)
    return {k: v for k, v in overrides.items() if v is not None}


def engine_options(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return {"device": device, "dtype": getattr(torch, dtype), "policy": args.policy}


def cmd_inspect(args) -> int:
    from engine.describe import describe_gguf, format_description

    if not Path(args.file).is_file():
        raise CLIError(f"{args.file}: no such file")
    info = describe_gguf(args.file)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_make_tiny_model(args) -> int:
    from engine.tiny import make_tiny_model

    paths = make_tiny_model(args.dir, quant=args.quant)
    for role, path in paths.items():
        print(f"{role:13s} {path}")
    return 0


def cmd_render(args) -> int:
    from engine.render import Engine
    from engine.video import write_mp4
    from jobs.params import RenderParams

    models = model_set(args)
    # Parameters are checked before the model loads: a typo must not cost a 14B load.
    params = RenderParams(**{**models.render_defaults().model_dump(), **param_overrides(args)})
    engine = Engine(models, **engine_options(args))
    bar = StepBar(sys.stderr)
    try:
        result = engine.render(args.prompt, args.seed, params, args.negative_prompt, progress=bar.update)
    finally:
        bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write_mp4(result.frames, tmp, fps=params.fps)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    f, h, w, _ = result.frames.shape
    print(f"{out}: {f} frames {w}x{h} at {params.fps} fps, frames_sha256 {result.frames_sha256}")
    return 0


def cmd_run(args) -> int:
    from pipeline.driver import RunConfig, run

    config = RunConfig.from_args(args)
    report = run(config)
    return 0 if report["counts"]["failed"] == 0 else 1


def cmd_status(args) -> int:
    from pipeline.driver import status

    counts = status(args)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


class StepBar:
    """A one-line progress bar over denoising steps (plain lines when not on a terminal)."""

    def __init__(self, stream, width: int = 30):
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def update(self, done: int, total: int) -> None:
        filled = self.width * done // total
        line = f"denoising [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} steps"
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
