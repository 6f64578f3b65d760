"""The `storymem-rt` command line.

Layout: shared machinery (errors, logging, option groups) first, then one section per
command. Commands import heavy modules (torch, the model stack) inside their bodies, so
`storymem-rt --help` and `storymem-rt validate` start without loading torch.

Errors: every exception a user can cause (a broken script, a checkpoint, a full disk, a device,
Ctrl-C, SIGTERM) becomes one `Error:` line and the exit code of `storymem_rt.guard.EXIT_CODES`;
`guard.failure` is the one mapping, `_Group.invoke` the one place that applies it. Commands
do not catch them themselves. Text from the user (prompts, names, paths) goes through
`guard.terminal_safe` before it reaches the terminal.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__
from .configs import DEFAULT_FRAME_NUM, DEFAULT_MAX_MEMORY, DEFAULT_SIZE, format_size
from .guard import failure, terminal_safe
from .configs import MAX_SAMPLE_STEPS
from .script import SEED_POLICIES, MAX_SEED, MODES, PlanSettings, PlannedShot, load_story

LOGGER = "storymem_rt"


# --------------------------------------------------------------------------- errors and logging

class CommandFailure(click.ClickException):
    """An exception a user caused, as one `Error: ...` line (no usage banner) and its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(terminal_safe(" ".join(message.split())))
        self.exit_code = exit_code


class _EchoHandler(logging.Handler):
    """Writes records through click.echo at emit time, so the stream is whatever stderr is
    then (CliRunner swaps it), and colours and encodings follow click's rules."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = terminal_safe(self.format(record))
            tqdm = sys.modules.get("tqdm")
            if tqdm is None:
                click.echo(text, err=True)
                return
            # Clear the progress bars, write the line, redraw them: never glued onto a bar.
            with tqdm.tqdm.external_write_mode(file=sys.stderr):
                click.echo(text, err=True)
        except Exception:  # logging must never take the command down
            self.handleError(record)


class _LowerLevelFormatter(logging.Formatter):
    """`warning: ...` like click's `Error: ...` lines, not `WARNING:storymem_rt...`."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(verbose: int) -> None:
    """Warnings always; -v adds info, -vv debug. Idempotent: reinstalls its one handler."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if isinstance(h, _EchoHandler):
            logger.removeHandler(h)
    handler = _EchoHandler()
    handler.setFormatter(_LowerLevelFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)


def _one_line(e: click.UsageError) -> click.UsageError:
    """A usage error as one `Error:` line with a --help hint, not click's usage banner above it
    (a bare `storymem-rt`, which shows the help, stays as it is)."""
    if e.ctx is None or isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        return e
    return click.UsageError(terminal_safe(f"{e.format_message()} (see '{e.ctx.command_path} --help')"))


class _Group(click.Group):
    """Turns our user-facing exceptions into click's, so no command prints a traceback for them."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context):
        from .guard import sigterm_as_exception

        try:
            with sigterm_as_exception():  # SIGTERM unwinds like Ctrl-C: bars closed, folder released
                return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None
        except click.ClickException:
            raise
        except BaseException as e:  # KeyboardInterrupt and SIGTERM included
            f = failure(e, kept=getattr(e, "kept", ""))
            if f is None:
                raise  # a bug of ours: keep the traceback
            raise CommandFailure(f.message, f.exit_code) from None


# --------------------------------------------------------------------------- shared options

