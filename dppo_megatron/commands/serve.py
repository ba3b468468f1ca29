"""`dppo-megatron serve-embedded` (the CPU engine behind SGLang's HTTP protocol) and
`dppo-megatron serve-node` (a cluster job's rollout servers on one node, under their agent)."""

from __future__ import annotations

import logging
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve-embedded", help="serve a HF model behind SGLang's HTTP protocol (CPU engine)")
    p.add_argument("--model-path", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float8"], default="float32",
                   help="float8: the blocks' linear weights quantised to e4m3 per output channel, as FP8 rollouts "
                        "serve them; float32 arithmetic")
    p.add_argument("--seed", type=int, default=0, help="seed of requests without sampling_seed")
    p.add_argument("--api-key-file", help="YAML file (mode 0600) with `api-key` and optionally `admin-api-key`, "
                                          "asked of every request as SGLang does; needed on any interface but "
                                          "loopback")
    p.set_defaults(handler=_serve_embedded)

    p = subparsers.add_parser("serve-node", help="run the rollout servers a cluster job placed on this node",
                              description="Started by the SLURM job script on every node that runs rollout servers.")
    p.add_argument("layout", type=Path, help="the job's layout file (written by dppo-megatron job-layout)")
    p.add_argument("--node", help="this node's name in the layout (default: $SLURMD_NODENAME, else the host name)")
    p.set_defaults(handler=_serve_node)


def _serve_embedded(args) -> int:
    import torch

    from dppo_megatron.commands.args import refuse
    from dppo_megatron.keys import KeyFileError, keys_of
    from dppo_megatron.rollout.engine import RequestError
    from dppo_megatron.rollout.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        float8 = args.dtype == "float8"
        return serve(args.model_path, host=args.host, port=args.port,
                     dtype=torch.float32 if float8 else getattr(torch, args.dtype),
                     routed_experts=args.enable_return_routed_experts, seed=args.seed, float8_weights=float8,
                     keys=keys_of(args.api_key_file))
    except (RequestError, OSError, KeyFileError) as error:  # no such model, a port in use: one line, no traceback
        return refuse(error)


def _serve_node(args) -> int:
    from dppo_megatron.rollout.node_agent import serve_node

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return serve_node(args.layout, args.node)
