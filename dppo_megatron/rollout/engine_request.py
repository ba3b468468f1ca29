"""What the embedded engine accepts in a /generate body.

SGLang's rules, so that the engine refuses what SGLang refuses (`tests/test_sglang_contract.py`
runs SGLang's own checks on the same bodies): its API contract (JSON types: integers are not
booleans or floats, unknown sampling parameters are refused, unknown top-level fields ignored),
`SamplingParams.verify`'s ranges, and the tokenizer manager's context-length check. What SGLang
serves but this engine does not (text prompts, stop strings, n > 1, penalties, grammars,
streaming, input logprobs) is refused by name. Every error names its field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT64 = (-(2**63), 2**63 - 1)

# SGLang's sampling parameters (sglang.api.v1 SamplingParams): anything else is refused.
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
}
# SGLang's, at the value that changes nothing: any other value is not served here.
NEUTRAL_SAMPLING = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                    "min_new_tokens": 0, "n": 1}
UNSERVED_SAMPLING = {"stop": "stop strings (use stop_token_ids)", "stop_regex": "stop_regex", "json_schema": "grammars",
                     "regex": "grammars", "ebnf": "grammars", "structural_tag": "grammars",
                     "logit_bias": "logit_bias", "custom_params": "custom_params", "beam_width": "beam search",
                     "watermark": "watermarks", "choice": "choice"}
# Top-level fields SGLang knows that this engine does not serve (when set to something).
UNSERVED_FIELDS = {"text": "text prompts (send input_ids)", "input_embeds": "input_embeds",
                   "image_data": "images", "video_data": "video", "audio_data": "audio",
                   "token_ids_logprob": "token_ids_logprob", "lora_path": "LoRA", "session_params": "sessions",
                   "custom_logit_processor": "custom logit processors"}


class RequestError(ValueError):
    """A request the engine cannot serve (answered with HTTP 400 and this message)."""


@dataclass(frozen=True)
class Sampling:
    """One prompt's sampling, as SGLang applies it (greedy below GREEDY_TEMPERATURE)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int  # -1: the whole vocabulary
    min_p: float
    stop_ids: frozenset
    seed: int | None


@dataclass(frozen=True)
class GenerateCall:
    prompts: list
    rids: list
    samplings: list
    topk: int
    flat_topk: bool
    topk_b64: bool
    with_routes: bool
    batched: bool


def parse_generate(body: dict, *, vocab_size: int, context_len: int, eos_token_ids: set[int],
                   routes_enabled: bool) -> GenerateCall:
    """Check a /generate body and say what to run; raises RequestError naming the field."""
    for field, what in UNSERVED_FIELDS.items():
        if body.get(field) not in (None, [], {}):
            raise RequestError(f"{field}: {what} are not served by the embedded engine")
    if _bool(body, "stream"):
        raise RequestError("stream: streaming is not served by the embedded engine")
    if _bool(body, "return_hidden_states"):
        raise RequestError("return_hidden_states: hidden states are not served by the embedded engine")
    prompts, batched = _prompts(body.get("input_ids"), vocab_size)
    rids = _per_prompt(body.get("rid"), "rid", len(prompts), batched,
                       lambda value, where: value if value is None or isinstance(value, str) else _fail(
                           where, "a string", value))
    params = _per_prompt(body.get("sampling_params"), "sampling_params", len(prompts), batched,
                         lambda value, where: value if value is None or isinstance(value, dict) else _fail(
                             where, "an object", value))
    for flag in ("return_logprob", "return_text_in_logprobs"):
        _per_prompt(body.get(flag), flag, len(prompts), batched, lambda value, where: _bool_value(value, where))
    start = _per_prompt(body.get("logprob_start_len"), "logprob_start_len", len(prompts), batched,
                        lambda value, where: None if value is None else _int_value(value, where))
    if any(s not in (None, -1) for s in start):
        raise RequestError("logprob_start_len: input logprobs are not served by the embedded engine (use -1)")
    topks = _per_prompt(body.get("top_logprobs_num"), "top_logprobs_num", len(prompts), batched,
                        lambda value, where: 0 if value is None else _int_value(value, where, 0, vocab_size))
    if len(set(topks)) > 1:
        raise RequestError("top_logprobs_num: one value for the whole batch is served by the embedded engine")
    routed_start = _int(body, "routed_experts_start_len", 0, 0, None)
    if routed_start:
        raise RequestError("routed_experts_start_len: only 0 is served by the embedded engine")
    flat_topk = _bool(body, "return_flat_raw_output_top_logprobs")
    topk_b64 = _bool(body, "return_flat_raw_top_logprobs_b64")
    if topk_b64 and not (flat_topk or _bool(body, "return_flat_raw_top_logprobs")):
        raise RequestError("return_flat_raw_top_logprobs_b64 requires return_flat_raw_top_logprobs or "
                           "return_flat_raw_output_top_logprobs.")  # SGLang's own rule and words
    with_routes = _bool(body, "return_routed_experts")
    if with_routes and not routes_enabled:
        raise RequestError("return_routed_experts needs the server flag --enable-return-routed-experts")
    samplings = []
    for index, (prompt, sampling) in enumerate(zip(prompts, params)):
        where = f"sampling_params[{index}]" if batched else "sampling_params"
        samplings.append(_sampling(sampling or {}, where, len(prompt), vocab_size, context_len, eos_token_ids))
    return GenerateCall(prompts, rids, samplings, topks[0], flat_topk, topk_b64, with_routes, batched)


