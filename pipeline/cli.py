"""The `reelray` command.

    reelray inspect FILE [--json]
    reelray make-tiny-model DIR [--family wan2.1-t2v] [--quant Q8_0]
    reelray render --model DIR --prompt "..." --seed N [--image first.png] --out x.mp4
    reelray render --model DIR --prompt "..." --control-video depth.mp4 [--mask-video mask.mp4]
                   [--reference-images a.png b.png] [--context-scale 1.0] --out x.mp4
    reelray render ... --lora lightx2v_distill.safetensors:1.0 --steps 4 --guidance 1 --sampler lcm
    reelray run MANIFEST --model DIR --out OUT [--actors N] [--seeds A-B] [--lora PATH[:STRENGTH]] ...
    reelray status OUT [--manifest M]
    reelray quantize CHECKPOINT.safetensors OUT.gguf --type Q4_K [--lora PATH[:STRENGTH] ...]

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
# The conditioning inputs `render` has a flag for (the flag is the input's name with dashes),
# and what each flag holds; which of them a model takes comes from its family's InputSpecs.
INPUT_FLAGS = {
    "image": "first frame (image-to-video families): PNG, JPEG or WebP path or URI",
    "control_video": "control video (VACE families): a video file whose frames guide the motion",
    "mask_video": "mask video (VACE families, with --control-video): where the control video applies",
    "reference_images": "reference images (VACE families), in order: PNG, JPEG or WebP paths or URIs",
}


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

    p = sub.add_parser("inspect", help="show what a model file (GGUF, or a safetensors VAE) holds and its family")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-tiny-model", help="write the embedded tiny model set: the trained toy world (Wan2.1 T2V), "
                                               "or a random one in any family's layout")
    p.add_argument("dir")
    p.add_argument("--quant", default="Q8_0", help="DiT block weight type: any `reelray quantize --type` for the "
                                                   "trained model; F16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 for a random one")
    p.add_argument("--family", default=None, help="write a random tiny model set in this family's file layout "
                                                  "(default: the trained toy-world Wan2.1 T2V set)")
    p.add_argument("--random", action="store_true", help="the random tiny Wan2.1 T2V set instead of the trained one")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("render", help="render one video in this process")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="default: the official Wan negative prompt")
    p.add_argument("--seed", type=int, default=0)
    for name, help in INPUT_FLAGS.items():
        p.add_argument(input_flag(name), dest=name, default=None, help=help,
                       nargs="+" if name == "reference_images" else None, metavar="PATH")
    add_param_args(p)
    add_lora_args(p, "this video")
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
    add_lora_args(p, "the rows whose LoRA column is null (an empty list there means none)")
    add_param_args(p)  # run-wide defaults: a row's own column wins
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="count done / failed / pending jobs of an output directory")
    p.add_argument("out")
    p.add_argument("--manifest", default=None)
    add_model_args(p, required=False)
    p.add_argument("--seeds", default=None)
    add_lora_args(p, "the rows that give none, as the run was given them")
    add_param_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("quantize", help="quantize a Wan DiT safetensors checkpoint (original or diffusers names) "
                                        "into a community-layout GGUF, LoRAs merged first")
    p.add_argument("checkpoint", help="the DiT checkpoint (.safetensors)")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="Q4_K", help="block weight type: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, "
                                                  "Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS (default Q4_K)")
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a LoRA to merge into the weights before quantizing (strength 1.0 when omitted); repeatable")
    p.set_defaults(func=cmd_quantize)
    return parser


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", help="directory holding the model files (subfolders included), recognised by content")
    p.add_argument("--dit", help="Wan DiT GGUF (instead of --model)")
    p.add_argument("--dit-high", help="Wan2.2 A14B high-noise expert GGUF (with --dit-low, instead of --model)")
    p.add_argument("--dit-low", help="Wan2.2 A14B low-noise expert GGUF (with --dit-high, instead of --model)")
    p.add_argument("--text-encoder", help="umT5 encoder, GGUF or safetensors (instead of --model)")
    p.add_argument("--vae", help="Wan VAE (2.1 or 2.2), safetensors or GGUF (instead of --model)")
    p.add_argument("--image-encoder", help="CLIP vision encoder, clip_vision_h.safetensors (Wan2.1 I2V; instead of --model)")
    p.add_argument("--tokenizer", help="SentencePiece .model (for a safetensors text encoder)")
    p.add_argument("--family", default=None,
                   help="the model family when the files alone cannot tell (wan2.1-t2v, wan2.1-i2v, wan2.2-t2v-a14b, "
                        "wan2.2-i2v-a14b, wan2.2-ti2v-5b, wan2.1-vace, wan2.2-vace-fun-a14b); "
                        "default: recognised from the files")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--policy", default="dequantize_once", choices=["dequantize_once", "on_the_fly"],
                   help="dequantize every weight at load (fastest) or keep quantized weights as blocks and "
                        "dequantize them per forward (least memory); default dequantize_once")
    p.set_defaults(model_required=required)


# LoRA flags: flag -> the LoRA input it fills (`FamilySpec.lora_slots`); repeatable, each PATH[:STRENGTH].
LORA_FLAGS = {"--lora": "loras", "--lora-high": "loras_high", "--lora-low": "loras_low"}


def add_lora_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--lora", dest="loras", action="append", metavar="PATH[:STRENGTH]",
                   help=f"a LoRA (safetensors, local or URI; strength 1.0 when omitted) for {what}; repeatable, "
                        "applied in order")
    p.add_argument("--lora-high", dest="loras_high", action="append", metavar="PATH[:STRENGTH]",
                   help=f"a LoRA for the high-noise expert (Wan2.2 A14B families) for {what}; repeatable")
    p.add_argument("--lora-low", dest="loras_low", action="append", metavar="PATH[:STRENGTH]",
                   help=f"a LoRA for the low-noise expert (Wan2.2 A14B families) for {what}; repeatable")


def lora_args(args, spec) -> dict[str, list[str]]:
    """{LoRA input: ["PATH[:STRENGTH]", ...]} from the LoRA flags, checked against the family's LoRA inputs."""
    given = {slot: getattr(args, slot) for slot in LORA_FLAGS.values() if getattr(args, slot, None)}
    slots = [s.name for s in spec.inputs if s.kind == "loras"]
    for flag, slot in LORA_FLAGS.items():
        if slot in given and slot not in slots:
            takes = " and ".join(f for f, s in LORA_FLAGS.items() if s in slots)
            raise CLIError(f"{flag}: the {spec.title} family takes its LoRAs with {takes}")
    return given


