"""`dppo-megatron submit`: a recipe becomes a SLURM job.

The recipe is checked, then checked against the job (GPUs per node, node count) and, where
`sinfo` answers, against the cluster (the partition exists, has the nodes and the GPUs), all
before `sbatch` runs. The job script is rendered from `launch/slurm/job.sbatch` into
`RUN_DIR/slurm/job.sbatch`: learners run under srun + torchrun on the first nodes, each server
node runs a `serve-node` agent, and the trainer finds its servers in the layout the script
writes from SLURM's node list. The script asks SLURM for USR1 before the time limit; the trainer
then checkpoints and exits, and the job requeues itself and resumes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import check, load_recipe, rank_coordinates
from dppo_megatron.convert.qwen3_arch import ArchError
from dppo_megatron.placement import job_nodes, server_placements, server_specs
from dppo_megatron.rollout.servers import server_command
from dppo_megatron.run_dir import RECIPE_FILE

EXIT_INVALID = 2
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "job.sbatch"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(ValueError):
    """The job cannot run as asked; `problems` says why, each naming the setting."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the job is refused:\n" + "\n".join(f"  - {p}" for p in problems))


# --- checks -----------------------------------------------------------------------------------


def job_problems(recipe: Recipe, nodes: int | None = None) -> list[str]:
    """What the recipe asks of each node against what the job asks SLURM for."""
    slurm, learner, rollout = recipe.slurm, recipe.learner, recipe.rollout
    problems = []
    if nodes is not None and nodes != job_nodes(recipe):
        problems.append(f"--nodes {nodes}: the recipe lays out {job_nodes(recipe)} node(s) (learner.nodes "
                        f"{learner.nodes} + rollout.nodes {rollout.nodes}); change those instead")
    gpus = slurm.gpus_per_node
    if gpus == 0:
        if rollout.engine == "sglang":
            problems.append("slurm.gpus_per_node is 0 (a CPU job), but rollout.engine sglang needs GPUs: "
                            "ask for GPUs, or use rollout.engine=embedded")
        return problems
    if learner.ranks_per_node > gpus:
        problems.append(f"learner.ranks_per_node: {learner.ranks_per_node} ranks need as many GPUs on each "
                        f"learner node; slurm.gpus_per_node asks for {gpus}")
    if rollout.engine == "sglang":
        if rollout.nodes == 0:
            used = learner.ranks_per_node + rollout.gpus_per_node
            if used > gpus:
                problems.append(f"rollout.gpus_per_node: the learner's {learner.ranks_per_node} GPUs + "
                                f"{rollout.gpus_per_node} for servers = {used} GPUs on each learner node; "
                                f"slurm.gpus_per_node asks for {gpus}")
        elif rollout.gpus_per_node > gpus:
            problems.append(f"rollout.gpus_per_node: {rollout.gpus_per_node} GPUs on each rollout node; "
                            f"slurm.gpus_per_node asks for {gpus}")
    return problems


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    nodes: int
    gpus_per_node: int  # the most on any of its nodes (0: none)


def cluster_partitions() -> tuple[list[Partition] | None, str]:
    """The cluster's partitions from `sinfo`; (None, why) where there is no SLURM to ask."""
    if shutil.which("sinfo") is None:
        return None, "sinfo is not installed here"
    result = subprocess.run(["sinfo", "--noheader", "--format=%P|%D|%G"], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"sinfo failed: {last}"
    merged: dict[str, Partition] = {}
    for line in result.stdout.splitlines():
        name, count, gres = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = max((int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres)), default=0)
        old = merged.get(name)
        merged[name] = Partition(name, default or (old is not None and old.default),
                                 int(count) + (old.nodes if old else 0), max(gpus, old.gpus_per_node if old else 0))
    return list(merged.values()), ""