class _GreedyOption(click.Option):
    """`--reference-images a.png b.png c.png`: one flag, several values (click options take a
    fixed count). Values run up to the next option, `--`, or a `.json` path (the story), so
    `render --reference-images a.png b.png story.json` still finds the story; the flag may
    also be repeated."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        # click's parser is private API; without these attributes the option stays a plain
        # repeatable one (`--reference-images a.png --reference-images b.png`).
        table = {**getattr(parser, "_short_opt", {}), **getattr(parser, "_long_opt", {})}
        wrapped = set()
        for name in self.opts:
            opt = table.get(name)
            if opt is None or id(opt) in wrapped or not hasattr(opt, "process"):
                continue
            wrapped.add(id(opt))
            process = opt.process

            def greedy(value, state, process=process):
                process(value, state)
                rargs = getattr(state, "rargs", None)
                while rargs and not rargs[0].startswith("-") and not rargs[0].lower().endswith(".json"):
                    process(rargs.pop(0), state)

            opt.process = greedy


_PLAN_OPTIONS = [
    click.option("--t2v-first-shot/--m2v-first-shot", "t2v_first_shot", default=True, show_default=True,
                 help="First shot: T2V from its prompt, or M2V (reference: --t2v_first_shot / --m2v_first_shot; "
                      "--reference-images implies --m2v-first-shot)."),
    click.option("--mi2v", is_flag=True,
                 help="A shot with cut=false starts from the previous shot's last frame (MI2V; reference: --mi2v)."),
    click.option("--mm2v", is_flag=True,
                 help="A shot with cut=false continues the previous shot's last 5 frames (MM2V; reference: --mm2v)."),
    click.option("--reference-images", cls=_GreedyOption, multiple=True, metavar="IMAGE...",
                 type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="MR2V: images that are the first shot's memory (the first 3 stay in memory). "
                      "The reference reads them from OUTPUT_DIR/00_00_keyframe*.jpg."),
    click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                 help="Seed of the first shot (reference: --seed)."),
    click.option("--seed-policy", type=click.Choice(SEED_POLICIES), default="reference", show_default=True,
                 help="reference: seed + index of the shot inside its scene (every scene restarts at SEED); "
                      "unique: seed + index of the shot in the story."),
]


def plan_options(f):
    """Adds the shot-plan options and hands the command one `plan: PlanSettings` instead.

    Conflicts are usage errors (exit 2) raised before the command body runs."""

    @functools.wraps(f)
    def wrapper(*args, t2v_first_shot, mi2v, mm2v, reference_images, seed, seed_policy, **kwargs):
        ctx = click.get_current_context()
        if mi2v and mm2v:
            raise click.UsageError("--mi2v and --mm2v cannot be used together: a shot without a cut continues "
                                   "from the last frame (--mi2v) or the last 5 frames (--mm2v); choose one", ctx)
        explicit_first = ctx.get_parameter_source("t2v_first_shot") not in (ParameterSource.DEFAULT, None)
        if reference_images and t2v_first_shot and explicit_first:
            raise click.UsageError("--reference-images make the first shot M2V from those images: "
                                   "drop --t2v-first-shot", ctx)
        first = "m2v" if reference_images or not t2v_first_shot else "t2v"
        kwargs["plan"] = PlanSettings(first_shot=first, mi2v=mi2v, mm2v=mm2v,
                                      reference_images=tuple(reference_images), seed=seed, seed_policy=seed_policy)
        return f(*args, **kwargs)

    for option in reversed(_PLAN_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def make_plan(plan: PlanSettings, story, frame_num: int = 81) -> list[PlannedShot]:
    try:
        return plan.plan(story, frame_num)
    except ValueError as e:  # e.g. a seed that overflows over a long story
        raise click.UsageError(str(e)) from None


# --------------------------------------------------------------------------- the group

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output: -v info, -vv debug.")
@click.version_option(__version__, prog_name="storymem-rt")
def main(verbose: int) -> None:
    """storymem-rt: fast StoryMem multi-shot story video on Wan2.2 A14B."""
    setup_logging(verbose)


# --------------------------------------------------------------------------- validate

def _head(text: str, width: int) -> str:
    text = terminal_safe(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 3] + "..."


_STRICT = click.option("--strict", is_flag=True, help="Unknown keys in the story script are errors, not warnings.")


def _json_for_terminal(obj) -> str:
    """JSON with non-ASCII text kept readable but C1 controls, bidi overrides and the like
    escaped (json.dumps escapes only C0 controls when ensure_ascii is off): still valid JSON."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    return "".join(c if terminal_safe(c) == c else json.dumps(c)[1:-1] for c in text)


@main.command()
@click.argument("story", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='Print the plan as JSON: {"shots": [{"scene", "shot", '
              '"mode", "seed", "cut", "prompt", "frames"}, ...]}.')
@click.option("--frame-num", type=click.IntRange(5), default=81, show_default=True,
              help="Frames of a shot whose scene gives no length, 4n+1 (as render's --frame-num).")
@_STRICT
@plan_options
def validate(story: Path, as_json: bool, frame_num: int, strict: bool, plan: PlanSettings) -> None:
    """Check STORY (a story script, ST-Bench schema) and print its shot plan. Writes nothing."""
    if (frame_num - 1) % 4:
        raise click.BadParameter(f"{frame_num} is not 4n+1 (e.g. 81)", param_hint="--frame-num")
    s = load_story(story, strict=strict)
    shots = make_plan(plan, s, frame_num)
    if as_json:
        click.echo(_json_for_terminal({"shots": [shot.to_json() for shot in shots]}))
        return
    n_scenes = len(s.scenes)
    click.echo(terminal_safe(f"{story}: {json.dumps(s.name, ensure_ascii=False)}: {n_scenes} "
                             f"scene{'s' * (n_scenes != 1)}, {len(shots)} shot{'s' * (len(shots) != 1)}"))
    seed_w = max(4, *(len(str(shot.seed)) for shot in shots))
    id_w = max(4, *(len(shot.id) for shot in shots))
    # The length column: frames generated, what the MP4 keeps, and the seconds asked for.
    lengths = [f"{shot.frames:>3}" + (f" -> {shot.output_frames}" if shot.output_frames != shot.frames else "")
               + (f" ({shot.seconds:g} s)" if shot.seconds is not None else "") for shot in shots]
    len_w = max(6, *(len(x) for x in lengths))
    click.echo(f"  {'shot':<{id_w}}  mode  {'seed':>{seed_w}}  cut  {'frames':<{len_w}}  prompt")
    for shot, length in zip(shots, lengths):
        click.echo(f"  {shot.id:<{id_w}}  {shot.mode:<4}  {shot.seed:>{seed_w}}  {'yes' if shot.cut else 'no ':<3}  "
                   f"{length:<{len_w}}  {_head(shot.prompt, 64)}")
    counts = ", ".join(f"{m} {n}" for m in MODES if (n := sum(shot.mode == m for shot in shots)))
    total = sum(shot.output_frames for shot in shots)
    click.echo(f"ok: {counts}; {total} frames ({total / 16:.1f} s at 16 fps)")



