"""The embedded engine: generation as SGLang's /generate does it, with transformers inside.

For laptops, CI and tests, where SGLang cannot run. It answers in SGLang's response format
(`protocol.py`): logprobs of the sampled tokens under the sampling distribution
(softmax(logits / temperature)), the top-K of that distribution, and, for MoE models, the
experts each MoE router chose for every token it was fed, encoded as SGLang encodes them.
One request at a time, with a KV cache: fast enough for the tiny recipes.
"""

from __future__ import annotations

import base64
import ctypes
import gc
import inspect
import itertools
import math
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dppo_megatron.model.mapping import hf_expert_tensor
from dppo_megatron.rollout.engine_request import RequestError, Sampling, parse_generate
from dppo_megatron.rollout.float8_weights import float8_round_trip, is_float8_weight, quantize_to_float8
from dppo_megatron.rollout.protocol import (
    NO_SESSION_OPEN,
    OUTSIDE_SESSION,
    SESSION_ALREADY_OPEN,
    encode_routed_experts,
)
from dppo_megatron.rollout.tensor_handles import read_payload

# SGLang's memory tags (sglang/srt/constants.py): what /release_memory_occupation frees.
SGLANG_MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
NOT_IDLE = "release_memory_occupation should be called only when server is idle."  # SGLang's words

GREEDY_TEMPERATURE = 1e-6  # below this SGLang samples greedily, its logprobs at T = 1 (sampling_params.py)