def cluster_problems(recipe: Recipe, partitions: list[Partition]) -> list[str]:
    slurm = recipe.slurm
    names = ", ".join(p.name + ("*" if p.default else "") for p in partitions) or "none"
    if slurm.partition is None:
        chosen = next((p for p in partitions if p.default), None)
        if chosen is None:
            return [f"slurm.partition: this cluster has no default partition; give --partition (partitions: {names})"]
    else:
        chosen = next((p for p in partitions if p.name == slurm.partition), None)
        if chosen is None:
            return [f"slurm.partition: no partition {slurm.partition!r} on this cluster (partitions: {names})"]
    problems = []
    if job_nodes(recipe) > chosen.nodes:
        problems.append(f"the job needs {job_nodes(recipe)} nodes (learner.nodes {recipe.learner.nodes} + "
                        f"rollout.nodes {recipe.rollout.nodes}); partition {chosen.name} has {chosen.nodes}")
    if slurm.gpus_per_node > chosen.gpus_per_node:
        problems.append(f"slurm.gpus_per_node: {slurm.gpus_per_node} GPUs per node asked; the nodes of partition "
                        f"{chosen.name} have {chosen.gpus_per_node or 'no'} GPUs"
                        + ("; slurm.gpus_per_node=0 makes a CPU job" if chosen.gpus_per_node == 0 else ""))
    return problems


# --- the script -------------------------------------------------------------------------------


def sbatch_directives(recipe: Recipe, run_dir: Path) -> list[str]:
    slurm = recipe.slurm
    options = [f"--job-name=dppo-{recipe.name}", f"--nodes={job_nodes(recipe)}", "--ntasks-per-node=1",
               f"--output={run_dir / 'slurm' / 'job-%j.out'}", "--open-mode=append"]
    if slurm.gpus_per_node:
        options.append(f"--gpus-per-node={slurm.gpus_per_node}")
    if slurm.cpus_per_node:
        options.append(f"--cpus-per-task={slurm.cpus_per_node}")
    if slurm.exclusive:
        options.append("--exclusive")
    for flag, value in (("partition", slurm.partition), ("account", slurm.account), ("time", slurm.time)):
        if value is not None:
            options.append(f"--{flag}={value}")
    if slurm.signal_seconds:
        options.append(f"--signal=B:USR1@{slurm.signal_seconds}")
    options.append("--requeue" if slurm.requeue else "--no-requeue")
    options += slurm.sbatch_args
    return [f"#SBATCH {option}" for option in options]