# --------------------------------------------------------------------------- make-tiny-models

@main.command("make-tiny-models")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--layout", type=click.Choice(["upstream", "diffusers"]), default="upstream", show_default=True,
              help="upstream: Wan2.2-*-A14B/ folders as Wan-AI ships them; diffusers: Wan2.2-*-A14B-Diffusers/ "
                   "(transformer/, transformer_2/, text_encoder/, tokenizer/, vae/), the same weights.")
def make_tiny_models_cmd(out_dir: Path, seed: int, overwrite: bool, layout: str) -> None:
    """Write a tiny model bundle (deterministic random weights) to OUT_DIR."""
    from .tiny import make_tiny_diffusers_models, make_tiny_models

    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise click.UsageError(f"{out_dir} is not empty: pass --overwrite or pick another folder")
    make = make_tiny_diffusers_models if layout == "diffusers" else make_tiny_models
    make(out_dir, seed=seed, overwrite=overwrite)
    click.echo(f"wrote tiny model bundle ({layout} layout) to {out_dir}")


# --------------------------------------------------------------------------- render

# Largest side --size accepts: 4x Wan2.2's 1280*720, far beyond what an H200 holds at 81 frames.
MAX_SIDE = 4096


def _parse_size(value: str) -> tuple[int, int]:
    shown = value if len(value) <= 40 else value[:37] + "..."
    try:
        w, h = (int(v) for v in value.lower().replace("x", "*").split("*"))
    except ValueError:
        raise click.BadParameter(f"{shown!r} is not WIDTH*HEIGHT, e.g. 832*480", param_hint="--size") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise click.BadParameter(f"{shown!r}: width and height must be positive multiples of 16 (e.g. 832*480)",
                                 param_hint="--size")
    if max(w, h) > MAX_SIDE:
        raise click.BadParameter(f"{shown!r}: width and height must be at most {MAX_SIDE}", param_hint="--size")
    return w, h


def _finite(value: float, param) -> float:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=param)
    return value


def _device(value: str | None):
    """The torch device of --device, checked before anything loads: a usage error when it is
    no device name, a device error when this machine has no such device."""
    import torch

    from .errors import DeviceError

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a device name; use cpu, cuda or cuda:N",
                                 param_hint="--device") from None
    if dev.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{value!r}: storymem-rt renders on cpu or cuda", param_hint="--device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {value}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                              "False); use --device cpu, or leave --device out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {value}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return dev


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


@main.command()
@click.argument("story", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: out/<story file name>). Rerunning on it resumes.")
@click.option("--models", default="tiny", show_default=True,
              help="'tiny' (the embedded tiny bundle, CPU demo) or a folder holding Wan2.2-T2V-A14B/, "
                   "Wan2.2-I2V-A14B/ (or their -Diffusers folders) and StoryMem/.")
@click.option("--t2v-model", type=click.Path(path_type=Path), help="Wan2.2-T2V-A14B folder, upstream or diffusers "
              "layout (reference: --t2v_model_path).")
@click.option("--i2v-model", type=click.Path(path_type=Path), help="Wan2.2-I2V-A14B folder, upstream or diffusers "
              "layout (reference: --i2v_model_path).")
@click.option("--lora", type=click.Path(path_type=Path), help="Folder with backbone_{high,low}_noise.pth, or their "
              "safetensors / ComfyUI repacks (reference: --lora_weight_path).")
@click.option("--lora-rank", type=click.IntRange(1), default=None,
              help="LoRA rank, alpha = rank (reference: --lora_rank); default: read from the file.")
@click.option("--size", default=format_size(DEFAULT_SIZE), show_default=True,
              help="WIDTH*HEIGHT of every shot (reference: --size).")
@click.option("--frame-num", type=click.IntRange(5), default=DEFAULT_FRAME_NUM, show_default=True,
              help="Frames per shot, 4n+1.")
@click.option("--sample-steps", type=click.IntRange(1, MAX_SAMPLE_STEPS), default=40, show_default=True,
              help=f"Denoising steps (1..{MAX_SAMPLE_STEPS}).")
@click.option("--sample-solver", type=click.Choice(["unipc", "dpm++"]), default="unipc", show_default=True)
@click.option("--sample-guide-scale", type=float, default=3.5, show_default=True,
              callback=lambda ctx, p, v: _finite(v, p))
@click.option("--max-memory-size", type=click.IntRange(1), default=DEFAULT_MAX_MEMORY, show_default=True,
              help="Most memory frames a shot sees (reference: --max_memory_size).")
@click.option("--fix", type=click.IntRange(0), default=3, show_default=True,
              help="The first N keyframes stay in memory (reference: --fix).")
@click.option("--no-quality-filter", is_flag=True, help="Accept every frame as a keyframe candidate.")
@click.option("--clip-weights", default=None, help="open_clip ViT-B-32 OpenAI weights (file or cache folder); "
              "with --models tiny a seeded random CLIP is used.")
