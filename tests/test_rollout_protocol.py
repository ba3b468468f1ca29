"""The SGLang /generate protocol on recorded-format fixtures (written from
shared/reference/sglang-protocol.md)."""

import base64
import copy

import numpy as np
import pytest

from dppo_megatron.rollout.protocol import (
    ProtocolError, RequestAborted, RoutingShape, SamplingParams, decode_routed_experts, encode_routed_experts,
    error_message, generate_request, parse_generate_response,
)

PROMPT = [151644, 872, 198]
ROUTING = RoutingShape(num_layers=2, experts_per_token=2, num_experts=8)
ROUTES = np.array([[[0, 3], [1, 7]], [[2, 5], [4, 6]], [[7, 0], [3, 3]], [[1, 2], [5, 6]]], dtype=np.int32)

RESPONSE = {  # the shape of a real SGLang response with logprobs, top-2 and routed experts
    "output_ids": [785, 151645],
    "meta_info": {
        "id": "s0", "finish_reason": {"type": "stop", "matched": 151645},
        "prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0, "weight_version": "7",
        "output_token_logprobs": [[-0.25, 785, None], [-0.01, 151645, None]],
        "output_top_logprobs": [
            [[-0.25, 785, None], [-1.75, 42, None]],
            [[-3.5, 11, None], [-4.0, 12, None]],  # the sampled 151645 is not among them
        ],
        "routed_experts": encode_routed_experts(ROUTES),  # prompt 3 + response 2 - 1 = 4 rows
    },
}


def parse(body, **kwargs):
    args = dict(rid="s0", prompt_ids=PROMPT, server="http://127.0.0.1:30000", topk=2, routing=ROUTING)
    args.update(kwargs)
    return parse_generate_response(body, **args)


def test_request_asks_for_token_ids_logprobs_topk_and_routes():
    body = generate_request("s0", PROMPT, SamplingParams(max_new_tokens=64, stop_token_ids=(151645,)),
                            topk=20, return_routed_experts=True)
    assert body["input_ids"] == PROMPT and body["rid"] == "s0"
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 20 and body["return_routed_experts"]
    params = body["sampling_params"]
    assert params["max_new_tokens"] == 64 and params["stop_token_ids"] == [151645] and params["top_k"] == -1
    assert params["skip_special_tokens"] is False and params["no_stop_trim"] is True


def test_request_leaves_out_what_is_not_needed():
    body = generate_request("s1", PROMPT, SamplingParams())
    assert "top_logprobs_num" not in body and "return_routed_experts" not in body
    assert "sampling_seed" not in body["sampling_params"]


def test_a_full_response_decodes_into_a_sample():
    sample = parse(RESPONSE)
    assert sample.response_ids == [785, 151645]
    assert sample.logprobs.dtype == np.float32 and sample.logprobs.tolist() == pytest.approx([-0.25, -0.01])
    assert sample.finish_reason == "stop" and not sample.truncated and sample.weight_version == "7"
    assert sample.server == "http://127.0.0.1:30000" and sample.num_retractions == 0
    np.testing.assert_array_equal(sample.routed_experts, ROUTES)
    assert sample.routed_experts.dtype == np.uint8  # 8 experts: the smallest type that holds their ids


def test_sampled_token_replaces_the_last_topk_entry_when_missing():
    sample = parse(RESPONSE)
    assert sample.topk_ids.dtype == np.int32 and sample.topk_logprobs.dtype == np.float32
    assert sample.topk_ids[0].tolist() == [785, 42] and sample.topk_logprobs[0].tolist() == [-0.25, -1.75]  # in
    assert sample.topk_ids[1].tolist() == [11, 151645]  # forced in, with the sampled token's own logprob
    assert sample.topk_logprobs[1].tolist() == pytest.approx([-3.5, -0.01])


def flat_b64(nested: list) -> dict:
    """The output top-K as SGLang's return_flat_raw_output_top_logprobs + return_flat_raw_top_logprobs_b64
    lay it out (tokenizer_manager._build_flat_top_logprobs_fields_from_arrays in 0.5.23): [rows, k]
    little-endian arrays, base64, with dtype markers, the shape and a null prefix."""
    values = np.array([[e[0] for e in row] for row in nested], dtype="<f4")
    ids = np.array([[e[1] for e in row] for row in nested], dtype="<i4")
    return {"output_top_logprobs_val_flat_b64": base64.b64encode(values.tobytes()).decode(),
            "output_top_logprobs_idx_flat_b64": base64.b64encode(ids.tobytes()).decode(),
            "output_top_logprobs_val_flat_b64_dtype": "float32", "output_top_logprobs_idx_flat_b64_dtype": "int32",
            "output_top_logprobs_shape": list(values.shape), "output_top_logprobs_null_prefix": 0}


