"""`dppo-megatron preflight`: prove a recipe's servers, weight sync and numerics in minutes,
before its long job (run/preflight.py says what runs and what is checked).

    dppo-megatron preflight recipes/tiny/quickstart.yaml          # on this machine
    dppo-megatron submit --preflight recipes/qwen3-30b-a3b/...    # a short job with the recipe's layout
    dppo-megatron preflight --verdict RUN_DIR                     # the table again (the job prints it too)

Exit code 0 when every check passed, 1 when one failed, 2 for a recipe refused before anything ran."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dppo_megatron.commands.args import EXIT_INVALID, add_recipe_arguments, recipe_and_overrides, refuse
from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.validate import load_recipe
from dppo_megatron.model.arch import ArchError
from dppo_megatron.run.preflight import Thresholds, checks, preflight_overrides, verdict_table
from dppo_megatron.run.run_dir import RECIPE_FILE, new_run_dir

DEFAULT_PROMPTS = 8
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_PROBE_LR = 1e-4


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "preflight", help="two short steps with the recipe's real servers and weight sync, then a verdict",
        description="Start the recipe's rollout servers with its real command lines, check their SGLang release, "
                    "generate for a few prompts, compare the servers' logprobs with the learner's on the same "
                    "tokens, send the learner's weights by the recipe's sync method inside SGLang's weight-update "
                    "session, compare again, check R3 routes, and print a verdict table. On a cluster: dppo-megatron "
                    "submit --preflight RECIPE.")
    add_recipe_arguments(p, optional=True)
    add_preflight_arguments(p)
    p.add_argument("--run-dir", help="the preflight's run directory (default runs/<name>-preflight-<timestamp>)")
    p.add_argument("--verdict", type=Path, metavar="RUN_DIR",
                   help="print the verdict of the preflight that ran in RUN_DIR (its job does this), run nothing")
    p.set_defaults(handler=_preflight)


def add_preflight_arguments(p) -> None:
    defaults = Thresholds()
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="prompts per step (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="response length cap, below the recipe's (default %(default)s)")
    p.add_argument("--probe-lr", type=float, default=DEFAULT_PROBE_LR,
                   help="learning rate of step 0 (at least the recipe's): large enough that a server left on the "
                        "old weights shows in step 1 (default %(default)s)")
    p.add_argument("--max-mismatch", type=float, default=defaults.max_mismatch,
                   help="largest train/mismatch_tv accepted (default %(default)s)")
    p.add_argument("--min-routing-agreement", type=float, default=defaults.min_routing_agreement,
                   help="R3: smallest train/routing_agreement accepted (default %(default)s)")


def preflight_recipe_overrides(recipe_path, overrides: list[str], args) -> list[str]:
    """The user's overrides, then the preflight's (which win)."""
    if args.prompts < 1 or args.max_new_tokens < 1 or args.probe_lr <= 0:
        raise RecipeError(["preflight: --prompts and --max-new-tokens must be >= 1, --probe-lr > 0"])
    recipe = load_recipe(recipe_path, overrides)
    return overrides + preflight_overrides(recipe, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                                           probe_lr=args.probe_lr)


def verdict_command(args) -> str:
    """The verdict step of a preflight job (launch/slurm/job.sbatch's {{verdict}})."""
    return (f'"$PYTHON" -m dppo_megatron preflight --verdict "$RUN_DIR" --max-mismatch {args.max_mismatch!r} '
            f'--min-routing-agreement {args.min_routing_agreement!r}; exit $?')


def _preflight(args) -> int:
    thresholds = Thresholds(max_mismatch=args.max_mismatch, min_routing_agreement=args.min_routing_agreement)
    if args.verdict is not None:
        return _verdict(args.verdict, thresholds)
    recipe_path, overrides = recipe_and_overrides(args)
    if recipe_path is None:
        return EXIT_INVALID
    try:
        overrides = preflight_recipe_overrides(recipe_path, overrides, args)
        recipe = load_recipe(recipe_path, overrides, check_files=True)
    except (RecipeError, ArchError) as error:
        return refuse(error)
    if recipe.learner.nodes > 1 or recipe.rollout.nodes > 0:
        print(f"error: the recipe spans {recipe.learner.nodes + recipe.rollout.nodes} nodes; run its preflight as a "
              f"job with its layout: dppo-megatron submit --preflight {recipe_path}", file=sys.stderr)
        return EXIT_INVALID
    from dppo_megatron.commands.train import _train

    run_dir = Path(args.run_dir or new_run_dir(recipe, "preflight"))
    code = _train(argparse.Namespace(recipe=str(recipe_path), overrides=overrides, run_dir=str(run_dir),
                                     resume=False))
    if code == EXIT_INVALID and not (run_dir / RECIPE_FILE).is_file():
        return code  # refused before anything started; train said why
    return _verdict(run_dir, thresholds)


def _verdict(run_dir: Path, thresholds: Thresholds) -> int:
    if not (run_dir / RECIPE_FILE).is_file():
        print(f"error: {run_dir} holds no run (no {RECIPE_FILE})", file=sys.stderr)
        return EXIT_INVALID
    found = checks(load_recipe(run_dir / RECIPE_FILE), run_dir, thresholds)
    print(f"\npreflight of {run_dir}:\n" + verdict_table(found), flush=True)
    return 0 if all(check.passed for check in found) else 1