@click.option("--reference-mi2v-bug", is_flag=True, help="Reproduce the reference's MI2V (which conditions on "
              "an all-zeros clip instead of the previous shot's last frame).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="DiT compute dtype (default: bfloat16 on GPU, float32 on CPU).")
@click.option("--offload", is_flag=True, help="Keep only the active model's experts on the device.")
@click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=None,
              help="Use the artifacts `storymem-rt build-engines --out DIR` made (merged LoRA, FP8 weights, "
                   "compile caches); a stale or missing one is refused with the rebuild command.")
@click.option("--precision", type=click.Choice(["bf16", "fp8", "fp32"]), default=None,
              help="With --engines: which precision's artifacts to use (default: bf16 on GPU, fp32 on CPU).")
@click.option("--backend", type=click.Choice(["auto", "plain", "fast-bf16", "fast-fp8", "compiled", "onnxruntime",
                                              "tensorrt"]), default="auto", show_default=True,
              help="What runs the DiT (docs/ARCHITECTURE.md): plain, fast-bf16/fast-fp8 (fused kernels, cached text "
                   "K/V, FP8 GEMMs), compiled (torch.compile, with --engines' compile cache), onnxruntime / "
                   "tensorrt (--engines' graphs / engines). auto: as --fast says.")
@click.option("--fast", type=click.Choice(["auto", "off", "bf16", "fp8"]), default="auto", show_default=True,
              help="Short for --backend plain / fast-bf16 / fast-fp8. auto: fast-bf16 on CUDA (fast-fp8 with FP8 "
                   "--engines), plain on CPU.")
@click.option("--compile/--no-compile", "fast_compile", default=False, show_default=True,
              help="With --fast: regional torch.compile of the repeated block (minutes of compilation "
                   "the first time, then ~2%% (bf16) to 20%% (fp8) faster per step on H100).")
@click.option("--attention", type=click.Choice(["auto", "cudnn", "triton", "triton-tl", "int8-int8", "int8-fp8"]),
              default="auto", show_default=True,
              help="With --fast bf16/fp8: the DiT's self-attention. auto: the faster of cuDNN and our bf16 kernel "
                   "for the shape (bf16 math). int8-int8: our 8-bit kernel (rel. err. ~1.6e-2 per call on random "
                   "data; the FP8 forward ~10%% faster at A14B size on H100, docs/PERF.md); int8-fp8: ~3.6e-2.")
@click.option("--preview", is_flag=True,
              help="Preview preset: a few-step distill LoRA stacked on StoryMem's, the step-distill sampler "
                   "(--distill-steps, shift 5, 2 high-noise + 2 low-noise steps), no CFG: 4 DiT calls per shot.")
@click.option("--distill-lora-t2v", type=click.Path(path_type=Path), default=None,
              help="With --preview: folder of the T2V 4-step LoRA (a *high_noise* and a *low_noise* .safetensors; "
                   "default MODELS/distill/t2v).")
@click.option("--distill-lora-i2v", type=click.Path(path_type=Path), default=None,
              help="With --preview: folder of the I2V 4-step LoRA (default MODELS/distill/i2v).")
@click.option("--distill-strength", type=float, default=1.0, show_default=True,
              help="With --preview: the distill LoRA's strength (one community note: StoryMem may want > 1.0).")
@click.option("--distill-steps", default="1000,750,500,250", show_default=True,
              help="With --preview: the distilled timesteps, comma separated, decreasing.")
@click.option("--distill-shift", type=float, default=5.0, show_default=True, help="With --preview: sigma shift.")
@click.option("--distill-boundary-step", type=click.IntRange(0), default=2, show_default=True,
              help="With --preview: steps run by the high-noise expert before the low-noise one.")
@click.option("--preview-cfg", type=click.Choice(["none", "high", "both"]), default="none", show_default=True,
              help="With --preview: experts that keep classifier-free guidance (--sample-guide-scale); 'high' is "
                   "what users who find preview motion weak use.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: when stderr is a terminal; logs get no cursor codes).")
