"""SGLang's native /generate protocol as an RL trainer uses it (see
shared/reference/sglang-protocol.md): building requests and decoding responses into samples.

Token ids in and out, so that the learner and the engine agree on tokenization. No HTTP here:
the client and the embedded engine both build on these functions.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np

from dppo_megatron.rollout.sglang_release import SGLANG_RELEASE  # noqa: F401 - the release this protocol follows


UNAUTHORIZED = {"error": "Unauthorized"}  # SGLang's 401 body (utils/auth.py)


# SGLang 0.5.23's weight-update session (managers/scheduler_components/weight_updater.py): a
# distributed or tensor update runs between /begin_weight_update and /end_weight_update, one
# session at a time. Its refusals, word for word (the embedded engine answers the same).
OUTSIDE_SESSION = "{} must run between begin_weight_update() and end_weight_update()"
SESSION_ALREADY_OPEN = "a weight-update session is already open; call end_weight_update() first"
NO_SESSION_OPEN = "no weight-update session is open; call begin_weight_update() first"


class ProtocolError(ValueError):
    """A response that does not follow the protocol, or cannot be trained on."""


class RequestAborted(ProtocolError):
    """The server aborted the request (finish_reason abort): re-send it."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None

    def to_json(self) -> dict:
        params = {
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            # Token ids out, stop token kept: its logprob is part of the sample.
            "skip_special_tokens": False, "no_stop_trim": True,
        }
        if self.sampling_seed is not None:
            params["sampling_seed"] = self.sampling_seed
        return params


@dataclass(frozen=True)
class RoutingShape:
    """What routed experts must look like for the learner's model."""

    num_layers: int
    experts_per_token: int
    num_experts: int


def generate_request(rid: str | list[str], input_ids: list[int] | list[list[int]],
                     params: SamplingParams | list[SamplingParams], *, topk: int = 0,
                     return_routed_experts: bool = False, topk_b64: bool = False) -> dict:
    """The JSON body of one /generate request: one prompt, or a batch (lists of rids, prompts
    and sampling params; the server answers with a list in the same order). `topk_b64`: the
    top-K as flat base64 float32/int32 arrays (SGLang's return_flat_raw_output_top_logprobs
    with return_flat_raw_top_logprobs_b64) instead of one JSON triple per entry."""
    batched = isinstance(rid, list)
    body = {
        "rid": rid,
        "input_ids": [list(ids) for ids in input_ids] if batched else list(input_ids),
        "sampling_params": [p.to_json() for p in params] if batched else params.to_json(),
        "return_logprob": True,
    }
    if topk:
        body["top_logprobs_num"] = topk
        if topk_b64:
            body["return_flat_raw_output_top_logprobs"] = True
            body["return_flat_raw_top_logprobs_b64"] = True
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