def add_param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="guidance (the high-noise expert's in a Wan2.2 A14B family)")
    p.add_argument("--guidance-2", type=float, help="the low-noise expert's guidance (Wan2.2 A14B families)")
    p.add_argument("--boundary", type=float, help="expert switch: high noise while t >= boundary x 1000 (Wan2.2 A14B)")
    p.add_argument("--shift", type=float)
    p.add_argument("--size", help="WxH, e.g. 832x480")
    p.add_argument("--frames", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--sampler", choices=["unipc", "euler", "lcm"],
                   help="lcm: the Wan2.1 step-distill step (fresh noise each step); euler with --step-list: Wan2.2's")
    p.add_argument("--step-list", metavar="I,J,...",
                   help="step-distilled sampling (LightX2V): indices 0..999 into the 1000-entry shifted sigma table, "
                        "e.g. 0,250,500,750; sets --steps to its length")
    p.add_argument("--context-scale", type=float, help="how strongly the control video and references steer (VACE families)")


def model_files(args) -> dict[str, str]:
    """The model files the arguments name, by role; {} when --model names a directory."""
    roles = ("dit", "dit_high", "dit_low", "text_encoder", "vae", "image_encoder", "tokenizer")
    return {role: getattr(args, role) for role in roles if getattr(args, role, None)}


def model_set(args):
    from engine.model_set import ModelSet

    files = model_files(args)
    if args.model:
        if files:
            raise CLIError("give --model DIR or the files one by one (--dit/--dit-high/--dit-low, --text-encoder, --vae), not both")
        return ModelSet.from_dir(args.model, family=args.family)
    if files:
        return ModelSet.from_files(files, family=args.family)
    raise CLIError("give --model DIR, or --dit (or --dit-high and --dit-low), --text-encoder and --vae")


def param_overrides(args) -> dict:
    names = ("steps", "guidance", "guidance_2", "boundary", "shift", "frames", "fps", "sampler", "context_scale")
    overrides = {name: getattr(args, name) for name in names}
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise CLIError(f"--size {args.size}: expected WIDTHxHEIGHT, e.g. 832x480") from None
        overrides.update(width=width, height=height)
    step_list = getattr(args, "step_list", None)
    if step_list is not None:
        try:
            overrides["step_list"] = [int(v) for v in step_list.split(",")]
        except ValueError:
            raise CLIError(f"--step-list {step_list}: expected comma-separated integers, e.g. 0,250,500,750") from None
    return {k: v for k, v in overrides.items() if v is not None}