class EmbeddedEngine:
    def __init__(self, model_path: str | Path, *, dtype: torch.dtype = torch.float32,
                 enable_routed_experts: bool = False, seed: int = 0, float8_weights: bool = False):
        self.dtype = dtype
        self.float8_weights = float8_weights  # serve the blocks' linear weights as FP8 (float8_weights.py)
        self.enable_routed_experts = enable_routed_experts
        self.generator = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()  # one forward at a time; weight updates wait for it
        # One weight-group call (join, receive) at a time, as SGLang's scheduler runs them: a
        # sender that the others wait for must not be able to overtake them (see WeightPublisher).
        self.group_lock = threading.Lock()
        self.weight_version = "0"
        # Requests that arrived and have not answered (queued or running), by key: their rid, or
        # a key of their own; an abort marks those only (an abort for no request does nothing).
        self.active: dict = {}
        self.aborted: set = set()  # keys to stop at the next token
        self.requests_lock = threading.Lock()
        self.progress_at: float | None = None  # when the lock holder last made progress
        self.groups: dict = {}  # weight update process groups by name
        self.session_open = False  # SGLang's weight-update session (begin_weight_update ... end)
        self.released: set[str] = set()  # memory tags released (/release_memory_occupation)
        # After the weights were released and resumed, what no update has filled since (the
        # memory came back empty, as SGLang's): no generation until it is empty.
        self.unfilled: set = set()
        self._load(model_path)

    # --- weights ------------------------------------------------------------------------

    def _load(self, model_path: str | Path) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        if not (Path(model_path) / "config.json").is_file():  # else transformers takes it for a hub id
            raise RequestError(f"{model_path}: not a Hugging Face model directory (no config.json there)")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval()
        if self.float8_weights:
            quantize_to_float8(model)
        config = model.config
        self.model_path = str(model_path)
        self.model = model
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name goes in 5.40).
        self._cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.vocab_size = config.vocab_size
        self.context_len = config.max_position_embeddings
        self.num_layers = config.num_hidden_layers
        self.experts_per_token = getattr(config, "num_experts_per_tok", 0) or 0
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            eos = config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self._routes: dict[int, list[torch.Tensor]] = {}
        if self.enable_routed_experts:
            self._hook_routers()

    def _hook_routers(self) -> None:
        if not self.experts_per_token:
            raise RequestError(f"{self.model_path}: routed experts need a MoE model")
        for index, layer in enumerate(self.model.model.layers):
            router = getattr(layer.mlp, "gate", None)
            if router is None or not hasattr(router, "top_k"):
                continue  # a dense layer: its rows stay zero (SGLang builds none: config/validate.py)

            def keep(module, inputs, output, index=index):
                self._routes.setdefault(index, []).append(output[2].detach().to(torch.int32))

            router.register_forward_hook(keep)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        """Load new weights (an HF directory). The model is rebuilt from the directory, so the
        engine runs exactly what transformers would load from it."""
        with self.lock:
            if "weights" in self.released:
                raise RequestError("the weights are released: /resume_memory_occupation first")
            self.progress_at = time.monotonic()
            self._load(model_path)
            self.unfilled = set()
            self.weight_version = str(weight_version) if weight_version is not None else \
                str(int(self.weight_version) + 1 if self.weight_version.isdigit() else 1)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str = "gloo") -> None:
        """Join a weight sender's process group (the sender is rank 0)."""
        from dppo_megatron.rollout.weight_sync import weight_update_group

        if backend != "gloo":
            raise RequestError(f"the embedded engine joins gloo groups only, not {backend!r}")
        with self.group_lock:
            self.groups[group_name] = weight_update_group(master_address, int(master_port), int(rank_offset),
                                                          int(world_size), group_name)

    def begin_weight_update(self) -> None:
        """Open the weight-update session, as SGLang 0.5.23 does: one at a time."""
        with self.group_lock:
            if self.session_open:
                raise RequestError(SESSION_ALREADY_OPEN)
            self.session_open = True

    def end_weight_update(self) -> None:
        with self.group_lock:
            if not self.session_open:
                raise RequestError(NO_SESSION_OPEN)
            self.session_open = False

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, weight_version: str | None = None,
                                        load_format: str | None = None) -> None:
        """Receive each tensor by broadcast from rank 0, in list order, then load them: inside a
        weight-update session only (refused outside one with SGLang's message, before anything
        is received, as SGLang's scheduler does). The request is checked before receiving, so
        the sender is never left hanging mid-bucket."""
        from dppo_megatron.rollout.weight_sync import broadcast_from_first

        with self.group_lock:  # the session cannot close while a bucket arrives
            if not self.session_open:
                raise RequestError(OUTSIDE_SESSION.format("update_weights_from_distributed"))
            group = self.groups.get(group_name)
            if group is None:
                raise RequestError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
            if not (len(names) == len(dtypes) == len(shapes)):
                raise RequestError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
            try:
                kinds = [getattr(torch, str(d).removeprefix("torch.")) for d in dtypes]
            except AttributeError as error:
                raise RequestError(f"unknown dtype in {dtypes}: {error}") from None
            if load_format not in (None, "flattened_bucket"):
                raise RequestError(f"unknown load_format {load_format!r}")
            shapes = [[int(n) for n in shape] for shape in shapes]
            sizes = [math.prod(shape) * kind.itemsize for shape, kind in zip(shapes, kinds)]
            offsets = [0, *itertools.accumulate(sizes)][:-1]  # a bucket can hold thousands of experts
            if load_format and any(at % kind.itemsize for at, kind in zip(offsets, kinds)):
                raise RequestError("a flattened bucket whose tensors are not each aligned to their dtype")
            received = {}
            if load_format:  # one broadcast: the tensors back to back, as SGLang's FlattenedTensorBucket
                flat = torch.empty(sum(sizes), dtype=torch.uint8)
                broadcast_from_first(group, flat)
                for name, kind, shape, at, size in zip(names, kinds, shapes, offsets, sizes):
                    received[name] = flat[at:at + size].view(kind).reshape(shape)
            else:
                for name, kind, shape in zip(names, kinds, shapes):
                    tensor = torch.empty(shape, dtype=kind)
                    broadcast_from_first(group, tensor)
                    received[name] = tensor
        with self.lock:
            self.progress_at = time.monotonic()
            self._load_hf_tensors(received)
            if weight_version is not None:
                self.weight_version = str(weight_version)

    def destroy_weights_update_group(self, group_name: str) -> None:
        from dppo_megatron.rollout.weight_sync import destroy_weight_update_group

        group = self.groups.pop(group_name, None)
        if group is not None:
            destroy_weight_update_group(group)

    def update_weights_from_tensor(self, payloads: list[str], load_format: str | None = None,
                                   weight_version: str | None = None) -> None:
        """Load tensors handed over by handle (rollout/tensor_handles.py): the payload of TP rank 0,
        the engine's only rank. Inside a weight-update session only, as SGLang 0.5.23's scheduler;
        the tensors are copied into the model before the answer, after which the sender may free
        them."""
        with self.group_lock:
            if not self.session_open:
                raise RequestError(OUTSIDE_SESSION.format("update_weights_from_tensor"))
            if not isinstance(payloads, list) or not payloads or not all(isinstance(p, str) for p in payloads):
                raise RequestError("serialized_named_tensors is a list of base64 payloads, one per TP rank")
            if "weights" in self.released:
                raise RequestError("the weights are released: /resume_memory_occupation first")
            try:
                tensors = read_payload(payloads[0], load_format)
            except ValueError as error:
                raise RequestError(str(error)) from None
            with self.lock:
                self.progress_at = time.monotonic()
                self._load_hf_tensors(dict(tensors))
                if weight_version is not None:
                    self.weight_version = str(weight_version)
            del tensors  # the views of the sender's memory

    def release_memory(self, tags: list[str] | None) -> None:
        """Free the weights (every parameter's memory goes back to the system) and the KV cache (the
        engine keeps none between requests) for the tags named, all by default; only while idle,
        as SGLang. The weights come back empty at resume: an update must fill them."""
        tags = self._tags(tags)
        with self.requests_lock:
            if self.active:
                raise RequestError(NOT_IDLE)
        with self.lock:
            if "weights" in tags and "weights" not in self.released:
                self._released_shapes = {name: param.shape for name, param in self.model.named_parameters()}
                for param in self.model.parameters():
                    param.data = torch.empty(0, dtype=param.dtype)
                gc.collect()
                _return_freed_memory()
            self.released |= set(tags)

    def resume_memory(self, tags: list[str] | None) -> None:
        """Take the released memory back (SGLang refuses a tag that was not released)."""
        tags = self._tags(tags)
        if missing := [tag for tag in tags if tag not in self.released]:
            raise RequestError(f"not released: {', '.join(missing)}")
        with self.lock:
            if "weights" in tags:
                for name, param in self.model.named_parameters():
                    param.data = torch.empty(self._released_shapes[name], dtype=param.dtype)
                self.unfilled = set(_fill_keys(self.model))
            self.released -= set(tags)

    @staticmethod
    def _tags(tags: list[str] | None) -> list[str]:
        if not tags:
            return list(SGLANG_MEMORY_TAGS)
        if unknown := [tag for tag in tags if tag not in SGLANG_MEMORY_TAGS]:
            raise RequestError(f"unknown memory tags {unknown}: SGLang's are {', '.join(SGLANG_MEMORY_TAGS)}")
        return list(tags)

    def _why_not_serving(self) -> str:
        if self.released:
            return (f"memory released ({', '.join(sorted(self.released))}): no generation until "
                    "/resume_memory_occupation")
        missing = sorted(str(key) for key in self.unfilled)
        return (f"the weights were resumed but {len(missing)} tensors have not been loaded since (such as "
                f"{missing[0]}): no generation until an update fills them")

    def _load_hf_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in a HF checkpoint into the model. Transformers keeps Qwen3-MoE
        experts fused ([E, 2 * ffn, h] gate_up_proj, [E, h, ffn] down_proj); the checkpoint has
        them per expert."""
        params = dict(self.model.named_parameters())
        unknown = []
        with torch.no_grad():
            for name, tensor in tensors.items():
                if self.float8_weights and is_float8_weight(name, tensor):  # rows scale alone: as in the model
                    tensor = float8_round_trip(tensor)
                expert = hf_expert_tensor(name)
                if expert is not None:
                    prefix, index, which = expert
                    if which == "down":
                        params[prefix + "down_proj"][index].copy_(tensor)
                        self.unfilled.discard((prefix + "down_proj", index, which))
                    else:
                        fused = params[prefix + "gate_up_proj"][index]
                        half = fused.shape[0] // 2
                        (fused[:half] if which == "gate" else fused[half:]).copy_(tensor)
                        self.unfilled.discard((prefix + "gate_up_proj", index, which))
                elif name in params:
                    params[name].copy_(tensor)
                    self.unfilled.discard(name)
                elif name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    params["model.embed_tokens.weight"].copy_(tensor)
                    self.unfilled.discard("model.embed_tokens.weight")
                else:
                    unknown.append(name)
        if unknown:
            raise RequestError(f"unknown weight names: {unknown[:8]}")

    # --- generation ---------------------------------------------------------------------

    def generate(self, body: dict, cancelled: threading.Event | None = None) -> dict | list[dict]:
        """Serve one /generate body (single prompt or a batch), SGLang response format. Prompts
        of a batch that have the same length run together, one row each (no padding, so a
        row's numbers do not depend on its neighbours). `cancelled` set (its client went away)
        aborts every row at the next token."""
        if self.released or self.unfilled:
            raise RequestError(self._why_not_serving())
        call = parse_generate(body, vocab_size=self.vocab_size, context_len=self.context_len,
                              eos_token_ids=self.eos_token_ids, routes_enabled=self.enable_routed_experts)
        keys = [rid if rid is not None else object() for rid in call.rids]
        with self.requests_lock:
            for key in keys:
                self.active[key] = self.active.get(key, 0) + 1
        try:
            return self._generate(call, keys, cancelled)
        finally:
            with self.requests_lock:
                for key in keys:
                    self.active[key] -= 1
                    if not self.active[key]:
                        del self.active[key]
                        self.aborted.discard(key)

    def _generate(self, call, keys: list, cancelled: threading.Event | None) -> dict | list[dict]:
        prompts, rids, samplings, topk = call.prompts, call.rids, call.samplings, call.topk
        flat_topk, topk_b64, with_routes, batched = call.flat_topk, call.topk_b64, call.with_routes, call.batched
        outputs: list = [None] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        for rows in by_length.values():
            generated = self._generate_rows([list(prompts[i]) for i in rows], [rids[i] for i in rows],
                                            [keys[i] for i in rows], [samplings[i] for i in rows], topk, with_routes,
                                            cancelled)
            for row, output in zip(rows, generated):
                if topk and flat_topk:
                    output["meta_info"].update(flat_top_logprobs(output["meta_info"].pop("output_top_logprobs"),
                                                                 topk, b64=topk_b64))
                outputs[row] = output
        return outputs if batched else outputs[0]

    @torch.no_grad()
    def _generate_rows(self, prompts: list[list[int]], rids: list, keys: list, samplings: list[Sampling], topk: int,
                       with_routes: bool, cancelled: threading.Event | None) -> list[dict]:
        """Generate for prompts of one length together, with a KV cache; each row samples with
        its own generator and stops on its own."""
        from transformers import DynamicCache

        rows = len(prompts)
        generators = [torch.Generator().manual_seed(s.seed) if s.seed is not None else self.generator
                      for s in samplings]
        output_ids = [[] for _ in range(rows)]
        token_logprobs = [[] for _ in range(rows)]
        top_entries = [[] for _ in range(rows)]
        finish = [{"type": "length", "length": s.max_new_tokens} for s in samplings]
        running = [True] * rows
        with self.lock:
            self.progress_at = time.monotonic()
            self._routes.clear()
            cache = DynamicCache()
            feed = torch.tensor(prompts)
            for _ in range(max(s.max_new_tokens for s in samplings)):
                self.progress_at = time.monotonic()
                gone = cancelled is not None and cancelled.is_set()
                for row in range(rows):
                    if running[row] and (keys[row] in self.aborted or gone):
                        # As SGLang's plain abort: no status code (one >= 400 would make it an HTTP error).
                        why = "the client disconnected" if gone else "aborted by /abort_request"
                        finish[row] = {"type": "abort", "message": why, "status_code": None, "err_type": None}
                        running[row] = False
                if not any(running):
                    break
                forward = self.model(input_ids=feed, **{self._cache_keyword: cache}, use_cache=True)
                logits = forward.logits[:, -1].float()
                next_tokens = []
                for row in range(rows):
                    if not running[row]:
                        next_tokens.append(0)  # fed but never read: the row is done
                        continue
                    sampling = samplings[row]
                    token, logprobs = choose(sampling, logits[row], generators[row])
                    next_tokens.append(token)
                    output_ids[row].append(token)
                    token_logprobs[row].append([float(logprobs[token]), token, None])
                    if topk:
                        values, ids = logprobs.topk(topk)
                        top_entries[row].append([[float(v), int(i), None] for v, i in zip(values, ids)])
                    if token in sampling.stop_ids:
                        finish[row] = {"type": "stop", "matched": token}
                        running[row] = False
                    elif len(output_ids[row]) >= sampling.max_new_tokens:
                        running[row] = False
                feed = torch.tensor(next_tokens).unsqueeze(1)
            routes = self._collect_routes(rows) if with_routes else None
        outputs = []
        for row in range(rows):
            meta = {
                "id": rids[row], "finish_reason": finish[row], "prompt_tokens": len(prompts[row]),
                "completion_tokens": len(output_ids[row]), "cached_tokens": 0, "weight_version": self.weight_version,
                "output_token_logprobs": token_logprobs[row],
            }
            if topk:
                meta["output_top_logprobs"] = top_entries[row]
            if routes is not None:
                length = len(prompts[row]) + len(output_ids[row]) - 1
                meta["routed_experts"] = encode_routed_experts(routes[row, :length])
            outputs.append({"output_ids": output_ids[row], "meta_info": meta})
        return outputs

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Stop a request that is queued or running (or all of them) at its next token; an
        abort for a request that is not here does nothing."""
        with self.requests_lock:
            self.aborted |= set(self.active) if abort_all else ({rid} & set(self.active))

    def stalled_for(self) -> float:
        """Seconds since the holder of the engine's lock (a generation or a weight load) last made
        progress; 0 when nobody holds it."""
        started = self.progress_at
        return 0.0 if started is None or not self.lock.locked() else time.monotonic() - started

    def _collect_routes(self, rows: int) -> np.ndarray:
        """[rows, positions, layers, k] int32 from every forward of this batch: the prompts, then
        one position per fed token (a row's last sampled token was never fed)."""
        positions = sum(chunk.shape[0] for chunk in next(iter(self._routes.values()), [])) // rows
        routes = np.zeros((rows, positions, self.num_layers, self.experts_per_token), dtype=np.int32)
        for layer, chunks in self._routes.items():
            per_forward = [chunk.view(rows, -1, self.experts_per_token) for chunk in chunks]
            routes[:, :, layer] = torch.cat(per_forward, dim=1).numpy()
        return routes


def _fill_keys(model) -> list:
    """What an update must fill after a resume: each parameter, and of the fused expert tensors
    (transformers' [experts, ...] gate_up_proj and down_proj) each expert's gate, up and down."""
    keys = []
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj") and param.dim() == 3:
            keys += [(name, index, which) for index in range(param.shape[0]) for which in ("gate", "up")]
        elif name.endswith("experts.down_proj") and param.dim() == 3:
            keys += [(name, index, "down") for index in range(param.shape[0])]
        else:
            keys.append(name)
    return keys


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it for reuse otherwise, and the
    process's resident memory would not drop)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator returns what it returns
        pass


def choose(sampling: Sampling, logits: torch.Tensor, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """The next token, and the log-probabilities of the sampling distribution softmax(logits / T)
    (before top-k / top-p / min-p truncation, as SGLang reports them)."""
    if sampling.temperature < GREEDY_TEMPERATURE:
        logprobs = torch.log_softmax(logits, dim=-1)
        return int(logprobs.argmax()), logprobs
    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    probs = logprobs.exp()
    if sampling.top_k > 0:
        kth = probs.topk(min(sampling.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(0) - ordered > sampling.top_p * ordered.sum()
        probs = probs.scatter(0, order, torch.where(outside, 0.0, ordered))
    if sampling.min_p > 0:
        probs = torch.where(probs >= sampling.min_p * probs.max(), probs, 0.0)
    return int(torch.multinomial(probs, 1, generator=generator)), logprobs


def flat_top_logprobs(nested: list[list[list]], topk: int, *, b64: bool) -> dict:
    """The output top-K in SGLang's flat form (return_flat_raw_output_top_logprobs): [rows, k]
    arrays, as lists or, with `b64`, base64 of little-endian float32 values and int32 ids."""
    values = np.array([[entry[0] for entry in row] for row in nested], dtype=np.float32).reshape(len(nested), topk)
    ids = np.array([[entry[1] for entry in row] for row in nested], dtype=np.int32).reshape(len(nested), topk)
    fields = {"output_top_logprobs_shape": [len(nested), topk], "output_top_logprobs_null_prefix": 0}
    if b64:
        fields.update({
            "output_top_logprobs_val_flat_b64": base64.b64encode(values.astype("<f4").tobytes()).decode("ascii"),
            "output_top_logprobs_idx_flat_b64": base64.b64encode(ids.astype("<i4").tobytes()).decode("ascii"),
            "output_top_logprobs_val_flat_b64_dtype": "float32", "output_top_logprobs_idx_flat_b64_dtype": "int32",
        })
    else:
        fields.update({"output_top_logprobs_val_flat": values.reshape(-1).tolist(),
                       "output_top_logprobs_idx_flat": ids.reshape(-1).tolist()})
    return fields
