"""R3, rollout routing replay: the learner routes every token to the experts the rollout
engine routed it to, through Megatron's RouterReplay.

Routes arrive per micro-batch as [b, s, layers, k] expert ids aligned with the tokens (row t:
the experts token t was sent to when the engine fed it; -1 where the engine has no row: the
last sampled token, which it never fed, and padding). Each MoE router of this rank gets its
layer's ids in the order it sees tokens: sequence-major ([s, b] flattened), only this TP rank's
chunk of the sequence under sequence parallelism, only this pipeline stage's layers. Rows
without a route get experts 0..k-1: those tokens predict nothing that is trained on.

Forward hooks on the routers read the routing Megatron actually used, so the agreement with
the engine (fraction of token-layer pairs whose expert sets match) is measured with R3 on (it
must be 1) and off (the mismatch R3 removes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RoutingReplay:
    def __init__(self, model, *, replay: bool):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

        self.replay = replay
        self._action = RouterReplayAction
        self._router_replay = RouterReplay
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.sequence_parallel = model.config.sequence_parallel
        # This stage's MoE layers, in the order their routers were built (RouterReplay's order).
        self.layers: list[int] = []
        self._used: dict[int, list[torch.Tensor]] = {}
        for layer in model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is None:
                continue
            global_layer = layer.layer_number - 1
            self.layers.append(global_layer)
            router.register_forward_hook(self._recorder(global_layer))
        if replay and len(self.layers) != len(RouterReplay.global_router_replay_instances):
            raise RuntimeError(
                f"{len(RouterReplay.global_router_replay_instances)} RouterReplay instances for "
                f"{len(self.layers)} MoE layers: build the model with ModelOptions(routing_replay=True), "
                "and only one model per process"
            )
        # Routings are recorded only inside the decoder's forward: activation recompute runs
        # the routers again inside the backward pass, and must not count twice.
        self._in_forward = False
        model.decoder.register_forward_pre_hook(lambda *_: self._enter_forward())
        model.decoder.register_forward_hook(lambda *_: setattr(self, "_in_forward", False))
        if replay:
            model.decoder.register_full_backward_pre_hook(lambda *_: self._set_action("REPLAY_BACKWARD"))
        self._expected: list[dict | None] = []
        self.matches = torch.zeros(2, dtype=torch.float64)  # [matching pairs, pairs] since last reset

    def _enter_forward(self) -> None:
        self._in_forward = True
        if self.replay:
            self._set_action("REPLAY_FORWARD")

    def _set_action(self, name: str) -> None:
        self._router_replay.set_global_router_replay_action(getattr(self._action, name))

    def _recorder(self, layer: int):
        def record(module, inputs, output):
            if self._in_forward:
                routing_map = output[1]  # [local tokens, experts] bool
                self._used.setdefault(layer, []).append(routing_map.detach())
        return record

    def local_routes(self, routes: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per MoE layer of this stage: [local tokens, k] int64 ids (-1 = no route), in the
        order this rank's routers see the tokens."""
        b, s = routes.shape[:2]
        out = {}
        for layer in self.layers:
            ids = routes[:, :, layer, :].transpose(0, 1)  # [s, b, k]: Megatron is sequence-major
            if self.sequence_parallel:
                if s % self.tp_size:
                    raise ValueError(f"sequence length {s} is not divisible by tp {self.tp_size} (sequence parallel)")
                chunk = s // self.tp_size
                ids = ids[self.tp_rank * chunk : (self.tp_rank + 1) * chunk]
            out[layer] = ids.reshape(-1, ids.shape[-1]).long()
        return out

    def start(self) -> None:
        """Called before each schedule run: forget forwards made outside of runs."""
        self._expected.clear()
        self._used.clear()

    def before_forward(self, routes: torch.Tensor | None) -> None:
        """Called with each micro-batch's routes before its forward."""
        if routes is None:
            if self.replay:
                raise ValueError("routing replay (R3) is on but a micro-batch has no routed experts")
            self._expected.append(None)
            return
        local = self.local_routes(routes)
        self._expected.append(local)
        if self.replay:
            replay_ids = []
            for layer in self.layers:
                ids = local[layer]
                filler = torch.arange(ids.shape[1], dtype=ids.dtype).expand_as(ids)
                replay_ids.append(torch.where(ids >= 0, ids, filler))
            self._router_replay.set_replay_data(replay_ids)

    def after_step(self) -> None:
        """Score the routing the routers used against the engine's, then clear."""
        for index, expected in enumerate(self._expected):
            if expected is None:
                continue
            for layer in self.layers:
                used = self._used[layer][index]
                ids = expected[layer]
                valid = (ids >= 0).all(dim=1)
                engine_map = torch.zeros_like(used)
                engine_map.scatter_(1, ids.clamp(min=0).to(used.device), True)
                same = (engine_map == used).all(dim=1) & valid.to(used.device)
                self.matches += torch.tensor([float(same.sum()), float(valid.sum())], dtype=torch.float64)
        self._expected.clear()
        self._used.clear()
        if self.replay:
            self._router_replay.clear_global_indices()
            self._router_replay.clear_global_router_replay_action()

    def agreement(self) -> float | None:
        """Fraction of token-layer pairs routed as the engine routed them, over every rank,
        since the last call; None when no routes were given. A collective: every rank calls it."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        totals = self.matches.to(device, copy=True)
        if dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals.cpu()
        self.matches.zero_()
        return float(totals[0] / totals[1]) if totals[1] > 0 else None