@click.option("--wait", is_flag=True, help="If another render holds --out, wait for it instead of refusing.")
@_STRICT
@plan_options
def render(story: Path, out_dir: Path | None, models: str, t2v_model, i2v_model, lora, lora_rank, size,
           frame_num, sample_steps, sample_solver, sample_guide_scale, max_memory_size, fix, no_quality_filter,
           clip_weights, reference_mi2v_bug, device, dtype, offload, engines_dir, precision, backend, fast,
           fast_compile, attention, preview, distill_lora_t2v, distill_lora_i2v, distill_strength, distill_steps,
           distill_shift, distill_boundary_step, preview_cfg, progress, wait, strict, plan: PlanSettings) -> None:
    """Render STORY into one video, shot by shot, in this process."""
    ctx = click.get_current_context()
    s = load_story(story, strict=strict)
    w_h = _parse_size(size)
    if (frame_num - 1) % 4:
        raise click.BadParameter(f"{frame_num} is not 4n+1 (e.g. 81)", param_hint="--frame-num")
    shots = make_plan(plan, s, frame_num)
    if fix > max_memory_size:
        raise click.BadParameter(f"--fix {fix} is larger than --max-memory-size {max_memory_size}", param_hint="--fix")
    for p in plan.reference_images:
        from .media import load_image

        load_image(p)  # a broken image fails here, before anything is written
    out_dir = out_dir or Path("out") / story.stem
    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{out_dir} exists and is not a folder", param_hint="--out")

    import torch

    from .keyframes import KeyframeSelector, default_quality_scorer, load_clip, random_clip
    from .models import ModelPaths, ModelSet, read_tiny_meta
    from .story import RenderSettings, StoryRenderer
    from .tiny import ensure_tiny_models

    root = None
    if not (t2v_model or i2v_model or lora):
        if models == "tiny":
            root = ensure_tiny_models()
        elif read_tiny_meta(Path(models)) is not None:  # a folder written by `make-tiny-models`
            root = Path(models)
    tiny = root is not None
    notes = tiny_note = None
    if tiny:
        meta = read_tiny_meta(root)
        d = meta["render_defaults"]
        replaced = {}
        if not _explicit(ctx, "size"):
            w_h = replaced["size"] = tuple(d["size"])
        if not _explicit(ctx, "frame_num"):
            frame_num = replaced["frame_num"] = d["frame_num"]
        if not _explicit(ctx, "sample_steps") and not preview:
            sample_steps = replaced["sample_steps"] = d["sample_steps"]
        notes = {"tiny_random_weights": True, "replaced_defaults": {k: list(v) if k == "size" else v
                                                                   for k, v in replaced.items()}}
        tiny_note = _tiny_note(root, replaced)  # printed once every check has passed
        paths = ModelPaths.from_models_dir(root)
        identity = f"tiny-v{meta['format']}-seed{meta['seed']}"
        shots = make_plan(plan, s, frame_num)  # the tiny bundle's default length for shots that give none
    else:
        base = ModelPaths.from_models_dir(models) if models != "tiny" else ModelPaths(None, None, None)
        paths = ModelPaths(t2v=t2v_model or base.t2v, i2v=i2v_model or base.i2v, lora=lora or base.lora)
        identity = json.dumps({k: str(Path(v).resolve()) if v else None for k, v in vars(paths).items()})
    need_t2v = any(sh.mode == "t2v" for sh in shots)
    need_m2v = any(sh.mode != "t2v" for sh in shots)
    dev = _device(device)
    paths.check(need_t2v, need_m2v)
    from .preflight import check_inputs

    check_inputs(paths, {k for k, need in (("t2v", need_t2v), ("m2v", need_m2v)) if need}, lora_rank=lora_rank)
    preview_settings, distill = _preview(ctx, preview, root if tiny else (None if models == "tiny" else Path(models)),
                                         tiny, need_t2v, need_m2v)
    if preview:
        sample_steps = len(preview_settings["step_list"])

    from .backends import BackendError, resolve

    art_precision = precision if engines_dir is None else (precision or ("bf16" if dev.type == "cuda" else "fp32"))
    try:
        backend_cfg = resolve(backend=backend, fast=fast, attention=attention, compile=fast_compile, device=dev,
                              dtype=dtype, engines=engines_dir, engines_precision=art_precision)
    except BackendError as e:
        raise click.UsageError(str(e)) from None
    if preview and backend_cfg.name in ("onnxruntime", "tensorrt"):
        raise click.UsageError(f"--preview merges its distill LoRA into the experts as they load; --backend "
                               f"{backend_cfg.name} runs prebuilt graphs without it: use a torch backend")
    if preview and art_precision == "fp8" and engines_dir is not None:
        raise click.UsageError("--preview cannot merge a distill LoRA into FP8 artifacts: use --precision bf16 "
                               "artifacts, or no --engines (with --fast fp8 the merged experts are quantized)")
    engines = None
    if engines_dir is not None:
        from .engines.manifest import BuildSpec

        if not (engines_dir / "manifest.json").is_file():
            raise click.BadParameter(f"{engines_dir} has no manifest.json: build it with storymem-rt build-engines "
                                     f"--out {engines_dir}", param_hint="--engines")
        engines = BuildSpec(models="tiny" if tiny and models == "tiny" else str(models),
                            lora=None if lora is None else str(lora), precision=art_precision, size=w_h,
                            frame_num=frame_num, max_memory_size=max_memory_size, out=str(engines_dir),
                            lora_rank=lora_rank)
        identity = json.dumps({"models": identity, "engines": str(engines_dir.resolve()), "precision": art_precision})
        other = sorted({sh.frames for sh in shots} - {frame_num})
        if other:  # engines are shaped for one length: other lengths run, but compile (or run eagerly) first
            logging.getLogger(LOGGER).warning(
                "--engines %s: artifacts are looked up for %d-frame shots (--frame-num); this story also has "
                "shots of %s frames, which no prebuilt artifact covers (they run, compiling on first use; "
                "build-engines --frame-num N adds a length)", engines_dir, frame_num, ", ".join(map(str, other)))
    dt = {"fp32": "float32"}.get(backend_cfg.precision, "bfloat16")
    try:
        settings = RenderSettings(
            plan=plan, size=w_h, frame_num=frame_num, sample_steps=sample_steps, solver=sample_solver,
            guide_scale=(sample_guide_scale, sample_guide_scale), max_memory_size=max_memory_size, fix=fix,
            quality_filter="none" if no_quality_filter else "auto", reference_mi2v_bug=reference_mi2v_bug,
            lora_rank=lora_rank, dtype=dt, models=identity, backend=backend_cfg.to_json(), preview=preview_settings)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    model_set = ModelSet(paths, device=dev, lora_rank=lora_rank,
                         text_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                         resident=not offload, backend=backend_cfg, engines=engines, frame_num=frame_num,
                         max_memory_size=max_memory_size, distill=distill,
                         distill_strength=preview_settings.get("strength", 1.0))
    clip = random_clip(seed=0, device=dev) if tiny and clip_weights is None else load_clip(clip_weights, device=dev)
    selector = KeyframeSelector(clip, default_quality_scorer(not no_quality_filter, device=dev),
                                max_keyframes=settings.max_keyframes, device=dev)
    if tiny_note is not None:
        click.echo(tiny_note, err=True)
    if progress is None:
        progress = sys.stderr.isatty()
    renderer = StoryRenderer(model_set, selector, settings, out_dir, progress=progress, wait=wait, notes=notes,
                             on_wait=lambda holder: click.echo(terminal_safe(f"waiting: {out_dir} is in use by "
                                                                             f"another render ({holder})"), err=True))
    from .outdir import kept_note

    try:
        manifest = renderer.render(s, shots)
    except BaseException as e:
        e.kept = kept_note(out_dir)  # what the folder holds now, for the one error line
        raise
    _print_summary(out_dir, manifest)