def _sampling(params: dict, where: str, prompt_len: int, vocab_size: int, context_len: int,
              eos_token_ids: set[int]) -> Sampling:
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        raise RequestError(f"{where}: unknown field {unknown[0]!r}")
    for field, what in UNSERVED_SAMPLING.items():
        if params.get(field) not in (None, "", [], {}):
            raise RequestError(f"{where}.{field}: {what} are not served by the embedded engine")
    for field, neutral in NEUTRAL_SAMPLING.items():
        value = params.get(field)
        if value is not None and _number_value(value, f"{where}.{field}") != neutral:
            raise RequestError(f"{where}.{field}: only {neutral} is served by the embedded engine, got {value!r}")
    for field in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        _bool(params, field, where)
    if params.get("stream_interval") is not None:
        _int_value(params["stream_interval"], f"{where}.stream_interval")
    temperature = _number(params, "temperature", 1.0, where)
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"{where}.temperature must be a non-negative finite number, got {temperature}")
    top_p = _number(params, "top_p", 1.0, where)
    if not 0 < top_p <= 1:
        raise RequestError(f"{where}.top_p must be in (0, 1], got {top_p}")
    min_p = _number(params, "min_p", 0.0, where)
    if not 0 <= min_p <= 1:
        raise RequestError(f"{where}.min_p must be in [0, 1], got {min_p}")
    top_k = _int(params, "top_k", -1, *INT64, where)
    if top_k != -1 and top_k < 1:
        raise RequestError(f"{where}.top_k must be -1 (the whole vocabulary) or at least 1, got {top_k}")
    if prompt_len >= context_len:
        raise RequestError(f"input_ids: the input ({prompt_len} tokens) is longer than the model's context length "
                           f"({context_len} tokens)")
    if params.get("max_new_tokens") is None:
        # SGLang checks only a number the request gives; its default (128), or none (null), is
        # cut to what the context leaves.
        max_new_tokens = context_len - prompt_len if "max_new_tokens" in params else min(128, context_len - prompt_len)
    else:
        max_new_tokens = _int_value(params["max_new_tokens"], f"{where}.max_new_tokens", 0, INT64[1])
    if max_new_tokens == 0:
        raise RequestError(f"{where}.max_new_tokens: 0 (prefill only) is not served by the embedded engine")
    if prompt_len + max_new_tokens > context_len:
        raise RequestError(f"{where}.max_new_tokens: {prompt_len} input + {max_new_tokens} new tokens exceed the "
                           f"model's context length ({context_len} tokens)")
    stop_ids = params.get("stop_token_ids")
    if stop_ids is not None and not isinstance(stop_ids, list):
        _fail(f"{where}.stop_token_ids", "a list of token ids", stop_ids)
    stop = {_int_value(t, f"{where}.stop_token_ids[{i}]", *INT64) for i, t in enumerate(stop_ids or []) if t is not None}
    if not params.get("ignore_eos"):
        stop |= eos_token_ids
    seed = params.get("sampling_seed")
    seed = None if seed is None else _int_value(seed, f"{where}.sampling_seed", *INT64)
    return Sampling(max_new_tokens, temperature, top_p, top_k, min_p, frozenset(stop), seed)


def _prompts(input_ids, vocab_size: int) -> tuple[list[list[int]], bool]:
    if input_ids is None:
        raise RequestError("input_ids is required (this engine takes token ids, not text)")
    if not isinstance(input_ids, list) or not input_ids:
        raise RequestError(f"input_ids must be a non-empty list of token ids or of such lists, got {input_ids!r:.80}")
    batched = isinstance(input_ids[0], list)
    prompts = input_ids if batched else [input_ids]
    for index, prompt in enumerate(prompts):
        where = f"input_ids[{index}]" if batched else "input_ids"
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(f"{where} must be a non-empty list of token ids")
        for position, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise RequestError(f"{where}[{position}] must be a token id in [0, {vocab_size}), got {token!r:.40}")
    return prompts, batched


def _per_prompt(value, field: str, count: int, batched: bool, check) -> list:
    """A field given once for all prompts, or (in a batch) as a list of one per prompt."""
    if batched and isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{field}: {len(value)} values for {count} prompts")
        return [check(item, f"{field}[{i}]") for i, item in enumerate(value)]
    return [check(value, field)] * count


def _fail(where: str, expected: str, value):
    raise RequestError(f"{where} must be {expected}, got {value!r:.80}")


def _bool_value(value, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def _bool(body: dict, field: str, where: str | None = None) -> bool:
    return _bool_value(body.get(field), f"{where}.{field}" if where else field)


def _int_value(value, where: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise RequestError(f"{where} must be in {bounds}, got {value}")
    return value


def _int(body: dict, field: str, default: int, low=None, high=None, where: str | None = None) -> int:
    value = body.get(field)
    return default if value is None else _int_value(value, f"{where}.{field}" if where else field, low, high)


def _number_value(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, "a number", value)
    return float(value)


def _number(body: dict, field: str, default: float, where: str) -> float:
    value = body.get(field)
    return default if value is None else _number_value(value, f"{where}.{field}")