@dataclass
class Sample:
    """One response, with everything the learner needs from the engine, as compact arrays."""

    rid: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: np.ndarray  # float32 [response_len]: the engine's logprob of each response token
    finish_reason: str  # "stop" | "length"
    weight_version: str | None = None
    # int32 / float32 [response_len, K]: the engine's top-K ids and logprobs, the sampled token forced in.
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    # [prompt_len + response_len - 1, layers, experts per token] in the smallest integer type that
    # holds the expert ids (`route_dtype`); the last sampled token was never fed forward, so it
    # has no row.
    routed_experts: np.ndarray | None = None
    num_retractions: int = 0
    server: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def parse_generate_response(body: dict, *, rid: str, prompt_ids: list[int], server: str = "",
                            topk: int = 0, routing: RoutingShape | None = None) -> Sample:
    """Decode one /generate response object. `topk` > 0 requires the top-K lists; `routing`
    requires routed experts of that shape (R3): a response without them is an error, never a
    sample trained without routes."""
    where = f"server {server or '?'}, request {rid}"

    def fail(message: str) -> ProtocolError:
        return ProtocolError(f"{where}: {message}")

    if not isinstance(body, dict):
        raise fail(f"expected a JSON object, got {type(body).__name__}")
    meta = body.get("meta_info")
    if not isinstance(meta, dict):
        raise fail("missing meta_info")
    finish = meta.get("finish_reason")
    finish_type = finish.get("type") if isinstance(finish, dict) else finish
    if finish_type == "abort":
        message = finish.get("message", "") if isinstance(finish, dict) else ""
        raise RequestAborted(f"{where}: aborted by the server: {message}")
    if finish_type not in ("stop", "length"):
        raise fail(f"unknown finish_reason {finish!r}")

    output_ids = body.get("output_ids")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise fail("output_ids must be a list of token ids")
    logprobs = _token_logprobs(meta.get("output_token_logprobs"), output_ids, fail)

    sample = Sample(
        rid=rid, prompt_ids=list(prompt_ids), response_ids=output_ids, logprobs=logprobs,
        finish_reason=finish_type, weight_version=_optional_str(meta.get("weight_version")),
        num_retractions=int(meta.get("num_retractions") or 0), server=server,
    )
    if topk:
        sample.topk_ids, sample.topk_logprobs = _top_logprobs(meta, output_ids, logprobs, topk, fail)
    if routing is not None:
        sample.routed_experts = decode_routed_experts(
            meta.get("routed_experts"), routing, rows=len(prompt_ids) + len(output_ids) - 1, fail=fail)
    return sample


def _optional_str(value) -> str | None:
    return None if value is None else str(value)


def _token_logprobs(triples, output_ids: list[int], fail) -> np.ndarray:
    if not isinstance(triples, list) or len(triples) != len(output_ids):
        got = len(triples) if isinstance(triples, list) else type(triples).__name__
        raise fail(f"output_token_logprobs must hold one [logprob, id, text] per output token "
                   f"({len(output_ids)}), got {got} (was return_logprob dropped?)")
    logprobs = np.empty(len(output_ids), dtype=np.float32)
    for position, (triple, token) in enumerate(zip(triples, output_ids)):
        if not isinstance(triple, (list, tuple)) or len(triple) < 2:
            raise fail(f"output_token_logprobs[{position}] is not a [logprob, id, text] triple: {triple!r}")
        if triple[1] != token:
            raise fail(f"output_token_logprobs[{position}] is for token {triple[1]}, output_ids has {token}")
        logprobs[position] = triple[0]
    return logprobs


def _top_logprobs(meta: dict, output_ids: list[int], logprobs: np.ndarray, topk: int, fail):
    """Top-K ids (int32) and logprobs (float32) [response_len, K], from the flat base64 arrays
    when the server sent them, else from the nested triples; the sampled token forced into the
    set by replacing the K-th entry when it is missing (as the reference implementation does)."""
    if "output_top_logprobs_val_flat_b64" in meta:
        ids, values = _flat_top_logprobs(meta, len(output_ids), topk, fail)
    else:
        ids, values = _nested_top_logprobs(meta.get("output_top_logprobs"), len(output_ids), topk, fail)
    sampled = np.asarray(output_ids, dtype=np.int32)
    missing = ~(ids == sampled[:, None]).any(axis=1)
    ids[missing, -1] = sampled[missing]
    values[missing, -1] = logprobs[missing]
    return ids, values


def _nested_top_logprobs(per_position, length: int, topk: int, fail) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(per_position, list) or len(per_position) != length:
        raise fail(f"output_top_logprobs must hold one list per output token ({length}) "
                   f"(was top_logprobs_num dropped?)")
    ids = np.empty((length, topk), dtype=np.int32)
    values = np.empty((length, topk), dtype=np.float32)
    for position, entries in enumerate(per_position):
        if not isinstance(entries, list) or len(entries) < topk:
            raise fail(f"output_top_logprobs[{position}] has {len(entries) if isinstance(entries, list) else 0} "
                       f"entries, expected {topk}")
        for j, entry in enumerate(entries[:topk]):
            values[position, j], ids[position, j] = entry[0], entry[1]
    return ids, values