def _tiny_note(root: Path, replaced: dict) -> str:
    """The first line of a tiny render: what the pictures are, and which options it changed."""
    shown = {"size": lambda v: f"--size {v[0]}*{v[1]}", "frame_num": lambda v: f"--frame-num {v}",
             "sample_steps": lambda v: f"--sample-steps {v}"}
    changed = ", ".join(shown[k](v) for k, v in replaced.items())
    tail = f"; tiny mode set {changed} (pass them to choose)" if changed else ""
    return terminal_safe(f"note: rendering with the tiny bundle of random weights ({root}): the pictures are "
                         f"noise; pass --models DIR for the real models{tail}")


_DISTILL_OPTIONS = ("distill_lora_t2v", "distill_lora_i2v", "distill_strength", "distill_steps", "distill_shift",
                    "distill_boundary_step", "preview_cfg")


def _preview(ctx: click.Context, on: bool, models_dir: Path | None, tiny: bool, need_t2v: bool,
             need_m2v: bool) -> tuple[dict, dict | None]:
    """render.json's `preview` settings and the distill LoRA files per model kind, from the --preview
    options (usage errors for options that need --preview or contradict it)."""
    import math

    p = ctx.params
    if not on:
        given = [o for o in _DISTILL_OPTIONS if _explicit(ctx, o)]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} goes with --preview: add --preview or drop it")
        return {}, None
    for o in ("sample_steps", "sample_solver"):
        if _explicit(ctx, o):
            raise click.UsageError(f"--preview runs the step-distill sampler: drop --{o.replace('_', '-')} (the "
                                   f"steps are --distill-steps)")
    try:
        steps = tuple(int(t) for t in p["distill_steps"].split(","))
        from .schedulers import StepDistillScheduler

        StepDistillScheduler(steps, p["distill_shift"])
    except ValueError as e:
        raise click.BadParameter(f"{p['distill_steps']!r}: {e}" if "step" in str(e) or "shift" in str(e) else
                                 f"{p['distill_steps']!r} is not a comma-separated list of timesteps",
                                 param_hint="--distill-steps / --distill-shift") from None
    if not math.isfinite(p["distill_strength"]) or p["distill_strength"] < 0:
        raise click.BadParameter(f"{p['distill_strength']} must be a finite number >= 0", param_hint="--distill-strength")
    if p["distill_boundary_step"] > len(steps):
        raise click.BadParameter(f"{p['distill_boundary_step']} is more than the {len(steps)} distill steps",
                                 param_hint="--distill-boundary-step")
    from .distill import file_digest, find_distill_files

    folders = {"t2v": p["distill_lora_t2v"], "m2v": p["distill_lora_i2v"]}
    if tiny and models_dir is not None and not all(folders.values()):
        from .tiny import ensure_tiny_distill

        folders = {k: v or ensure_tiny_distill(models_dir)[k] for k, v in folders.items()}
    distill, loras = {}, {}
    for kind, needed in (("t2v", need_t2v), ("m2v", need_m2v)):
        if not needed:
            continue
        folder = folders[kind]
        if folder is None:
            if models_dir is None:
                opt = "--distill-lora-t2v" if kind == "t2v" else "--distill-lora-i2v"
                raise click.UsageError(f"--preview needs the {kind.upper()} distill LoRA: give {opt} DIR (a folder "
                                       f"with its *high_noise* and *low_noise* .safetensors) or --models DIR with "
                                       f"distill/{'t2v' if kind == 't2v' else 'i2v'}/ inside")
            folder = models_dir / "distill" / ("t2v" if kind == "t2v" else "i2v")
        distill[kind] = find_distill_files(folder)
        loras[kind] = {e: {"file": str(f), "sha256": file_digest(f)} for e, f in distill[kind].items()}
    guided = {"none": [], "high": ["high"], "both": ["high", "low"]}[p["preview_cfg"]]
    return ({"step_list": list(steps), "shift": p["distill_shift"], "boundary_step": p["distill_boundary_step"],
             "guided": guided, "strength": p["distill_strength"], "loras": loras}, distill)