def engine_options(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return {"device": device, "dtype": getattr(torch, dtype), "policy": args.policy}


def cmd_inspect(args) -> int:
    from engine.describe import describe_file, format_description

    if not Path(args.file).is_file():
        raise CLIError(f"{args.file}: no such file")
    info = describe_file(args.file)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_make_tiny_model(args) -> int:
    from engine.gguf.quantize import QuantizeError, quant_type
    from engine.tiny import make_tiny_model
    from engine.toy.embedded import write_toy_model

    if args.family is None and not args.random:
        try:  # the trained checkpoint goes through `reelray quantize`'s code: any type it writes
            paths = write_toy_model(args.dir, quant=quant_type(args.quant).name)
        except QuantizeError as exc:
            raise CLIError(f"--quant {args.quant}: {exc}") from None
    else:
        paths = make_tiny_model(args.dir, quant=args.quant, family=args.family or "wan2.1-t2v")
    for role, path in paths.items():
        print(f"{role:13s} {path}")
    return 0


def cmd_render(args) -> int:
    from engine.render import Engine
    from engine.video import write_mp4
    from jobs.seeds import check_seed

    models = model_set(args)
    spec = models.spec
    # Checked as a manifest row is, before the model loads: a typo must not cost a 14B load.
    try:
        seed = check_seed(args.seed)
    except ValueError as exc:
        raise CLIError(f"--seed {args.seed}: {exc}") from None
    if not args.prompt.strip():
        raise CLIError("--prompt must not be empty")
    params = spec.params(**param_overrides(args))
    inputs = render_inputs(args, spec)
    engine = Engine(models, **engine_options(args))
    bar = StepBar(sys.stderr)
    try:
        result = engine.render(args.prompt, seed, params, args.negative_prompt, inputs, progress=bar.update)
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
    print(f"{out}: {spec.name}, {f} frames {w}x{h} at {params.fps} fps, frames_sha256 {result.frames_sha256}")
    return 0


def input_flag(name: str) -> str:
    """The `render` flag of an input: "reference_images" -> "--reference-images"."""
    return "--" + name.replace("_", "-")


def render_inputs(args, spec) -> dict[str, str | list[str]]:
    """The inputs `render` was given, checked against the family (`spec`) before any model loads.

    A flag for an input the family does not take, a required input missing, or
    an input without the one it `needs` is a CLIError naming the flags; then
    each image is decoded and each video's header read, so a bad file fails in
    one line here, not after a 14B model load.
    """
    given = {name: getattr(args, name) for name in INPUT_FLAGS if getattr(args, name, None) is not None}
    given |= lora_args(args, spec)
    for name in given:
        if spec.input_spec(name) is None:
            raise CLIError(f"{input_flag(name)}: the {spec.title} family takes no {name} (its inputs: "
                           f"{', '.join(spec.input_names) or 'none'})")
    for input_spec in spec.inputs:
        if input_spec.required and input_spec.name not in given:
            if input_spec.name not in INPUT_FLAGS:
                raise CLIError(f"the {spec.title} family needs input {input_spec.name}, which `reelray render` has "
                               "no flag for; render it from a manifest with `reelray run`")
            raise CLIError(f"the {spec.title} family needs {input_flag(input_spec.name)} ({input_spec.help})")
    for input_spec in spec.unmet_needs(given):
        raise CLIError(f"{input_flag(input_spec.name)} needs {input_flag(input_spec.needs)}")
    try:
        inputs = spec.check_inputs(given)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    for name, value in inputs.items():
        if spec.input_spec(name).file_kind == "lora":
            from pipeline.driver import probe_lora

            for path, _ in value:
                probe_lora(path)
        elif spec.input_spec(name).file_kind == "video":
            from engine.video_input import probe_video

            probe_video(value)
        else:
            from engine.image import read_image

            for uri in value if isinstance(value, list) else [value]:
                read_image(uri)
    return inputs


def cmd_run(args) -> int:
    from jobs.seeds import parse_seed_range
    from pipeline.driver import RunConfig, run

    models = model_set(args)
    config = RunConfig(
        manifest=args.manifest,
        out=args.out,
        model_files=models.paths(),
        family=models.family,
        model_dir=args.model,
        actors=args.actors,
        seeds=parse_seed_range(args.seeds) if args.seeds else None,
        skip_invalid=args.skip_invalid,
        force=args.force,
        address=args.address,
        retries=args.retries,
        job_timeout=args.job_timeout,
        log_every=args.log_every,
        device=args.device,
        dtype=args.dtype,
        policy=args.policy,
        loras=lora_args(args, models.spec),
        params=param_overrides(args),
    )
    report = run(config)
    return 0 if report["counts"]["failed"] == 0 else 1


def cmd_status(args) -> int:
    from jobs.seeds import parse_seed_range
    from pipeline.driver import status

    loras = None
    if args.manifest:
        models = model_set(args)
        files, family = models.paths(), models.family
        loras = lora_args(args, models.spec)
    else:
        files, family = None, None
    seeds = parse_seed_range(args.seeds) if args.seeds else None
    counts = status(args.out, args.manifest, files, family, seeds, loras, param_overrides(args))
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def cmd_quantize(args) -> int:
    from engine.lora import read_lora
    from engine.wan.convert.dit import quantize_checkpoint
    from jobs.family import parse_lora_ref

    loras = []
    for ref in args.loras:
        try:
            path, strength = parse_lora_ref(ref)
        except ValueError as exc:
            raise CLIError(f"--lora {ref}: {exc}") from None
        loras.append((read_lora(path), strength))
    tallies = quantize_checkpoint(args.checkpoint, args.out, args.type, loras)
    print(f"{args.out}: {sum(t.tensors for t in tallies.values())} tensors, block weights {args.type.upper()}"
          + (f", {len(loras)} LoRA{'s' if len(loras) > 1 else ''} merged" if loras else ""))
    for name, t in tallies.items():
        print(f"  {name:7s} {t.tensors:5d} tensors  {t.bytes_in / 1e6:10.1f} MB in  {t.bytes_out / 1e6:10.1f} MB out  "
              f"{t.seconds:8.2f} s  {t.bytes_in / 1e6 / max(t.seconds, 1e-9):8.1f} MB/s")
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
