"""The `storymem-rt` command line.

Layout: shared machinery (errors, logging, option groups) first, then one section per
command. Commands import heavy modules (torch, the model stack) inside their bodies, so
`storymem-rt --help` and `storymem-rt validate` start without loading torch.

Errors: a `StoryError` escaping any command becomes one line and exit 2 (the user must fix
the script, like a usage error); any other `StoryMemError` one line and exit 1. Commands do
not catch them themselves.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__
from .errors import StoryError, StoryMemError
from .script import SEED_POLICIES, MAX_SEED, MODES, PlanSettings, PlannedShot, load_story

LOGGER = "storymem_rt"


# --------------------------------------------------------------------------- errors and logging

class StoryFileError(click.ClickException):
    """A broken story script: printed as one `Error: ...` line (no usage banner), exit 2."""

    exit_code = 2


class _EchoHandler(logging.Handler):
    """Writes records through click.echo at emit time, so the stream is whatever stderr is
    then (CliRunner swaps it), and colours and encodings follow click's rules."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
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


class _Group(click.Group):
    """Turns our user-facing exceptions into click's, so no command prints a traceback for them."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoryError as e:
            raise StoryFileError(str(e)) from None
        except StoryMemError as e:
            raise click.ClickException(str(e)) from None


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


def make_plan(plan: PlanSettings, story) -> list[PlannedShot]:
    try:
        return plan.plan(story)
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
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@main.command()
@click.argument("story", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='Print the plan as JSON: {"shots": [{"scene", "shot", '
              '"mode", "seed", "cut", "prompt"}, ...]}.')
@plan_options
def validate(story: Path, as_json: bool, plan: PlanSettings) -> None:
    """Check STORY (a story script, ST-Bench schema) and print its shot plan. Writes nothing."""
    s = load_story(story)
    shots = make_plan(plan, s)
    if as_json:
        click.echo(json.dumps({"shots": [shot.to_json() for shot in shots]}, indent=2, ensure_ascii=False))
        return
    n_scenes = len(s.scenes)
    click.echo(f"{story}: {json.dumps(s.name, ensure_ascii=False)}: {n_scenes} scene{'s' * (n_scenes != 1)}, "
               f"{len(shots)} shot{'s' * (len(shots) != 1)}")
    seed_w = max(4, *(len(str(shot.seed)) for shot in shots))
    id_w = max(4, *(len(shot.id) for shot in shots))
    click.echo(f"  {'shot':<{id_w}}  mode  {'seed':>{seed_w}}  cut  prompt")
    for shot in shots:
        click.echo(f"  {shot.id:<{id_w}}  {shot.mode:<4}  {shot.seed:>{seed_w}}  {'yes' if shot.cut else 'no ':<3}  "
                   f"{_head(shot.prompt, 64)}")
    counts = ", ".join(f"{m} {n}" for m in MODES if (n := sum(shot.mode == m for shot in shots)))
    click.echo(f"ok: {counts}")


if __name__ == "__main__":
    main()