def _print_summary(out_dir: Path, manifest: dict) -> None:
    out_dir = Path(terminal_safe(str(out_dir)))
    rows = manifest["shots"]
    keys = ["load", "vae_encode", "dit", "vae_decode", "keyframes", "write"]
    click.echo(f"{'shot':<6} {'mode':<5}" + "".join(f"{k:>11}" for k in keys) + f"{'memory':>8}{'keyframes':>10}")
    for sid in sorted(rows, key=lambda k: rows[k]["index"]):
        r = rows[sid]
        t = r["timings"]
        click.echo(f"{sid:<6} {r['mode']:<5}" + "".join(f"{t.get(k, 0.0):>10.2f}s" for k in keys)
                   + f"{len(r['memory']):>8}{len(r['keyframes']):>10}")
    tt = manifest.get("timings_this_run", {})
    click.echo(f"text encode {tt.get('text_encode', 0.0):.2f}s, final video + storyboard {tt.get('final', 0.0):.2f}s")
    click.echo(f"story video: {out_dir / manifest['final']['video']} ({manifest['final']['frames']} frames); "
               f"storyboard: {out_dir / manifest['final']['storyboard']}; manifest: {out_dir / 'render.json'}")



# --------------------------------------------------------------------------- bench (issue 5)

@main.command()
@click.option("--precision", type=click.Choice(["bf16", "fp8", "both"]), default="both", show_default=True,
              help="Which fast paths to time (fp8 alone still runs one bf16 forward for its error).")
@click.option("--memory-frames", type=click.IntRange(0), default=DEFAULT_MAX_MEMORY, show_default=True)
@click.option("--size", default=format_size(DEFAULT_SIZE), show_default=True, help="WIDTH*HEIGHT of the shot.")
@click.option("--frame-num", type=click.IntRange(5), default=DEFAULT_FRAME_NUM, show_default=True)
@click.option("--layers", type=click.IntRange(1, 40), default=40, show_default=True,
              help="Blocks of the expert (40 is A14B; fewer for quick iteration).")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed calls per row (median).")
@click.option("--peer", type=click.Choice(["none", "diffusers"]), default="none", show_default=True,
              help="Also time diffusers' WanTransformer3DModel with the same weights, eager and regionally compiled.")
@click.option("--full-shot", is_flag=True, help="Also time a whole shot: both experts, CFG, --steps, VAE decode.")
@click.option("--steps", type=click.IntRange(1), default=40, show_default=True)
@click.option("--preview", is_flag=True, help="--full-shot as render --preview samples: 4 distilled steps, no CFG.")
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Time the plain WanDiT too.")
@click.option("--eager/--no-eager", default=True, show_default=True, help="Time the fast path uncompiled too.")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="Regional torch.compile of the block.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True)
@click.option("--fp8-attention", multiple=True, default=("auto", "int8-int8", "int8-fp8"), show_default=True,
              type=click.Choice(["auto", "cudnn", "triton", "int8-int8", "int8-fp8", "int8"]),
              help="Self-attention variants timed with FP8 GEMMs (repeat the option).")
@click.option("--cfg", "cfg_modes", multiple=True, default=("batched", "sequential"), show_default=True,
              type=click.Choice(["batched", "sequential"]), help="CFG modes timed (repeat the option).")
@click.option("--fast-accum/--no-fast-accum", default=True, show_default=True,
              help="FP8 GEMMs with Hopper's fast accumulation.")
@click.option("--ops", type=click.Choice(["auto", "kernels", "torch"]), default="auto", show_default=True,
              help="Fused kernels or plain torch for norms/RoPE/residuals (auto: kernels eager, torch compiled).")
@click.option("--gelu-epilogue/--no-gelu-epilogue", default=True, show_default=True,
              help="bf16: the FFN's GELU in cuBLASLt's GEMM epilogue instead of a separate kernel.")
@click.option("--memory-plan/--no-memory-plan", default=True, show_default=True,
              help="Both FP8 experts + VAE resident: peak memory, VAE decode time.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the JSON (default $OUT/bench.json when $OUT is set).")
@click.option("--time-budget", type=float, default=520.0, show_default=True,
              help="Seconds after which the remaining stages are skipped (and reported).")
@click.option("--profile", is_flag=True, help="Print the top CUDA kernels of one forward of each fast path.")
@click.option("--seed", type=int, default=0, show_default=True)
def bench(precision, memory_frames, size, frame_num, layers, repeats, peer, full_shot, steps, preview, baseline, eager,
          compile_, cuda_graph, fp8_attention, cfg_modes, fast_accum, ops, gelu_epilogue, memory_plan, json_path,
          time_budget, profile, seed) -> None:
    """Time the fast path on a real-size A14B expert (random weights made on the GPU) against
    float32 for correctness and diffusers for speed; prints one table, writes JSON."""
    from .benchmarks.dit import BenchArgs, run

    if (frame_num - 1) % 4:
        raise click.BadParameter(f"--frame-num must be 4n+1, got {frame_num}")
    args = BenchArgs(precision=precision, memory_frames=memory_frames, size=_parse_size(size), frame_num=frame_num,
                     layers=layers, repeats=repeats, peer=peer, baseline=baseline, eager=eager, compile=compile_,
                     cuda_graph=cuda_graph, fp8_attention=tuple(fp8_attention), cfg=tuple(cfg_modes),
                     fast_accum=fast_accum, ops=ops, memory_plan=memory_plan, full_shot=full_shot, steps=steps, seed=seed,
                     json_path=None if json_path is None else str(json_path), time_budget_s=time_budget, preview=preview,
                     profile=profile, gelu_epilogue=gelu_epilogue)
    try:
        run(args)
    except RuntimeError as e:
        if "needs a CUDA GPU" in str(e):
            raise click.ClickException(str(e)) from None
        raise


