"""`dppo-megatron submit`: a recipe becomes a SLURM job.

The recipe is checked, then checked against the job (GPUs per node, node count) and, where
`sinfo` answers, against the cluster (the partition exists, has the nodes and the GPUs), all
before `sbatch` runs. The job script (run/slurm.py) goes into `RUN_DIR/slurm/job.sbatch`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dppo_megatron.commands.args import EXIT_INVALID, add_recipe_arguments, recipe_and_overrides, refuse
from dppo_megatron.commands.preflight import add_preflight_arguments, preflight_recipe_overrides, verdict_command
from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.placement import job_nodes
from dppo_megatron.config.validate import check, load_recipe
from dppo_megatron.model.arch import ArchError
from dppo_megatron.run.run_dir import new_run_dir, prepare_run_dir, with_run_dir
from dppo_megatron.run.slurm import (SubmitError, cluster_partitions, cluster_problems, describe_job, job_problems,
                                     render)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="submit a recipe as a SLURM job",
        description="Check a recipe against the job and the cluster, render its sbatch script into the run "
                    "directory and submit it: dppo-megatron submit recipes/qwen3-30b-a3b/dppo-binary-tv.yaml "
                    "rollout.r3=true --partition gpu --time 2-00:00:00",
    )
    add_recipe_arguments(p, optional=True)
    p.add_argument("--dry-run", action="store_true", help="print the script and the layout; submit nothing")
    p.add_argument("--nodes", type=int, help="nodes of the job (checked against learner.nodes + rollout.nodes)")
    p.add_argument("--partition", help="SLURM partition (slurm.partition)")
    p.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00 (slurm.time)")
    p.add_argument("--account", help="account to charge (slurm.account)")
    p.add_argument("--run-dir", help="run directory (default runs/<name>-<timestamp>); an existing run resumes")
    p.add_argument("--preflight", action="store_true",
                   help="submit the recipe's preflight instead (two short steps with its real layout, servers and "
                        "weight sync, then a verdict table in the job log; exit code 0 when it passed)")
    add_preflight_arguments(p)
    p.set_defaults(handler=_submit)



PREFLIGHT_TIME = "00:30:00"  # a preflight job's limit unless --time says otherwise


def _submit(args) -> int:
    recipe_path, overrides = recipe_and_overrides(args)
    if recipe_path is None:
        return EXIT_INVALID
    # Quoted: overrides are YAML, and `--time 30` means the string "30" (minutes), not a number.
    overrides += [f"slurm.{key}={json.dumps(value)}" for key, value in
                  (("partition", args.partition), ("time", args.time), ("account", args.account)) if value is not None]
    try:
        if args.preflight:  # minutes, not days; never requeued
            overrides = preflight_recipe_overrides(recipe_path, overrides, args) + ["slurm.requeue=false"]
            if args.time is None:
                overrides.append(f"slurm.time={json.dumps(PREFLIGHT_TIME)}")
        recipe = load_recipe(recipe_path, overrides)
        problems = job_problems(recipe, args.nodes)
        # The files the job reads must be there (on a filesystem the nodes share); a dry run
        # only says what a submit would refuse.
        file_problems = check(recipe, check_files=True)
        if not args.dry_run:
            problems += file_problems
        partitions, unchecked = cluster_partitions()
        if partitions is not None:
            problems += cluster_problems(recipe, partitions)
        elif not args.dry_run:
            problems.append(f"no SLURM cluster to submit to: {unchecked}")
        if problems:
            raise SubmitError(problems)
        default_dir = new_run_dir(recipe, "preflight") if args.preflight else recipe.trainer.run_dir or new_run_dir(recipe)
        run_dir = Path(args.run_dir or default_dir).resolve()
        recipe = with_run_dir(recipe, run_dir)
        script = render(recipe, run_dir, workdir=Path.cwd(), verdict=verdict_command(args) if args.preflight else None)
    except (RecipeError, ArchError, SubmitError) as error:
        return refuse(error)
    if args.dry_run:
        print(script)
        print(describe_job(recipe, run_dir))
        if partitions is None:
            print(f"(the partition, its nodes and GPUs were not checked: {unchecked})")
        for problem in file_problems:
            print(f"(submit would refuse this here: {problem})")
        return 0

    prepare_run_dir(recipe, run_dir)
    script_path = run_dir / "slurm" / "job.sbatch"
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    script_path.chmod(0o755)
    result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        print(f"error: sbatch refused the job: {result.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = result.stdout.strip().split(";")[0]
    with (run_dir / "slurm" / "jobs.txt").open("a") as jobs:
        jobs.write(f"{job_id} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    print(f"submitted job {job_id}: {recipe.name} on {job_nodes(recipe)} node(s)\n"
          f"  run directory  {run_dir}\n"
          f"  job log        {run_dir / 'slurm' / f'job-{job_id}.out'}\n"
          f"  server logs    {run_dir / 'logs'}/\n"
          f"  metrics        {run_dir / 'metrics.jsonl'}  (status: {run_dir / 'status.json'})\n"
          f"  watch          squeue -j {job_id}; tail -f {run_dir / 'slurm' / f'job-{job_id}.out'}\n"
          f"  stop           scancel --signal=USR1 --batch {job_id}  (checkpoint, then "
          f"{'requeue' if recipe.slurm.requeue else 'exit'})")
    return 0