def _flat_top_logprobs(meta: dict, length: int, topk: int, fail) -> tuple[np.ndarray, np.ndarray]:
    """SGLang's flat form: output_top_logprobs_{val,idx}_flat_b64 (little-endian float32 /
    int32, their dtypes named), output_top_logprobs_shape [rows, k] and a null prefix of
    positions without entries (none on the output side)."""
    shape, prefix = meta.get("output_top_logprobs_shape"), meta.get("output_top_logprobs_null_prefix", 0)
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == length and prefix == 0):
        raise fail(f"output_top_logprobs_shape {shape} (null prefix {prefix}) does not cover the {length} "
                   "output tokens")
    if shape[1] < topk:
        raise fail(f"output top logprobs have {shape[1]} entries per token, expected {topk}")
    arrays = []
    for field, dtype in (("idx", "int32"), ("val", "float32")):
        named = meta.get(f"output_top_logprobs_{field}_flat_b64_dtype", dtype)
        if named != dtype:
            raise fail(f"output_top_logprobs_{field}_flat_b64 is {named}; this client reads {dtype}")
        try:
            raw = base64.b64decode(meta[f"output_top_logprobs_{field}_flat_b64"], validate=True)
        except (KeyError, binascii.Error, ValueError, TypeError) as error:
            raise fail(f"output_top_logprobs_{field}_flat_b64 is missing or not base64: {error}") from None
        if len(raw) != 4 * shape[0] * shape[1]:
            raise fail(f"output_top_logprobs_{field}_flat_b64 holds {len(raw)} bytes, expected "
                       f"{4 * shape[0] * shape[1]} for shape {shape}")
        arrays.append(np.frombuffer(raw, dtype="<" + dtype[0] + "4").reshape(shape)[:, :topk].astype(dtype))
    return arrays[0], arrays[1]


def route_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned integer type that holds expert ids below `num_experts`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{num_experts} experts")


def encode_routed_experts(routes: np.ndarray) -> str:
    """int [rows, layers, k] -> base64 of little-endian int32, as SGLang sends them."""
    return base64.b64encode(np.ascontiguousarray(routes, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(encoded, routing: RoutingShape, *, rows: int, fail=None) -> np.ndarray:
    """base64 int32 -> [rows, layers, experts per token] in `route_dtype`, validated against
    the model."""
    fail = fail or (lambda message: ProtocolError(message))
    if not encoded:
        raise fail("routing replay is on but the response has no routed_experts (the server needs "
                   "--enable-return-routed-experts; a load balancer may drop return_routed_experts)")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise fail(f"routed_experts is not valid base64: {error}") from None
    per_row = routing.num_layers * routing.experts_per_token
    if len(raw) % 4 or (len(raw) // 4) % per_row:
        raise fail(f"routed_experts holds {len(raw)} bytes, not a whole number of "
                   f"[{routing.num_layers} layers x {routing.experts_per_token}] int32 rows")
    routes = np.frombuffer(raw, dtype="<i4").reshape(-1, routing.num_layers, routing.experts_per_token)
    if routes.shape[0] != rows:
        raise fail(f"routed_experts has {routes.shape[0]} rows, expected prompt + response - 1 = {rows}")
    if routes.size and (routes.min() < 0 or routes.max() >= routing.num_experts):
        raise fail(f"routed_experts ids outside [0, {routing.num_experts}): "
                   f"range [{routes.min()}, {routes.max()}]")
    return routes.astype(route_dtype(routing.num_experts))


def error_message(status: int, text: str) -> str:
    """A readable message from an error response body (SGLang sends JSON with `error` or
    `detail`, or plain text)."""
    try:
        body = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text.strip()[:500]}"
    if isinstance(body, dict):
        detail = body.get("error") or body.get("detail") or body.get("message") or body
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return f"HTTP {status}: {detail}"
    return f"HTTP {status}: {body}"