def render(recipe: Recipe, run_dir: Path, *, workdir: Path, template: Path | None = None) -> str:
    slurm = recipe.slurm
    template = Path(template or slurm.template or DEFAULT_TEMPLATE)
    if not template.is_file():
        raise SubmitError([f"slurm.template: no sbatch template at {template} (the default lives in launch/slurm/ "
                           "of a source checkout: install with `pip install -e .`, or set slurm.template)"])
    values = {
        "script": shlex.quote(str(run_dir / "slurm" / "job.sbatch")),
        "directives": "\n".join(sbatch_directives(recipe, run_dir)),
        "run_dir": shlex.quote(str(run_dir)),
        "python": shlex.quote(slurm.python or sys.executable),
        "workdir": shlex.quote(str(workdir)),
        "environment": "\n".join(f"export {name}={shlex.quote(value)}" for name, value in slurm.env.items())
                       or "# slurm.env: none",
        "setup": "\n".join(slurm.setup) or "# slurm.setup: none",
        "ranks_per_node": str(recipe.learner.ranks_per_node),
        "step_gpus": f"--gpus-per-node={slurm.gpus_per_node}" if slurm.gpus_per_node else "",
        "requeue": "true" if slurm.requeue else "false",
    }
    text = template.read_text()
    unknown = sorted(set(PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise SubmitError([f"slurm.template: {template} has unknown placeholders {unknown}; known: {sorted(values)}"])
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def describe_job(recipe: Recipe, run_dir: Path) -> str:
    """The job's layout in node indices (the names come from SLURM when it runs), with each
    server's command line."""
    learner, rollout, slurm = recipe.learner, recipe.rollout, recipe.slurm
    lines = [f"# job: {job_nodes(recipe)} node(s), {slurm.gpus_per_node} GPU(s) per node"
             + (f", partition {slurm.partition}" if slurm.partition else "") + (f", time {slurm.time}" if slurm.time else "")]
    ranks = rank_coordinates(recipe)
    for node in range(learner.nodes):
        mine = [r["rank"] for r in ranks if r["node"] == node]
        gpus = f", GPUs 0-{learner.ranks_per_node - 1}" if slurm.gpus_per_node else ""
        lines.append(f"node {node}: learner ranks {mine[0]}-{mine[-1]} (torchrun, {learner.ranks_per_node} per node"
                     f"{gpus}; TP {learner.tp} PP {learner.pp} EP {learner.ep})")
    for placement, spec in zip(server_placements(recipe), server_specs(recipe, run_dir)):
        node = (learner.nodes if rollout.nodes else 0) + placement.node
        devices = f"CUDA_VISIBLE_DEVICES={','.join(map(str, spec.gpus))} " if spec.gpus else ""
        lines.append(f"node {node}: server {placement.index}: {devices}{shlex.join(server_command(spec))}")
    lines.append(f"stop and requeue: USR1 {slurm.signal_seconds}s before the time limit -> checkpoint -> "
                 + ("requeue (resumes by itself)" if slurm.requeue else "exit"))
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="submit a recipe as a SLURM job",
        description="Check a recipe against the job and the cluster, render its sbatch script into the run "
                    "directory and submit it: dppo-megatron submit recipes/qwen3-30b-a3b/dppo-binary-tv.yaml "
                    "rollout.r3=true --partition gpu --time 2-00:00:00",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (default with --run-dir: the run's own recipe.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rollout.r3=true")
    p.add_argument("--dry-run", action="store_true", help="print the script and the layout; submit nothing")
    p.add_argument("--nodes", type=int, help="nodes of the job (checked against learner.nodes + rollout.nodes)")
    p.add_argument("--partition", help="SLURM partition (slurm.partition)")
    p.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00 (slurm.time)")
    p.add_argument("--account", help="account to charge (slurm.account)")
    p.add_argument("--run-dir", help="run directory (default runs/<name>-<timestamp>); an existing run resumes")
    p.set_defaults(handler=_submit)


def _submit(args) -> int:
    from dppo_megatron.train_command import prepare_run_dir

    overrides = list(args.overrides)
    recipe_path = args.recipe
    if recipe_path and "=" in recipe_path and not Path(recipe_path).exists():
        overrides.insert(0, recipe_path)
        recipe_path = None
    if recipe_path is None:
        if args.run_dir is None or not (Path(args.run_dir) / RECIPE_FILE).is_file():
            print("error: give a recipe, or --run-dir of an existing run", file=sys.stderr)
            return EXIT_INVALID
        recipe_path = Path(args.run_dir) / RECIPE_FILE
    # Quoted: overrides are YAML, and `--time 30` means the string "30" (minutes), not a number.
    overrides += [f"slurm.{key}={json.dumps(value)}" for key, value in
                  (("partition", args.partition), ("time", args.time), ("account", args.account)) if value is not None]
    try:
        recipe = load_recipe(recipe_path, overrides)
        problems = job_problems(recipe, args.nodes)
        if not args.dry_run:  # the files the job reads must be there (on a filesystem the nodes share)
            problems += check(recipe, check_files=True)
        partitions, unchecked = cluster_partitions()
        if partitions is not None:
            problems += cluster_problems(recipe, partitions)
        elif not args.dry_run:
            problems.append(f"no SLURM cluster to submit to: {unchecked}")
        if problems:
            raise SubmitError(problems)
        run_dir = Path(args.run_dir or recipe.trainer.run_dir or
                       Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        recipe = load_recipe(recipe_path, overrides + [f"trainer.run_dir={run_dir}"])
        script = render(recipe, run_dir, workdir=Path.cwd())
    except (RecipeError, ArchError, SubmitError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    if args.dry_run:
        print(script)
        print(describe_job(recipe, run_dir))
        if partitions is None:
            print(f"(the partition, its nodes and GPUs were not checked: {unchecked})")
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
