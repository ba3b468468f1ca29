"""The commands a job runs for itself (the SLURM job script, `train`'s launcher), and `status`:

- `dppo-megatron run-rank RUN_DIR [--job-layout F]`: one rank of the trainer (started by torchrun,
  srun or `dppo-megatron train`);
- `dppo-megatron job-layout RUN_DIR --out F NODE...`: a cluster job's layout from SLURM's node
  names, printed as shell variables;
- `dppo-megatron status RUN_DIR [--shell]`: how a run stands (state, step, message)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

from dppo_megatron.commands.args import EXIT_INVALID, refuse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run-rank", help="one rank of the trainer (started by train, torchrun or srun)",
                              description="One learner rank of the run in RUN_DIR, with the launcher's environment "
                                          "(RANK, WORLD_SIZE, MASTER_ADDR, ...).")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--job-layout", type=Path, help="a cluster job's layout: its node agents run the servers")
    p.set_defaults(handler=_run_rank)

    p = subparsers.add_parser("job-layout", help="a cluster job's layout from its node names (job scripts)",
                              description="Write the layout of the run's job on NODES (in the job's order) to OUT "
                                          "and print it as shell variables.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="where to write the layout (JSON)")
    p.add_argument("nodes", nargs="+", help="the job's node names, in the job's order")
    p.set_defaults(handler=_job_layout)

    p = subparsers.add_parser("status", help="how a run stands: state, step, message")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--shell", action="store_true",
                   help="as shell variables RUN_STATE, RUN_STEP, RUN_TOTAL_STEPS, RUN_MESSAGE (for job scripts)")
    p.set_defaults(handler=_status)


def _run_rank(args) -> int:
    import torch.distributed as dist

    from dppo_megatron.run.loop import train
    from dppo_megatron.run.server_keeper import ServersLost

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return train(args.run_dir, args.job_layout)
    except ServersLost as error:  # explained, and the step saved: a line, not a traceback per rank
        if rank == "0":
            print(f"error: rollout servers lost: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _quiet_libraries() -> None:
    """Megatron's setup chatter and the deprecation notices of its own calls are not news to a
    user watching the progress lines; our warnings and errors still show."""
    import warnings

    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron\.)")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")


def _job_layout(args) -> int:
    from dppo_megatron.config.loading import RecipeError
    from dppo_megatron.config.validate import load_recipe
    from dppo_megatron.run.placement import PlacementError, job_layout
    from dppo_megatron.run.run_dir import RECIPE_FILE

    try:
        layout = job_layout(load_recipe(args.run_dir / RECIPE_FILE), args.run_dir, args.nodes)
    except (RecipeError, PlacementError) as error:
        return refuse(error)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    layout.save(args.out)
    values = {"LEARNER_NODES": ",".join(layout.learner_nodes), "NUM_LEARNER_NODES": len(layout.learner_nodes),
              "SERVER_NODES": ",".join(layout.server_nodes), "NUM_SERVER_NODES": len(layout.server_nodes),
              "MASTER_ADDR": layout.master_addr, "MASTER_PORT": layout.master_port}
    for name, value in values.items():
        print(f"{name}={shlex.quote(str(value))}")
    return 0


def _status(args) -> int:
    """RUN_STATE is `unknown` before the trainer has written any status."""
    from dppo_megatron.run.run_dir import read_status

    if not args.shell and not args.run_dir.is_dir():
        print(f"error: no run directory {args.run_dir}", file=sys.stderr)
        return EXIT_INVALID
    status = read_status(args.run_dir) or {"state": "unknown", "step": 0, "total_steps": 0, "message": ""}
    if args.shell:
        for name in ("state", "step", "total_steps", "message"):
            print(f"RUN_{name.upper()}={shlex.quote(str(status[name]))}")
    else:
        print(json.dumps(status, indent=2))
    return 0
