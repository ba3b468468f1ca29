"""A recipe as a SLURM job (`dppo-megatron submit`): the checks against the job and the cluster,
and the job script.

The recipe is checked, then checked against the job (GPUs per node, node count) and, where
`sinfo` answers, against the cluster (the partition exists, has the nodes and the GPUs), all
before `sbatch` runs. The job script is rendered from `launch/slurm/job.sbatch` into
`RUN_DIR/slurm/job.sbatch`: learners run under srun + torchrun on the first nodes, each server
node runs a `serve-node` agent, and the trainer finds its servers in the layout the script
writes from SLURM's node list. The script asks SLURM for USR1 before the time limit; the trainer
then checkpoints and exits, and the job requeues itself and resumes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dppo_megatron.config.placement import job_nodes, rank_coordinates, server_placements
from dppo_megatron.config.schema import Recipe
from dppo_megatron.rollout.servers import server_command
from dppo_megatron.run.placement import server_specs

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "job.sbatch"
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
    if rollout.engine == "sglang" and not rollout.colocate:  # colocated servers take the learner's GPUs
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


def render(recipe: Recipe, run_dir: Path, *, workdir: Path, template: Path | None = None,
           verdict: str | None = None) -> str:
    """The job script. `verdict`: a preflight job's last command (its exit code is the job's)."""
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
        "verdict": verdict or "# not a preflight",
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