def test_topk_as_flat_base64_arrays_decodes_like_the_json_triples():
    body = generate_request("s0", PROMPT, SamplingParams(), topk=2, topk_b64=True)
    assert body["return_flat_raw_output_top_logprobs"] is True and body["return_flat_raw_top_logprobs_b64"] is True
    flat = copy.deepcopy(RESPONSE)
    flat["meta_info"].update(flat_b64(flat["meta_info"].pop("output_top_logprobs")))
    nested, from_flat = parse(RESPONSE), parse(flat)
    np.testing.assert_array_equal(from_flat.topk_ids, nested.topk_ids)
    np.testing.assert_array_equal(from_flat.topk_logprobs, nested.topk_logprobs)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(output_top_logprobs_shape=[1, 2]), "does not cover the 2 output tokens"),
    (lambda m: m.update(output_top_logprobs_null_prefix=1), "does not cover"),
    (lambda m: m.update(output_top_logprobs_shape=[2, 1]), "1 entries per token, expected 2"),
    (lambda m: m.update(output_top_logprobs_val_flat_b64_dtype="float16"), "is float16"),
    (lambda m: m.update(output_top_logprobs_idx_flat_b64="AAAA"), "holds 3 bytes, expected 16"),
    (lambda m: m.update(output_top_logprobs_idx_flat_b64="**"), "not base64"),
])
def test_malformed_flat_topk_is_refused(mutate, message):
    body = copy.deepcopy(RESPONSE)
    body["meta_info"].update(flat_b64(body["meta_info"].pop("output_top_logprobs")))
    mutate(body["meta_info"])
    with pytest.raises(ProtocolError, match=message):
        parse(body)


def test_length_finish_marks_the_sample_truncated():
    body = copy.deepcopy(RESPONSE)
    body["meta_info"]["finish_reason"] = {"type": "length", "length": 2}
    assert parse(body).truncated


def test_abort_is_reported_for_resending():
    body = copy.deepcopy(RESPONSE)
    body["meta_info"]["finish_reason"] = {"type": "abort", "message": "memory", "status_code": 503}
    with pytest.raises(RequestAborted, match="aborted by the server: memory"):
        parse(body)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["meta_info"].pop("routed_experts"), "no routed_experts"),
        (lambda b: b["meta_info"].update(routed_experts="not base64!"), "not valid base64"),
        (lambda b: b["meta_info"].update(routed_experts=encode_routed_experts(ROUTES[:3])), "3 rows, expected"),
        (lambda b: b["meta_info"].update(routed_experts=encode_routed_experts(ROUTES[:3, :1])), "whole number"),
        (lambda b: b["meta_info"].update(routed_experts=encode_routed_experts(ROUTES + 5)), "outside \\[0, 8\\)"),
        (lambda b: b["meta_info"].pop("output_token_logprobs"), "return_logprob dropped"),
        (lambda b: b["meta_info"]["output_token_logprobs"][1].__setitem__(1, 9), "is for token 9"),
        (lambda b: b["meta_info"].pop("output_top_logprobs"), "top_logprobs_num dropped"),
        (lambda b: b["meta_info"]["output_top_logprobs"][0].pop(), "has 1 entries, expected 2"),
        (lambda b: b["meta_info"].update(finish_reason={"type": "weird"}), "unknown finish_reason"),
        (lambda b: b.pop("meta_info"), "missing meta_info"),
        (lambda b: b.update(output_ids="785"), "output_ids must be a list"),
    ],
)
def test_malformed_responses_are_refused_naming_server_and_request(mutate, message):
    body = copy.deepcopy(RESPONSE)
    mutate(body)
    with pytest.raises(ProtocolError, match=message) as caught:
        parse(body)
    assert "server http://127.0.0.1:30000, request s0" in str(caught.value)


def test_routes_are_not_required_when_r3_is_off():
    body = copy.deepcopy(RESPONSE)
    del body["meta_info"]["routed_experts"]
    assert parse(body, routing=None).routed_experts is None


def test_routes_round_trip_through_sglangs_encoding():
    encoded = encode_routed_experts(ROUTES)
    raw = np.frombuffer(base64.b64decode(encoded), "<i4")  # as the reference decodes it
    np.testing.assert_array_equal(raw.reshape(-1, 2, 2), ROUTES)
    np.testing.assert_array_equal(decode_routed_experts(encoded, ROUTING, rows=4), ROUTES)


@pytest.mark.parametrize(
    "status, text, expected",
    [
        (400, '{"error": {"message": "bad sampling_params"}}', "HTTP 400: bad sampling_params"),
        (503, '{"detail": "not ready"}', "HTTP 503: not ready"),
        (500, "Internal Server Error", "HTTP 500: Internal Server Error"),
    ],
)
def test_error_bodies_become_readable_messages(status, text, expected):
    assert error_message(status, text) == expected