# --------------------------------------------------------------------------- build-engines, doctor (issue 4)

@main.command("build-engines")
@click.option("--models", default="tiny", show_default=True,
              help="'tiny' (the embedded tiny bundle) or a folder holding Wan2.2-I2V-A14B/ (and Wan2.2-T2V-A14B/, "
                   "StoryMem/).")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="Folder with backbone_{high,low}_noise.pth (default: MODELS/StoryMem/Wan2.2-MI2V-A14B).")
@click.option("--lora-rank", type=click.IntRange(1), default=None, help="LoRA rank, alpha = rank (default: from the file).")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp8", "fp32"]), default="bf16", show_default=True,
              help="fp8: e4m3 block-linear weights, bf16 compute.")
@click.option("--size", default=format_size(DEFAULT_SIZE), show_default=True,
              help="WIDTH*HEIGHT the engines are shaped for.")
@click.option("--frame-num", type=click.IntRange(1), default=DEFAULT_FRAME_NUM, show_default=True,
              help="Frames per shot, 4n+1.")
@click.option("--max-memory-size", type=click.IntRange(0), default=DEFAULT_MAX_MEMORY, show_default=True,
              help="Engines serve every memory size 0..this.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("engines"), show_default=True)
@click.option("--backend", type=click.Choice(["torch", "tensorrt", "onnx", "all"]), default="torch", show_default=True,
              help="torch: compile caches; onnx: ONNX graphs; tensorrt: ONNX + TensorRT engines; all: every one.")
@click.option("--kind", type=click.Choice(["m2v", "t2v"]), default="m2v", show_default=True,
              help="m2v: the I2V experts with the StoryMem LoRA merged; t2v: the T2V experts.")
@click.option("--expert", type=click.Choice(["both", "high", "low"]), default="both", show_default=True)
@click.option("--torch-mode", type=click.Choice(["cache", "aoti"]), default="cache", show_default=True,
              help="cache: Inductor/Triton compile caches; aoti: AOTInductor packages (weights inside).")
@click.option("--torch-buckets", default=None, metavar="SPEC",
              help="Memory-size buckets compiled for the torch backend, e.g. '10,0-9' (default: max static + "
                   "0..max-1 dynamic).")
@click.option("--device", default=None, help="Device the torch backend compiles for (default: cuda if available).")
@click.option("--weakly-typed", is_flag=True, help="TensorRT: let the builder choose precisions (BF16/FP16/FP8 flags) "
              "instead of the graph's types.")
@click.option("--workspace-gib", type=float, default=None, help="TensorRT builder workspace limit.")
def build_engines_cmd(models, lora, lora_rank, precision, size, frame_num, max_memory_size, out_dir, backend, kind,
                      expert, torch_mode, torch_buckets, device, weakly_typed, workspace_gib) -> None:
    """Turn upstream checkpoints into what `render` loads fast: the LoRA merged into the I2V
    experts, FP8 weights, ONNX graphs, TensorRT engines, torch compile caches, and
    OUT/manifest.json. Re-running with the same inputs is a no-op."""
    from .engines.manifest import BuildSpec
    from .export.build import Builder

    w_h = _parse_size(size)
    if (frame_num - 1) % 4:
        raise click.BadParameter(f"{frame_num} is not 4n+1 (e.g. 81)", param_hint="--frame-num")
    if torch_buckets:
        from .engines.loaders import parse_buckets

        try:
            parse_buckets(torch_buckets, max_memory_size)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--torch-buckets") from None
    spec = BuildSpec(models=str(models), lora=None if lora is None else str(lora), precision=precision, size=w_h,
                     frame_num=frame_num, max_memory_size=max_memory_size, out=str(out_dir), backend=backend,
                     kind=kind, lora_rank=lora_rank)
    experts = ("high", "low") if expert == "both" else (expert,)
    builder = Builder(spec, experts=experts, torch_buckets=torch_buckets, torch_mode=torch_mode, device=device,
                      strongly_typed=not weakly_typed, workspace_gib=workspace_gib,
                      echo=lambda msg: click.echo(msg, err=True))
    report = builder.run()
    for line in report.lines():
        click.echo(line)
    click.echo(f"manifest: {out_dir / 'manifest.json'} ({len(report.built)} built, {len(report.reused)} up to date)")


@main.command()
@click.option("--engines", type=click.Path(path_type=Path), default=Path("engines"), show_default=True,
              help="Engines folder to inspect.")
def doctor(engines: Path) -> None:
    """Print the tools, the GPU and the engines present here, and whether each engine is usable."""
    from .export.doctor import report

    for line in report(engines):
        click.echo(line)


if __name__ == "__main__":
    main()
